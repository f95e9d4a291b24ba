"""Packing beams into a prefix tree: invariants, ordering and speed."""

from __future__ import annotations

import dataclasses
import timeit

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_redrafter.tree import Tree, pack

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

ROOT = 7


def node_prefixes(tree: Tree) -> list[tuple[int, ...]]:
    """The token prefix each node stands for, rebuilt from ``parent`` and ``tokens``."""
    prefixes: list[tuple[int, ...]] = []
    for i in range(tree.size):
        p = int(tree.parent[i])
        prefixes.append((prefixes[p] if p >= 0 else ()) + (int(tree.tokens[i]),))
    return prefixes


def check_tree(beams: np.ndarray, tree: Tree) -> None:
    """Assert every documented invariant of ``pack(beams)``."""
    width, length = beams.shape
    n = tree.size
    distinct = {tuple(beams[w, : j + 1]) for w in range(width) for j in range(length)}
    assert n == len(distinct) <= width * length
    for name in ("tokens", "depth", "parent", "unpack"):
        assert getattr(tree, name).dtype == np.int32, name
    assert tree.tokens.shape == tree.depth.shape == tree.parent.shape == (n,)
    assert tree.mask.shape == (n, n) and tree.mask.dtype == bool
    assert tree.unpack.shape == (width, length)

    # Root is node 0; parents come before children; depth follows the parent chain.
    assert tree.parent[0] == -1 and tree.depth[0] == 0 and tree.tokens[0] == beams[0, 0]
    assert (tree.parent[1:] >= 0).all()
    assert (tree.parent[1:] < np.arange(1, n)).all()
    assert (tree.depth[1:] == tree.depth[tree.parent[1:]] + 1).all()

    # Nodes are exactly the distinct prefixes, each once.
    prefixes = node_prefixes(tree)
    assert len(set(prefixes)) == n and set(prefixes) == distinct

    # unpack: tokens[unpack] == beams and each position maps to its own prefix.
    np.testing.assert_array_equal(tree.tokens[tree.unpack], beams)
    for w in range(width):
        for j in range(length):
            assert prefixes[tree.unpack[w, j]] == tuple(beams[w, : j + 1])

    # mask = ancestor-or-self relation.
    expected = np.zeros((n, n), dtype=bool)
    for i in range(n):
        j = i
        while j >= 0:
            expected[i, j] = True
            j = tree.parent[j]
    np.testing.assert_array_equal(tree.mask, expected)

    # Order: beam-major by the first beam containing a node, then depth. In particular
    # siblings follow the order of the beams that first contain them.
    first_beam = [int(np.argmax((tree.unpack == i).any(axis=1))) for i in range(n)]
    order = list(zip(first_beam, tree.depth.tolist(), strict=True))
    assert order == sorted(order) and len(set(order)) == n


def beams_strategy(max_width: int = 8, max_length: int = 8, alphabet: int = 3):
    """Random ``(W, L)`` beams with a shared root; a small alphabet forces sharing."""
    return st.integers(1, max_width).flatmap(
        lambda w: st.integers(1, max_length).flatmap(
            lambda n: st.lists(
                st.lists(st.integers(0, alphabet - 1), min_size=n, max_size=n),
                min_size=w,
                max_size=w,
            )
        )
    )


def with_root(rows: list[list[int]]) -> np.ndarray:
    beams = np.array(rows, dtype=np.int64)
    beams[:, 0] = ROOT
    return beams


@settings(max_examples=300, deadline=None)
@given(beams_strategy())
def test_random_beams(rows):
    beams = with_root(rows)
    check_tree(beams, pack(beams))


@settings(max_examples=100, deadline=None)
@given(beams_strategy(alphabet=1000))
def test_random_beams_large_vocab(rows):
    beams = with_root(rows)
    check_tree(beams, pack(beams))


@pytest.mark.parametrize("width,length", [(1, 1), (1, 5), (4, 5), (8, 8)])
def test_all_equal_beams_give_one_chain(width, length):
    beams = np.tile(np.arange(length) + ROOT, (width, 1))
    tree = pack(beams)
    check_tree(beams, tree)
    assert tree.size == length
    np.testing.assert_array_equal(tree.unpack, np.tile(np.arange(length), (width, 1)))
    np.testing.assert_array_equal(tree.mask, np.tril(np.ones((length, length), bool)))


@pytest.mark.parametrize("width,length", [(2, 2), (4, 5), (8, 3)])
def test_all_distinct_beams_share_only_the_root(width, length):
    beams = np.arange(width * length).reshape(width, length) + 100
    beams[:, 0] = ROOT
    tree = pack(beams)
    check_tree(beams, tree)
    assert tree.size == 1 + width * (length - 1)
    # Beam w's non-root nodes are a contiguous run, after beam w-1's.
    for w in range(width):
        start = 1 + w * (length - 1)
        np.testing.assert_array_equal(tree.unpack[w, 1:], np.arange(start, start + length - 1))


@pytest.mark.parametrize("shared", range(1, 6))
def test_shared_prefix_of_every_length(shared):
    width, length = 4, 5
    beams = np.arange(width * length).reshape(width, length) + 100
    beams[:, :shared] = np.arange(shared) + ROOT
    tree = pack(beams)
    check_tree(beams, tree)
    assert tree.size == shared + width * (length - shared)
    assert (tree.unpack[:, :shared] == np.arange(shared)).all()


def test_siblings_follow_beam_rank():
    beams = np.array([[ROOT, 5, 1], [ROOT, 3, 1], [ROOT, 5, 2], [ROOT, 4, 0]])
    tree = pack(beams)
    check_tree(beams, tree)
    children_of_root = [i for i in range(tree.size) if tree.parent[i] == 0]
    assert tree.tokens[children_of_root].tolist() == [5, 3, 4]
    children_of_5 = [i for i in range(tree.size) if tree.parent[i] == tree.unpack[0, 1]]
    assert tree.tokens[children_of_5].tolist() == [1, 2]


def test_rejects_bad_beams():
    with pytest.raises(ValueError, match="same root"):
        pack(np.array([[1, 2], [3, 2]]))
    with pytest.raises(ValueError, match="non-empty"):
        pack(np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        pack(np.zeros(3, dtype=np.int64))


CORRUPTIONS = {
    "one extra mask entry": lambda t: dataclasses.replace(t, mask=_flip(t.mask, (9, 5))),
    "one missing mask entry": lambda t: dataclasses.replace(t, mask=_flip(t.mask, (4, 0))),
    "wrong parent": lambda t: dataclasses.replace(t, parent=_set(t.parent, 13, 5)),
    "depth off by one": lambda t: dataclasses.replace(t, depth=t.depth + np.int32(1)),
    "swapped siblings": lambda t: _swap_nodes(t, 5, 9),
    "wrong unpack": lambda t: dataclasses.replace(t, unpack=_set(t.unpack, (1, 2), 10)),
}


def _flip(mask: np.ndarray, index: tuple[int, int]) -> np.ndarray:
    out = mask.copy()
    out[index] = not out[index]
    return out


def _set(a: np.ndarray, index: int | tuple[int, int], value: int) -> np.ndarray:
    out = a.copy()
    out[index] = value
    return out


def _swap_nodes(tree: Tree, a: int, b: int) -> Tree:
    """Renumber nodes ``a`` and ``b`` consistently (a valid tree, but in the wrong order)."""
    perm = np.arange(tree.size)
    perm[[a, b]] = perm[[b, a]]  # new index -> old index
    inverse = np.argsort(perm)
    parent = np.where(tree.parent[perm] >= 0, inverse[tree.parent[perm]], -1).astype(np.int32)
    return Tree(
        tokens=tree.tokens[perm],
        depth=tree.depth[perm],
        parent=parent,
        mask=tree.mask[np.ix_(perm, perm)],
        unpack=inverse[tree.unpack].astype(np.int32),
    )


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_checker_catches_corruptions(corruption):
    beams = np.array(
        [[ROOT, 1, 1, 0, 0], [ROOT, 0, 0, 0, 2], [ROOT, 2, 1, 1, 2], [ROOT, 1, 1, 1, 2]]
    )
    tree = pack(beams)
    check_tree(beams, tree)
    assert tree.parent[13] == 2 and tree.parent[5] == 0 and tree.parent[9] == 0
    with pytest.raises(AssertionError):
        check_tree(beams, CORRUPTIONS[corruption](tree))


def test_pack_is_fast():
    rng = np.random.default_rng(0)
    beams = rng.integers(0, 3, (4, 5))
    beams[:, 0] = ROOT
    pack(beams)
    runs = 2000
    best = min(timeit.repeat(lambda: pack(beams), number=runs, repeat=5)) / runs
    # Target < 100 us; the bound is loose because the machine is shared.
    assert best < 250e-6, f"pack took {best * 1e6:.1f} us"
