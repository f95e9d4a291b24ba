"""Packing draft beams into a deduplicated prefix tree (host-side, numpy).

``W`` beams of length ``L`` that all start with the same root token share prefixes; the
target only needs to see every *distinct* prefix once. :func:`pack` numbers the distinct
prefixes ("nodes") beam by beam: beam 0's nodes come first (``0 .. L-1``), then the nodes
of beam 1 that beam 0 does not contain, and so on. This order is topological (a node's
parent always has a smaller index, the root is node 0) and puts siblings in the order of
the first beam containing them, so higher-ranked beams come first.

Drafters that propose fewer than ``L - 1`` tokens in some beam (prompt lookup without a
long enough match) pass a ``(W, L)`` ``valid`` mask: a position is *usable* when it and every
earlier position of its beam are valid. Unusable positions get no node of their own (the
target never verifies them) and columns past the longest usable beam are dropped.

This runs once per decoding step on tiny arrays, so it is fully vectorised (no Python
loop over beams or positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True, eq=False)
class Tree:
    """A packed prefix tree of ``N`` nodes built from ``(W, L)`` beams.

    Attributes:
        tokens: ``(N,)`` int32 token of each node.
        depth: ``(N,)`` int32 distance from the root (root = 0).
        parent: ``(N,)`` int32 parent node index, ``-1`` for the root.
        mask: ``(N, N)`` bool, ``mask[i, j]`` is ``True`` iff node ``j`` is an ancestor of
            node ``i`` or ``i`` itself (the attention visibility inside the tree).
        unpack: ``(W, L)`` int32 node index of every beam position;
            ``tokens[unpack] == beams`` at usable positions. An unusable position maps to
            the node of its beam's last usable position.
        usable: ``(W, L)`` bool, ``True`` where a position is usable (its node may be
            accepted), or ``None`` when every position is (no ``valid`` mask was given).
            Position 0 (the root) is always usable.
    """

    tokens: np.ndarray
    depth: np.ndarray
    parent: np.ndarray
    mask: np.ndarray
    unpack: np.ndarray
    usable: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Number of nodes ``N``."""
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class _Indices:
    """Index tables that only depend on the beam shape ``(W, L)``.

    Attributes:
        beam: ``(W, 1)`` beam numbers.
        position: ``(L,)`` positions.
        later: ``(L*(L+1)/2,)`` position ``j`` of every pair ``i <= j``.
        earlier: ``(L*(L+1)/2,)`` position ``i`` of every pair ``i <= j``.
    """

    beam: np.ndarray
    position: np.ndarray
    later: np.ndarray
    earlier: np.ndarray


@lru_cache(maxsize=64)
def _indices(width: int, length: int) -> _Indices:
    """Cached :class:`_Indices` for ``(W, L) = (width, length)``."""
    later, earlier = np.tril_indices(length)
    return _Indices(
        beam=np.arange(width)[:, None],
        position=np.arange(length),
        later=later,
        earlier=earlier,
    )


def usable_positions(valid: np.ndarray) -> np.ndarray:
    """``(W, L)`` bool: position valid and every earlier position of its beam valid.

    The root (column 0) is always usable.
    """
    valid = np.asarray(valid, dtype=bool)
    usable = np.ones(valid.shape, dtype=bool)
    usable[:, 1:] = np.logical_and.accumulate(valid[:, 1:], axis=1)
    return usable


def pack(beams: np.ndarray, valid: np.ndarray | None = None) -> Tree:
    """Merge ``(W, L)`` beams sharing a root into a prefix :class:`Tree`.

    Args:
        beams: ``(W, L)`` integer token ids; column 0 (the root) must be equal in every
            beam.
        valid: Optional ``(W, L)`` bool mask of real drafted positions (module doc). With
            it, only usable positions become nodes and the tree keeps the first ``L'``
            columns, ``L'`` = the longest usable beam (``tree.unpack`` is ``(W, L')``).

    Returns:
        The tree with ``N`` = number of distinct (usable) prefixes ``beams[w, : j + 1]``.

    Raises:
        ValueError: if ``beams`` is not 2-D, is empty, the roots differ, or ``valid`` has
            another shape.
    """
    beams = np.asarray(beams)
    if beams.ndim != 2 or beams.shape[0] == 0 or beams.shape[1] == 0:
        raise ValueError(f"beams must be a non-empty (W, L) array, got shape {beams.shape}")
    if not (beams[:, 0] == beams[0, 0]).all():
        raise ValueError("all beams must start with the same root token")
    usable = None
    if valid is not None:
        if np.shape(valid) != beams.shape:
            raise ValueError(f"valid has shape {np.shape(valid)}, beams {beams.shape}")
        usable = usable_positions(valid)
        keep = int(usable.sum(axis=1).max())
        beams, usable = beams[:, :keep], usable[:, :keep]
    width, length = beams.shape
    idx = _indices(width, length)

    # same[a, b, j]: beams a and b agree on positions 0..j, i.e. share the prefix at j.
    same = np.logical_and.accumulate(beams[:, None, :] == beams[None, :, :], axis=2)
    if usable is not None:
        same &= usable[:, None, :]  # only usable positions can hold a prefix's node
    # owner[b, j]: first beam holding the prefix beams[b, :j+1] (argmax finds the first True).
    owner = same.argmax(axis=0)
    is_new = owner == idx.beam  # (W, L) first occurrence of a prefix
    if usable is not None:
        is_new &= usable
    flat_new = is_new.ravel()
    node_of_first = np.cumsum(flat_new, dtype=np.int32).reshape(width, length) - 1
    unpack = node_of_first[owner, idx.position]  # (W, L)
    if usable is not None:
        # an unusable position stands for its beam's last usable node
        last = unpack[idx.beam[:, 0], usable.sum(axis=1) - 1]
        unpack = np.where(usable, unpack, last[:, None]).astype(np.int32)

    tokens = beams.ravel()[flat_new].astype(np.int32)
    depth = np.nonzero(is_new)[1].astype(np.int32)  # row-major = node order
    parent_of = np.empty_like(unpack)
    parent_of[:, 0] = -1
    parent_of[:, 1:] = unpack[:, :-1]
    parent = parent_of.ravel()[flat_new]

    n = tokens.shape[0]
    mask = np.zeros((n, n), dtype=bool)
    mask[unpack[:, idx.later], unpack[:, idx.earlier]] = True
    return Tree(tokens=tokens, depth=depth, parent=parent, mask=mask, unpack=unpack, usable=usable)
