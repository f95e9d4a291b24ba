"""Check that greedy decoding by the engine accepts what a simulation predicted, step by step."""

from __future__ import annotations

import numpy as np

from mlx_redrafter.engine import StepStats, speculative_tokens
from mlx_redrafter.sampling import SamplingParams


def assert_engine_follows_walks(
    target, drafter, sequences: list[tuple[np.ndarray, int]], walks: list[list[int]], length: int
) -> None:
    """Decode each sequence's prompt greedily (``W = 1``, ``L = length``) and compare.

    Args:
        target: The wrapped target (:class:`~mlx_redrafter.target.Target`).
        drafter: The drafter under test.
        sequences: ``(tokens (T,), response_start)``: the target's own greedy responses.
        walks: The simulated accepted drafts at each call
            (:func:`~mlx_redrafter.train.evaluate.decode_walks`), one list per sequence.
        length: Beam length ``L``.
    """
    for (tokens, start), walk in zip(sequences, walks, strict=True):
        stats, emitted = StepStats(), []
        for token, _ in speculative_tokens(
            target, drafter, tokens[:start].tolist(), SamplingParams(temp=0.0), 1, length, stats
        ):
            emitted.append(token)
            if len(emitted) >= tokens.size - start:
                break
        assert emitted == tokens[start:].tolist()
        # The prefill emits g0 of the first call; engine step k verifies call k's drafts.
        # The engine may accept drafts past the end of the distilled response; the
        # simulation stops there (at most T - 2 - t drafts at position t).
        t = start - 1
        for engine, simulated in zip(stats.accepted, walk, strict=False):
            assert simulated == min(engine, tokens.size - 2 - t)
            t += 1 + simulated
        assert len(walk) - 1 <= stats.steps <= len(walk)
