"""Beam-shape tuning for this device (``python -m mlx_redrafter.bench --tune``).

The speed of a candidate ``(W, L, K)`` (beam width, beam length, prompt-lookup beams in the
same tree) is ``tokens_per_step / (t_verify(N) + t_draft(W, L))`` tokens per unit time, with
``N`` the packed tree size. This module measures ``t_verify(N)`` (a tree forward over ``N``
tokens after a realistic context) and ``t_draft(W, L)`` (one beam search), measures tokens per
step and ``N`` for every candidate on a few prompts, predicts the best one
(:func:`predict_speedup`), confirms the top candidates by timing them against AR, and saves
the winner as this device's profile (read by ``generate``: :func:`mlx_redrafter.cli.beam_shape`
and :func:`mlx_redrafter.cli.lookup_beams_for`).
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_redrafter.cache import set_length
from mlx_redrafter.cli import with_lookup
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.engine import StepStats, stream_generate
from mlx_redrafter.models import weights_dtype
from mlx_redrafter.profile import save_profile, setup_key
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.target import Target
from mlx_redrafter.tree import pack

#: Beam widths ``bench --tune`` adds on devices where tree forwards are cheap.
WIDE_WIDTHS = (8, 16)
#: Tree size of the cheapness probe (a W8 L5 tree before prefix sharing) ...
WIDE_PROBE_SIZE = 33
#: ... and the cost ratio to one token under which wide beams are tried: a W8-W16 tree
#: accepts about 2 tokens per step (the shipped head on MT-Bench), so it cannot beat AR
#: where verifying it costs two decoding steps or more.
WIDE_PROBE_RATIO = 2.0


def widths_to_try(widths: list[int], costs: dict[int, float]) -> list[int]:
    """``widths``, plus :data:`WIDE_WIDTHS` when ``costs`` (seconds by tree size, with ``1``
    and :data:`WIDE_PROBE_SIZE`) say a tree forward is cheap (see :data:`WIDE_PROBE_RATIO`)."""
    if costs[WIDE_PROBE_SIZE] / costs[1] < WIDE_PROBE_RATIO:
        return sorted({*widths, *WIDE_WIDTHS})
    return sorted(set(widths))


def verify_costs(
    target: Target, sizes: list[int], context: int = 256, repeats: int = 5
) -> dict[int, float]:
    """Median seconds of a tree forward over ``N`` tokens (a chain) after ``context`` tokens."""
    cache = target.make_cache()
    prefix = mx.random.randint(0, target.vocab_size, (context,), key=mx.random.key(0))
    target.forward(prefix, cache)
    mx.eval([c.state for c in cache])
    costs = {}
    for n in sizes:
        tree = pack(np.arange(1, n + 1, dtype=np.int32)[None, :] % target.vocab_size)
        times = []
        for _ in range(repeats + 1):
            tic = time.perf_counter()
            logits, hidden = target.tree_forward(tree, cache)
            mx.eval(logits, hidden)
            times.append(time.perf_counter() - tic)
            set_length(cache, context)
        costs[n] = statistics.median(times[1:])
    return costs


def draft_cost(drafter, target: Target, width: int, length: int, repeats: int = 5) -> float:
    """Median seconds of one proposal of shape ``(W, L)``, from a hidden state in the
    target's activation dtype (what the drafter receives while decoding)."""
    dtype = target.embed(mx.array([0])).dtype
    hidden = mx.random.normal((target.hidden_size,), key=mx.random.key(1)).astype(dtype)
    context = DraftContext(hidden, mx.array(1, dtype=mx.int32), mx.array(0), [])
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        mx.eval(drafter.propose(context, width, length).beams)
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def acceptance_stats(model, tokenizer, drafter, prompts, params, width, length, max_tokens):
    """``(tokens per step, mean tree size)`` of shape ``(W, L)`` on ``prompts``."""
    stats = StepStats()
    produced = 0
    for prompt in prompts:
        before = stats.steps
        n = sum(
            1
            for _ in stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=max_tokens,
                drafter=drafter,
                beam_width=width,
                beam_length=length,
                sampler=params,
                stats=stats,
            )
        )
        produced += n - 1 if stats.steps > before else 0
    return produced / max(stats.steps, 1), float(np.mean(stats.tree_sizes or [1]))


def measured_speedup(
    model, tokenizer, drafter, prompts, params, width, length, max_tokens
) -> float:
    """Median over prompts of (our speculative tok/s) / (our AR tok/s), interleaved."""
    ratios = []
    for prompt in prompts:
        ar = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=params))[
            -1
        ]
        spec = list(
            stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=max_tokens,
                drafter=drafter,
                beam_width=width,
                beam_length=length,
                sampler=params,
            )
        )[-1]
        ratios.append(spec.generation_tps / ar.generation_tps)
    return statistics.median(ratios)


def predict_speedup(
    tokens_per_step: float, tree_size: float, t_draft: float, costs: dict[int, float]
) -> float:
    """Predicted speedup over AR: ``tokens_per_step / ((t_verify(N) + t_draft) / t_verify(1))``.

    ``t_verify`` is interpolated linearly between the measured sizes ``costs`` (seconds by
    ``N``, ``1`` included) and held at the largest one beyond them.
    """
    sizes = sorted(costs)
    t_verify = float(np.interp(tree_size, sizes, [costs[n] for n in sizes]))
    return tokens_per_step / ((t_verify + t_draft) / costs[1])


def tune(
    model,
    tokenizer,
    drafter,
    prompts: list[list[int]],
    params: SamplingParams,
    widths: list[int],
    lengths: list[int],
    max_tokens: int,
    confirm: int = 2,
    lookup_beams: list[int] | tuple[int, ...] = (0,),
    ngram: int = 3,
    setup: str | None = None,
    explore_wide: bool = False,
) -> dict:
    """Measure, predict, confirm, save; returns the report.

    Candidates are every ``(W, L)`` of ``widths`` x ``lengths`` with each count of
    ``lookup_beams`` (prompt-lookup beams of n-gram size ``ngram`` in the head's tree).
    With ``explore_wide``, :data:`WIDE_WIDTHS` join ``widths`` when a probe finds tree
    forwards cheap on this device (:func:`widths_to_try`).
    The winner is saved for ``setup`` (:func:`mlx_redrafter.profile.setup_key`; default:
    the default model and drafter).
    """
    if drafter is None:
        raise ValueError("--tune needs a drafter")
    target = Target(model)
    sample = prompts[: max(3, min(8, len(prompts)))]
    if explore_wide:
        widths = widths_to_try(widths, verify_costs(target, [1, WIDE_PROBE_SIZE]))
    largest = (max(widths) + max(lookup_beams)) * max(lengths)
    costs = verify_costs(target, sorted({1, *range(2, largest + 1)}))
    t_ar = costs[1]
    candidates = []
    drafters = {k: with_lookup(drafter, k, ngram) for k in lookup_beams}
    for lookup, combined in drafters.items():
        for width in widths:
            for length in lengths:
                per_step, size = acceptance_stats(
                    model, tokenizer, combined, sample, params, width, length, max_tokens
                )
                t_draft = draft_cost(combined, target, width, length)
                candidates.append(
                    {
                        "beam_width": width,
                        "beam_length": length,
                        "lookup_beams": lookup,
                        "tokens_per_step": per_step,
                        "tree_size": size,
                        "draft_cost": t_draft / t_ar,
                        "predicted_speedup": predict_speedup(per_step, size, t_draft, costs),
                    }
                )
    candidates.sort(key=lambda c: -c["predicted_speedup"])
    for cand in candidates[:confirm]:
        cand["measured_speedup"] = measured_speedup(
            model,
            tokenizer,
            drafters[cand["lookup_beams"]],
            sample,
            params,
            cand["beam_width"],
            cand["beam_length"],
            max_tokens,
        )
    best = max(candidates[:confirm], key=lambda c: c["measured_speedup"])
    report = {
        "verify_cost_vs_ar": {str(n): c / t_ar for n, c in costs.items()},
        "t_ar_ms": 1000 * t_ar,
        "beam_widths": list(widths),
        "candidates": candidates,
        "best": {k: best[k] for k in ("beam_width", "beam_length", "lookup_beams")},
    }
    path = save_profile(
        setup_key(None, None, dtype=weights_dtype(model)) if setup is None else setup,
        best["beam_width"],
        best["beam_length"],
        best["lookup_beams"],
        **report,
    )
    report["profile"] = str(path)
    return report
