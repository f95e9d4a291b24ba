"""The AR baseline reproduces mlx-lm token for token, and the CLI prints mlx-lm's stats."""

import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from mlx_redrafter import engine as gen
from mlx_redrafter.sampling import SamplingParams


def _ours(model, tok, prompt, **kw):
    return [r.token for r in gen.stream_generate(model, tok, prompt, **kw)]


def _theirs(model, tok, prompt, max_tokens, **sampler_kw):
    sampler = make_sampler(**sampler_kw)
    return [
        r.token
        for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=max_tokens, sampler=sampler)
    ]


@pytest.mark.parametrize(
    "sampling",
    [
        {"temp": 0.0},
        {"temp": 1.0},
        {"temp": 0.7, "top_p": 0.9},
        {"temp": 1.3, "top_k": 5, "min_p": 0.05},
    ],
)
def test_ar_matches_mlx_lm(tiny_model_dir, sampling):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    for prompt in ["the cat", "hello world 1", "a"]:
        mx.random.seed(7)
        want = _theirs(model, tok, prompt, 40, **sampling)
        mx.random.seed(7)
        got = _ours(model, tok, prompt, max_tokens=40, **sampling)
        assert got == want


def _mlx_lm_weights(logprobs, temp, top_p=0.0, min_p=0.0, top_k=0):
    """What mlx-lm's ``make_sampler`` hands to ``mx.random.categorical``, step by step."""
    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    if min_p:
        logprobs = apply_min_p(logprobs, min_p)
    if top_k:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs * (1 / temp)


@pytest.mark.parametrize(
    "sampling",
    [{"temp": 0.7, "top_p": 0.9}, {"temp": 1.3, "top_k": 5, "min_p": 0.05}, {"temp": 1.0}],
)
def test_ar_sampler_weights_are_bit_identical_to_mlx_lm(sampling):
    """The AR step's log-weights equal mlx-lm's bit for bit, on many random distributions.

    A second normalisation of the log-probs (what ``SamplingParams.logits`` does to raw
    logits) shifts every entry by a rounding error: the same check on it must fail, so the
    test sees the difference that once moved a token across the top-p boundary.
    """
    params = SamplingParams(**sampling)
    rng = np.random.default_rng(0)
    renormalised_differs = False
    for _ in range(20):
        logits = mx.array((rng.standard_normal((1, 257)) * 3).astype(np.float32))
        logprobs = logits - mx.logsumexp(logits, keepdims=True)  # generate_step's arithmetic
        want = np.array(_mlx_lm_weights(logprobs, **sampling))
        assert np.array_equal(np.array(params.warp(logprobs)), want)
        renormalised_differs |= not np.array_equal(np.array(params.logits(logprobs)), want)
    assert renormalised_differs


def test_response_fields_match_mlx_lm(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    ours = list(gen.stream_generate(model, tok, "the cat", max_tokens=12))
    theirs = list(mlx_lm.stream_generate(model, tok, "the cat", max_tokens=12))
    assert [r.text for r in ours] == [r.text for r in theirs]
    assert [r.generation_tokens for r in ours] == [r.generation_tokens for r in theirs]
    assert ours[-1].finish_reason == theirs[-1].finish_reason
    assert ours[-1].prompt_tokens == theirs[-1].prompt_tokens


def test_prompt_beyond_context_is_refused(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    model.args.max_position_embeddings = 8
    with pytest.raises(ValueError, match="does not fit the model's context"):
        list(gen.stream_generate(model, tok, list(range(1, 20)), max_tokens=4))


def _cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args],
        capture_output=True,
        text=True,
        input=stdin,
    )


def test_cli_prints_text_then_stats(tiny_model_dir):
    out = _cli(
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "-",
        "--max-tokens",
        "10",
        "--drafter",
        "none",
        stdin="the cat",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-3].startswith("Prompt: ") and "tokens-per-sec" in lines[-3]
    assert lines[-2].startswith("Generation: 10 tokens, ")
    assert lines[-1].startswith("Peak memory: ") and lines[-1].endswith(" GB")


def test_cli_missing_model_is_one_clear_line(tmp_path):
    out = _cli("--model", str(tmp_path / "nope"), "--drafter", "none")
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "model path not found" in err[0]


def test_package_generate_stays_callable_after_the_cli_module_is_imported(tiny_model_dir):
    """``import mlx_redrafter.generate`` rebinds the package attribute ``generate`` to the
    CLI module; the module is callable as the function, so both import orders work."""
    code = (
        "import mlx_redrafter, mlx_lm, sys\n"
        "from mlx_redrafter import generate as before\n"
        "import mlx_redrafter.generate\n"
        "from mlx_redrafter import generate as after\n"
        "m, t = mlx_lm.load(sys.argv[1])\n"
        "a = before(m, t, 'the cat', max_tokens=8)\n"
        "b = after(m, t, 'the cat', max_tokens=8)\n"
        "print(type(after).__name__, a == b and len(a) > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["_CallableModule", "True"]
