"""Where a speculative output first leaves the AR output, and how close the target was to a tie.

Greedy speculative output equals the target's greedy output under the verification
forward's numerics. Where kernels round differently (Metal runs other kernels for a tree of
N tokens than for one token), the two can differ, but only where the target's top two logits
nearly tie. :func:`logit_gap_at` measures that margin at a divergence, so a mismatch can be
told apart from a real error (a large gap).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def first_divergence(want: list[int], got: list[int]) -> int | None:
    """Index of the first token where ``got`` differs from ``want``; ``None`` if equal.

    When one list is a prefix of the other, the divergence is at the shorter one's length.
    """
    for position, (a, b) in enumerate(zip(want, got, strict=False)):
        if a != b:
            return position
    return None if len(want) == len(got) else min(len(want), len(got))


def logit_gap_at(
    model: nn.Module, prompt_ids: list[int], ar_tokens: list[int], position: int
) -> float:
    """The target's top-1 minus top-2 logit for generated token ``position``.

    One forward (no cache) of ``model`` over ``prompt_ids + ar_tokens[:position]``, shape
    ``(1, P + position)``; the last row of its logits, ``(vocab,)`` in float32, is the
    distribution that chose AR token ``position``.
    """
    if not 0 <= position <= len(ar_tokens):
        raise ValueError(f"position {position} outside 0..{len(ar_tokens)}")
    ids = mx.array([list(prompt_ids) + list(ar_tokens[:position])])
    logits = np.asarray(model(ids)[0, -1].astype(mx.float32))
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


def divergence_report(
    model: nn.Module, prompt_ids: list[int], ar_tokens: list[int], tokens: list[int]
) -> dict | None:
    """``{"position", "ar_token", "token", "ar_logit_gap"}`` at the first divergence of
    ``tokens`` from ``ar_tokens`` (a token past an output's end is ``None``); ``None`` if
    they are equal."""
    position = first_divergence(ar_tokens, tokens)
    if position is None:
        return None
    return {
        "position": position,
        "ar_token": ar_tokens[position] if position < len(ar_tokens) else None,
        "token": tokens[position] if position < len(tokens) else None,
        "ar_logit_gap": logit_gap_at(model, prompt_ids, ar_tokens, position),
    }
