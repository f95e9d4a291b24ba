"""Candidate trees from ``D`` independent per-depth distributions (a parallel head's output).

A parallel head gives one distribution per depth, not conditioned on the drafted prefix,
so a path's draft probability is the product of its tokens' per-depth probabilities.

1. *Top-k per depth*: only the ``W`` most likely tokens of each depth can be on one of the
   ``W`` most likely paths, so each depth keeps its top ``m = min(W, K)``.
2. *Paths*: a beam search over those candidates (best ``W`` of ``W x m`` per depth) gives
   exactly the ``W`` most likely paths of length ``D``, best first, with the cumulative
   log-probability of every prefix.
3. *Budget*: the packed tree holds one node per distinct prefix. With a budget of ``N``
   drafted nodes, the ``N`` most likely distinct prefixes are kept (ties: shallower first,
   then the earlier beam); every other position is marked invalid. A prefix is never less
   likely than its extension, so the kept set is closed under prefixes.

Pure MLX, fixed shapes, no host synchronisation (compiled by the drafter).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_redrafter.drafters.beam_search import sorted_top


def top_paths(logprobs: mx.array, width: int) -> tuple[mx.array, mx.array]:
    """The ``W`` most likely paths of a factorised distribution.

    Args:
        logprobs: ``(D, K)`` float32 log-probabilities of each depth.
        width: ``W``.

    Returns:
        ``(paths (W, D) int32 ids in [0, K), scores (W, D) float32)``: ``scores[w, j]`` is
        the log-probability of the prefix ``paths[w, : j + 1]``; ``-inf`` when fewer than
        ``W`` paths exist (``W > K``).
    """
    depth, vocab = logprobs.shape
    m = min(width, vocab)
    if m == vocab:
        top_ids = mx.broadcast_to(mx.arange(vocab, dtype=mx.int32), (depth, vocab))
    else:
        top_ids = mx.argpartition(-logprobs, kth=m - 1, axis=-1)[:, :m].astype(mx.int32)
    top_lp = mx.take_along_axis(logprobs, top_ids, axis=-1)
    scores = mx.concatenate(
        [mx.zeros((1,), mx.float32), mx.full((width - 1,), -mx.inf, dtype=mx.float32)]
    )
    paths = mx.zeros((width, 0), mx.int32)
    cumulative = mx.zeros((width, 0), mx.float32)
    for j in range(depth):
        candidates = (scores[:, None] + top_lp[j][None, :]).reshape(-1)
        chosen = sorted_top(candidates, width)
        parent, column = chosen // m, chosen % m
        scores = candidates[chosen]
        paths = mx.concatenate([paths[parent], top_ids[j][column][:, None]], axis=1)
        cumulative = mx.concatenate([cumulative[parent], scores[:, None]], axis=1)
    return paths, cumulative


def budget_mask(paths: mx.array, scores: mx.array, budget: int | None) -> mx.array:
    """``(W, D)`` bool: positions whose prefix is among the ``budget`` most likely distinct ones.

    Args:
        paths: ``(W, D)`` int32 paths (from :func:`top_paths`).
        scores: ``(W, D)`` float32 prefix log-probabilities (``-inf`` = no path).
        budget: ``N`` drafted nodes, or ``None`` for no limit (only ``-inf`` prefixes are
            dropped).
    """
    width, depth = paths.shape
    finite = mx.isfinite(scores)
    if budget is None or budget >= width * depth:
        return finite
    # same[w, v, j]: beams w and v share the prefix of length j + 1
    equal = (paths[:, None, :] == paths[None, :, :]).astype(mx.int32)
    same = mx.cumprod(equal, axis=-1) > 0
    beam = mx.arange(width)
    earlier = beam[None, :] < beam[:, None]
    first = ~(same & earlier[:, :, None]).any(axis=1) & finite
    # rank distinct prefixes depth-major so that ties keep the shallower (the parent)
    ranked = mx.where(first, scores, -mx.inf).T.reshape(-1)
    chosen = sorted_top(ranked, max(1, budget))
    keep_first = mx.zeros((depth * width,), mx.bool_)
    keep_first[chosen] = True
    keep_first = keep_first.reshape(depth, width).T & first
    # a repeated prefix is kept iff its first occurrence is
    owner = mx.argmax(same.astype(mx.int32), axis=1)
    return mx.take_along_axis(keep_first, owner, axis=0) & finite


def factorized_tree(
    logprobs: mx.array, width: int, budget: int | None = None
) -> tuple[mx.array, mx.array, mx.array]:
    """Paths, prefix scores and kept positions, each ``(W, D)`` (module docstring)."""
    paths, scores = top_paths(logprobs, width)
    return paths, scores, budget_mask(paths, scores, budget)
