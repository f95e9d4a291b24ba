"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

Every rule takes the packed tree (host structure + lazy device tokens), the target's
logits at every tree node and returns an :class:`Acceptance` of *lazy, fixed-shape* arrays,
so a decoding step needs a single host synchronisation (to read ``num_accepted``).

Rules
-----
``greedy``
    Per beam, the accepted length is the longest prefix whose drafted tokens equal the
    target's argmax at their parent; the best beam wins (ties: lowest index); the target's
    argmax after the last accepted token is emitted too. Identical to AR greedy decoding.

``exact`` (default for ``temp > 0``): recursive rejection sampling over the tree.
    Drafts from beam search (or lookup) are deterministic: conditional on the context, the
    draft tree is a fixed set of candidate children at each node, i.e. the proposal
    distribution is a point mass (``q = 1`` on the proposed child). Starting at the root
    with residual ``r := p(. | node)`` (the target's sampling distribution after the user's
    transforms), visit the node's distinct children ``c_1 .. c_m`` in the drafter's order;
    accept ``c_i`` with probability ``r(c_i) / sum(r)``; on acceptance descend to ``c_i``
    and start again there; on rejection set ``r(c_i) = 0``. If every child is rejected,
    emit a sample from ``r / sum(r)`` and stop; at a leaf, emit a sample from
    ``p(. | leaf)``.

    *Why the emitted token has law p.* Let ``R_0 = p`` and ``R_i`` be ``R_{i-1}`` with
    ``c_i`` removed (unnormalised). Token ``x`` is emitted at this node either by accepting
    child ``c_i = x`` (only possible for one i) or, if all children are rejected, by the
    final residual draw. P(reach the test of c_i) = ``|R_{i-1}| / |R_0|`` (telescoping: each
    rejection happens with probability ``|R_i| / |R_{i-1}|``). So for ``x = c_i``:
    ``P = |R_{i-1}|/|R_0| * R_{i-1}(x)/|R_{i-1}| = p(x)`` since ``R_{i-1}(x) = p(x)``; and
    for ``x`` not a child: ``P = |R_m|/|R_0| * R_m(x)/|R_m| = p(x)``. Hence the token at
    every depth is distributed as ``p(. | prefix)``, whatever the draft — the output has
    the target's distribution exactly. The acceptance uniforms are fresh per test, and the
    draft never depends on them.

``exact-chain`` (drafts *sampled* from a proposal ``q``, e.g. a draft model at T > 0,
    width 1): the standard rule — accept ``x_j`` with probability ``min(1, p(x_j)/q(x_j))``,
    otherwise emit a sample from ``norm(max(0, p - q))``; after a fully accepted chain emit a
    bonus sample from ``p``.

``redrafter`` (ReDrafter's published rule, **approximate**, for comparison only): every
    beam is tested on its own with ``min(1, p/q)`` where ``q`` is the head's probability of
    the beam token, the longest accepted beam is kept and a token is drawn from
    ``norm(relu(p - q))`` at its first rejection. Beams from deterministic beam search are
    not samples from ``q``, and choosing the best of several beams biases the result, so
    this rule does not preserve the target distribution (``tests/test_exact_sampling.py``
    shows a goodness-of-fit test rejecting it).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import Tree

RULES = ("exact", "redrafter")


@dataclass
class Acceptance:
    """Result of verifying one tree (all arrays lazy).

    Attributes:
        num_accepted: ``()`` int32, drafted tokens accepted (0 .. L-1).
        drafted: ``(L-1,)`` int32, the drafted tokens of the chosen path; the first
            ``num_accepted`` of them are kept.
        path: ``(L,)`` int32 packed node indices of the chosen path, root first; nodes
            ``path[: num_accepted + 1]`` stay in the target's cache.
        next_root: ``()`` int32, the target's own token after the accepted ones.
        last_node: ``()`` int32, ``path[num_accepted]`` (where the next draft starts).
    """

    num_accepted: mx.array
    drafted: mx.array
    path: mx.array
    next_root: mx.array
    last_node: mx.array


def _finish(
    tree: Tree, tokens: mx.array, best: mx.array, num: mx.array, next_root: mx.array
) -> Acceptance:
    unpack = mx.array(tree.unpack)
    path = unpack[best]
    last = mx.take(path, num)
    return Acceptance(
        num_accepted=num.astype(mx.int32),
        drafted=tokens[path[1:]],
        path=path,
        next_root=next_root.astype(mx.int32),
        last_node=last,
    )


def accept_greedy(tree: Tree, tokens: mx.array, logits: mx.array) -> Acceptance:
    """Greedy (argmax matching) acceptance.

    Args:
        tree: The packed tree (host structure).
        tokens: ``(N,)`` int32 packed node tokens (may be lazy).
        logits: ``(N, V)`` target logits (processed) at every node.
    """
    choice = mx.argmax(SamplingParams().logits(logits), axis=-1)  # (N,)
    unpack = mx.array(tree.unpack)  # (W, L)
    drafted = tokens[unpack[:, 1:]]  # (W, L-1)
    expected = choice[unpack[:, :-1]]  # (W, L-1)
    matches = mx.cumprod((drafted == expected).astype(mx.int32), axis=1)
    lengths = matches.sum(axis=1)  # (W,)
    best = mx.argmax(lengths)  # first maximum: lowest beam index wins ties
    num = lengths[best]
    next_root = mx.take(choice, mx.take(unpack[best], num))
    return _finish(tree, tokens, best, num, next_root)


def children_table(tree: Tree) -> np.ndarray:
    """``(N, C)`` int32 children of every node in packed (= drafter) order, -1 padded."""
    n = len(tree.tokens)
    kids: list[list[int]] = [[] for _ in range(n)]
    for node in range(1, n):
        kids[int(tree.parent[node])].append(node)
    width = max(1, max(len(k) for k in kids))
    table = np.full((n, width), -1, dtype=np.int32)
    for node, k in enumerate(kids):
        table[node, : len(k)] = k
    return table


def exact_randomness(tree: Tree, vocab_size: int, key: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Fresh randomness for :func:`accept_exact`: uniforms ``(L, C)``, Gumbel noise ``(L, V)``."""
    depth = tree.unpack.shape[1]
    width = children_table(tree).shape[1]
    key_u, key_g = mx.random.split(key) if key is not None else (None, None)
    uniforms = mx.random.uniform(shape=(depth, width), key=key_u)
    gumbel = mx.random.gumbel(shape=(depth, vocab_size), key=key_g)
    return uniforms, gumbel


def accept_exact(
    tree: Tree,
    tokens: mx.array,
    probs: mx.array,
    uniforms: mx.array | None = None,
    gumbel: mx.array | None = None,
) -> Acceptance:
    """Exact recursive rejection sampling over a deterministic draft tree (module doc).

    Args:
        tree: The packed tree.
        tokens: ``(N,)`` int32 packed node tokens.
        probs: ``(N, V)`` float32 target sampling distribution at every node.
        uniforms: ``(L, C)`` acceptance uniforms (``C`` = max children per node);
            drawn from the global generator when ``None``.
        gumbel: ``(L, V)`` Gumbel noise for the residual / bonus draws.
    """
    if uniforms is None or gumbel is None:
        uniforms, gumbel = exact_randomness(tree, probs.shape[-1])
    children = mx.array(children_table(tree))
    num, node, next_root = exact_walk(children, tokens, probs, uniforms, gumbel)
    return _finish(tree, tokens, _beam_of(tree, node), num, next_root)


def exact_walk(
    children: mx.array,
    tokens: mx.array,
    probs: mx.array,
    uniforms: mx.array,
    gumbel: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """The walk of :func:`accept_exact` on explicit randomness (vmappable over it).

    Args:
        children: ``(N, C)`` int32 children table (-1 padded), drafter order.
        tokens: ``(N,)`` int32 node tokens.
        probs: ``(N, V)`` target distribution per node.
        uniforms: ``(L, C)`` uniforms in [0, 1).
        gumbel: ``(L, V)`` standard Gumbel noise.

    Returns:
        ``(num_accepted, last_node, next_root)``, each ``()`` int32.
    """
    levels, width = uniforms.shape
    vocab = mx.arange(probs.shape[-1])
    node = mx.array(0, dtype=mx.int32)
    num = mx.array(0, dtype=mx.int32)
    stopped = mx.array(False)
    next_root = mx.array(0, dtype=mx.int32)
    for level in range(levels):
        residual = probs[node]  # (V,)
        chosen = mx.array(-1, dtype=mx.int32)
        for i in range(width):
            child = children[node, i]
            live = (child >= 0) & (chosen < 0) & ~stopped
            token = tokens[mx.maximum(child, 0)]
            ratio = residual[token] / mx.maximum(residual.sum(), 1e-30)
            take = live & (uniforms[level, i] < ratio)
            drop = live & ~take
            residual = mx.where(drop & (vocab == token), 0.0, residual)
            chosen = mx.where(take, child, chosen)
        descended = chosen >= 0
        # every child rejected, or a leaf: emit a draw from the residual here
        draw = mx.argmax(mx.log(residual) + gumbel[level]).astype(mx.int32)
        next_root = mx.where(~stopped & ~descended, draw, next_root)
        stopped = stopped | ~descended
        num = num + descended.astype(mx.int32)
        node = mx.where(descended, chosen, node).astype(mx.int32)
    return num, node, next_root


def accept_redrafter(
    tree: Tree,
    tokens: mx.array,
    probs: mx.array,
    draft_logprobs: mx.array,
    uniforms: mx.array | None = None,
    gumbel: mx.array | None = None,
) -> Acceptance:
    """ReDrafter's published rule (approximate; see the module doc).

    Args:
        tree: The packed tree.
        tokens: ``(N,)`` int32 node tokens.
        probs: ``(N, V)`` target distribution per node.
        draft_logprobs: ``(W, L-1, V)`` the head's log-probs along each beam.
        uniforms: ``(W, L-1)`` uniforms; drawn when ``None``.
        gumbel: ``(V,)`` Gumbel noise for the final draw; drawn when ``None``.
    """
    width, length = tree.unpack.shape
    if uniforms is None or gumbel is None:
        uniforms = mx.random.uniform(shape=(width, length - 1))
        gumbel = mx.random.gumbel(shape=(probs.shape[-1],))
    unpack = mx.array(tree.unpack)
    drafted = tokens[unpack[:, 1:]]  # (W, L-1)
    p_parent = probs[unpack[:, :-1]]  # (W, L-1, V)
    p_tok = mx.take_along_axis(p_parent, drafted[..., None], axis=-1)[..., 0]
    q_all = mx.exp(draft_logprobs.astype(mx.float32))
    q_tok = mx.take_along_axis(q_all, drafted[..., None], axis=-1)[..., 0]
    ok = uniforms < mx.minimum(1.0, p_tok / mx.maximum(q_tok, 1e-30))
    lengths = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)
    best = mx.argmax(lengths)
    num = lengths[best]
    node = mx.take(unpack[best], num)
    p = probs[node]
    q_pad = mx.concatenate([q_all[best], mx.zeros_like(q_all[best, :1])], axis=0)  # (L, V)
    residual = mx.maximum(p - q_pad[num], 0.0)
    residual = mx.where(residual.sum() > 0, residual, p)
    next_root = mx.argmax(mx.log(residual) + gumbel).astype(mx.int32)
    return _finish(tree, tokens, best, num, next_root)


def _beam_of(tree: Tree, node: mx.array) -> mx.array:
    """``()`` index of the first beam whose path contains ``node``."""
    unpack = mx.array(tree.unpack)  # (W, L)
    contains = (unpack == node).any(axis=1)
    return mx.argmax(contains)
