"""The first divergence from AR and the target's top-two logit gap there, as ``bench`` reports them."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mutants import mutant
from tiny_models import tiny_model

from mlx_redrafter import bench, divergence
from mlx_redrafter.divergence import first_divergence, logit_gap_at

PROMPT = [3, 17, 42, 8, 55, 21, 9]
STEPS = 12


@pytest.fixture(scope="module")
def greedy_walk():
    """A tiny target, its greedy AR tokens and the top-two gap of every step, computed
    token by token with a KV cache (another path than the one-forward function)."""
    model = tiny_model("llama", seed=3)
    cache = make_prompt_cache(model)
    logits = model(mx.array([PROMPT]), cache=cache)[0, -1]
    tokens, gaps = [], []
    for _ in range(STEPS):
        row = np.asarray(logits.astype(mx.float32))
        ranked = np.sort(row)
        gaps.append(float(ranked[-1] - ranked[-2]))
        tokens.append(int(row.argmax()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
    return model, tokens, gaps


def test_first_divergence_positions():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [7, 2, 3]) == 0
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_logit_gap_equals_a_token_by_token_recomputation(greedy_walk):
    model, tokens, gaps = greedy_walk
    got = [logit_gap_at(model, PROMPT, tokens, k) for k in range(STEPS)]
    np.testing.assert_allclose(got, gaps, rtol=1e-4, atol=1e-5)
    # negative control: one AR token too many in the forward gives other gaps
    shifted = mutant(logit_gap_at, "list(ar_tokens[:position])", "list(ar_tokens[: position + 1])")
    wrong = [shifted(model, PROMPT, tokens, k) for k in range(STEPS - 1)]
    assert not np.allclose(wrong, gaps[: STEPS - 1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="position 13"):
        logit_gap_at(model, PROMPT, tokens, STEPS + 1)


class _Named(bench.Method):
    def __init__(self, name: str) -> None:
        self.name = name


def _run(method: str, prompt: int, tokens: list[int]) -> bench.Run:
    return bench.Run(method, prompt, "", tokens, 1.0, len(tokens), [], [], 0.0)


def _reported(model, tokens, diverge_at):
    """``bench.summarize`` over an AR run and three runs of a speculative method: one equal
    to AR, one with token ``diverge_at`` changed, one cut short at ``diverge_at``."""
    other = (tokens[diverge_at] + 1) % 96
    changed = tokens[:diverge_at] + [other] + tokens[diverge_at + 1 :]
    runs = [
        _run("AR", 0, tokens),
        _run("spec", 0, tokens),
        _run("spec", 0, changed),
        _run("spec", 0, tokens[:diverge_at]),
    ]
    rows = bench.summarize(runs, [_Named("AR"), _Named("spec")], True, {}, model, [PROMPT])
    return rows, other


def _report_is_right(rows, other, tokens, gaps, k) -> bool:
    spec = rows[1]
    want = [
        {"prompt": 0, "position": k, "ar_token": tokens[k], "token": other},
        {"prompt": 0, "position": k, "ar_token": tokens[k], "token": None},
    ]
    found = [{key: d[key] for key in want[0]} for d in spec["divergences"]]
    return (
        spec["mismatches"] == 2
        and found == want
        and all(abs(d["ar_logit_gap"] - gaps[k]) < 1e-4 for d in spec["divergences"])
        and rows[0]["divergences"] == []
    )


def test_bench_reports_each_mismatch_with_position_and_gap(greedy_walk, monkeypatch):
    model, tokens, gaps = greedy_walk
    k = 5
    rows, other = _reported(model, tokens, k)
    assert _report_is_right(rows, other, tokens, gaps, k), rows[1]["divergences"]
    line = bench.divergence_line(rows[1])
    assert line.startswith("spec: 2 mismatches;") and f"token {k} " in line
    assert f"AR logit gap {gaps[k]:.4g}" in line
    assert bench.divergence_line(rows[0]) is None
    # negative control: a first divergence reported one token late
    late = mutant(first_divergence, "return position\n", "return position + 1\n")
    monkeypatch.setattr(divergence, "first_divergence", late)
    rows, other = _reported(model, tokens, k)
    assert not _report_is_right(rows, other, tokens, gaps, k)


def test_bench_lists_no_divergences_for_lossless_methods(tiny_model_dir, head_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat, the cat"}\n{"prompt": "hello"}\n')
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--drafter", str(head_dir), "--prompts", str(prompts)]
    argv += ["--max-tokens", "10", "--beam-width", "2", "--beam-length", "3"]
    argv += ["--lookup-beams", "0", "--out", str(out), "--profile-prompts", "0"]
    assert bench.main(argv) == 0  # also: no profiled pass, no time split
    rows = json.loads((out / "bench.json").read_text())["summary"]
    assert len(rows) == 3 and all(r["mismatches"] == 0 for r in rows)
    assert all(r["divergences"] == [] and "time_split_ms" not in r for r in rows)
