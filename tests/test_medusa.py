"""Published Medusa-1 heads (both layouts) through the engine.

* A random checkpoint in the published layout (numpy + safetensors): each head's
  log-probabilities equal a float64 numpy reference of ``W_i(h + SiLU(A_i h + b_i))`` (v1:
  own ``W_i``; v2: the target's LM head), also after ``convert drafter``; beams over heads
  are the best paths by brute force; a ``medusa_choices`` tree holds each choice's ranks.
* Greedy output equals AR on three architectures (beams and a choices tree; a random head
  and one biased toward AR's continuation, so long blocks are accepted).
* At T = 1 a choices tree keeps the target's law (chi-square on the first two tokens);
  the walk with a naive residual fails the same test.
* A head for another hidden size or a missing key is one error line.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import walk_mutant
from safetensors.numpy import save_file
from test_eagle import _prompts, _tokens
from test_exact_sampling import PROMPT, Setup, engine_joint, goodness_of_fit, tvd_bound
from tiny_models import byte_tokenizer, tiny_model

from convert.cli import main as convert_main
from mlx_redrafter import accept
from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import MedusaDrafter, load_drafter
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.drafters.eagle import lm_head_rows
from mlx_redrafter.sampling import SamplingParams

HEADS, LAYERS = 4, 1
CHOICES = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


def write_medusa(
    path: Path, d: int, vocab: int, v2: bool, seed: int, scale: float = 1.0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for i in range(HEADS):
        for j in range(LAYERS):
            weights[f"{i}.{j}.linear.weight"] = scale * rng.standard_normal((d, d)) / np.sqrt(d)
            weights[f"{i}.{j}.linear.bias"] = 0.3 * rng.standard_normal(d)
        if not v2:
            weights[f"{i}.{LAYERS}.weight"] = scale * rng.standard_normal((vocab, d)) / np.sqrt(d)
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "medusa_lm_head.safetensors"))
    config = {
        "medusa_num_heads": HEADS,
        "medusa_num_layers": LAYERS,
        "base_model_name_or_path": "tiny",
    }
    (path / "config.json").write_text(json.dumps(config))
    return weights


def reference_log_probs(weights, hidden: np.ndarray, lm_head: np.ndarray) -> np.ndarray:
    """``(H, V)`` float64 log-probs of every head from the published equations."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    out = []
    for i in range(HEADS):
        x = hidden.astype(np.float64)
        for j in range(LAYERS):
            z = x @ w[f"{i}.{j}.linear.weight"].T + w[f"{i}.{j}.linear.bias"]
            x = x + z / (1.0 + np.exp(-z))
        table = w.get(f"{i}.{LAYERS}.weight", lm_head.astype(np.float64))
        logits = x @ table.T
        logits -= logits.max()
        out.append(logits - np.log(np.exp(logits).sum()))
    return np.array(out)


def _context(hidden: np.ndarray, root: int) -> DraftContext:
    return DraftContext(mx.array(hidden), mx.array(root), mx.array(0), [root])


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_heads_beams_and_tree_follow_the_published_math(v2, tmp_path):
    model = tiny_model("mistral", seed=2, vocab_size=96)  # untied LM head, d = 64
    weights = write_medusa(tmp_path / "medusa", 64, 96, v2, seed=1)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text('{"vocab_size": 96, "hidden_size": 64}')
    argv = ["drafter", str(tmp_path / "medusa"), str(tmp_path / "out")]
    assert convert_main([*argv, "--model", str(tmp_path / "target")]) == 0
    hidden = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    want = reference_log_probs(weights, hidden, np.array(model.lm_head.weight))
    for path in (tmp_path / "medusa", tmp_path / "out"):
        drafter = load_drafter(path, model)
        assert isinstance(drafter, MedusaDrafter)
        got = np.array(drafter.log_probs(_context(hidden, 5), HEADS))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # beams over heads: the W best paths of summed log-probs (brute force over the top 6)
    width, depth = 4, 3
    beams = np.array(drafter.propose(_context(hidden, 5), width, depth + 1).beams)
    tops = [np.argsort(-want[t])[:6] for t in range(depth)]
    paths = sorted(
        itertools.product(*tops), key=lambda p: -sum(want[t][p[t]] for t in range(depth))
    )
    assert beams[:, 0].tolist() == [5] * width
    assert [tuple(b) for b in beams[:, 1:].tolist()] == [tuple(map(int, p)) for p in paths[:width]]
    # a choices tree: each choice's tokens are the ranked tokens of its heads
    tree = MedusaDrafter(drafter.heads, drafter.rows, CHOICES).propose(_context(hidden, 5), 1, 4)
    tb, valid = np.array(tree.beams), np.array(tree.valid)
    kept = [c for c in CHOICES if len(c) <= 3]
    assert tb.shape == (len(kept), 4)
    for b, choice in enumerate(kept):
        ranked = [int(np.argsort(-want[t])[r]) for t, r in enumerate(choice)]
        assert tb[b, 1 : len(choice) + 1].tolist() == ranked
        assert valid[b].tolist() == [True] * (len(choice) + 1) + [False] * (3 - len(choice))


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(byte_tokenizer())


class OracleMedusa(MedusaDrafter):
    """Medusa heads whose log-probs at depth ``t`` favour AR's token ``t`` after the root,
    except at one depth of every third proposal."""

    def __init__(self, heads, rows, sequence: list[int], choices=None):
        super().__init__(heads, rows, choices)
        self.sequence = mx.array(sequence + [0] * 64, dtype=mx.int32)
        self.calls = 0

    def log_probs(self, context: DraftContext, depth: int) -> mx.array:
        self.calls += 1
        base = super().log_probs(context, depth)
        size = base.shape[-1]
        truth = self.sequence[context.position + 1 + mx.arange(depth)]
        if self.calls % 3 == 0:
            wrong = mx.arange(depth) == self.calls % depth
            truth = mx.where(wrong, (truth + 1) % size, truth)
        logits = base + 30.0 * (mx.arange(size)[None, :] == truth[:, None])
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_greedy_equals_ar(arch, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=3, scale=2.0, vocab_size=vocab)
    write_medusa(tmp_path / "v1", 64, vocab, False, seed=2)
    write_medusa(tmp_path / "v2", 64, vocab, True, seed=3)
    accepted = 0
    for i, prompt in enumerate(_prompts(1, vocab, 2)):
        ar = _tokens(model, tokenizer, prompt, 32)
        layout = "v1" if i == 0 else "v2"
        for choices, (width, length) in ((None, (3, 4)), (CHOICES, (1, 5))):
            plain = load_drafter(tmp_path / layout, model, medusa_choices=choices)
            oracle = OracleMedusa(plain.heads, plain.rows, prompt + ar, choices)
            for drafter in (plain, oracle):
                stats = gen.StepStats()
                out = _tokens(
                    model,
                    tokenizer,
                    prompt,
                    32,
                    drafter=drafter,
                    beam_width=width,
                    beam_length=length,
                    stats=stats,
                )
                assert out == ar, f"{arch} {layout} choices={choices is not None}"
                accepted += sum(stats.accepted)
    assert accepted > 2 * 32  # the oracle's blocks were accepted


# ----------------------------------------------------------------------------- sampling

SAMPLE_DRAWS = 300


class ProbableMedusa(MedusaDrafter):
    """Depth-1 log-probs are the target's own after the context with its favourite demoted
    to last, so the rejected children carry real mass and the residual matters."""

    def __init__(self, heads, rows, model, choices):
        super().__init__(heads, rows, choices)
        self.model = model

    def log_probs(self, context: DraftContext, depth: int) -> mx.array:
        lp = super().log_probs(context, depth)
        logits = self.model(mx.array(context.tokens)[None])[0, -1]
        logits = mx.where(logits == logits.max(), logits.min() - 10.0, logits)
        first = logits - mx.logsumexp(logits, keepdims=True)
        return mx.concatenate([first[None], lp[1:]])


def sampled_draws(setup: Setup, tokenizer, tmp_path: Path) -> np.ndarray:
    write_medusa(tmp_path / "m", 64, setup.model.args.vocab_size, True, seed=4)
    plain = load_drafter(tmp_path / "m", setup.model)
    drafter = ProbableMedusa(plain.heads, plain.rows, setup.model, CHOICES)
    drafter.needs_host_tokens = True  # log_probs reads context.tokens
    draws = []
    for i in range(SAMPLE_DRAWS):
        mx.random.seed(5000 + i)
        draws.append(
            _tokens(
                setup.model,
                tokenizer,
                PROMPT,
                2,
                sampler=SamplingParams(temp=1.0),
                drafter=drafter,
                beam_width=1,
                beam_length=4,
            )
        )
    return np.array(draws)


@pytest.fixture(scope="module")
def sampling_setup():
    return Setup(seed=0)


@pytest.mark.parametrize("broken", [False, True], ids=["exact", "naive-residual"])
def test_choices_tree_sampling_keeps_the_target_law(
    broken, sampling_setup, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    if broken:
        monkeypatch.setattr(accept, "_compiled_walk", walk_mutant("naive_residual"))
    joint = engine_joint(sampling_setup, SamplingParams(temp=1.0))
    draws = sampled_draws(sampling_setup, tokenizer, tmp_path)
    p_value, tvd, _ = goodness_of_fit(draws, joint)
    if broken:
        assert p_value < 1e-3, f"p={p_value:.3f} tvd={tvd:.4f}"
    else:
        assert p_value > 1e-3, f"p={p_value:.2e} tvd={tvd:.4f}"
        assert tvd < tvd_bound(joint, len(draws))


# ----------------------------------------------------------------------------- bad input


def test_mismatched_and_malformed_heads_are_refused(tmp_path):
    model = tiny_model("llama", seed=1, vocab_size=96)
    write_medusa(tmp_path / "narrow", 32, 96, False, seed=1)
    with pytest.raises(ValueError, match="hidden size 32.*hidden size 64"):
        load_drafter(tmp_path / "narrow", model)
    weights = write_medusa(tmp_path / "missing", 64, 96, False, seed=1)
    del weights["2.0.linear.bias"]
    save_file(weights, str(tmp_path / "missing" / "medusa_lm_head.safetensors"))
    with pytest.raises(ValueError, match=r"2\.0\.linear\.bias"):
        load_drafter(tmp_path / "missing", model)
    write_medusa(tmp_path / "ok", 64, 96, False, seed=1)
    with pytest.raises(ValueError, match="needs 5 Medusa heads"):
        load_drafter(tmp_path / "ok", model).propose(_context(np.zeros(64, np.float32), 1), 1, 6)
    assert lm_head_rows(model, None).shape == (96, 64)


# ----------------------------------------------------------------------------- CLI flag


def _cli(main, model_dir: Path, extra: list[str], capsys) -> tuple[int, str, str]:
    code = main(["--model", str(model_dir), "--max-tokens", "12", *extra])
    out, err = capsys.readouterr()
    return code, out.split("\nPrompt: ")[0], err


@pytest.fixture
def medusa_dir(tiny_model_dir, tmp_path) -> Path:
    target = json.loads((tiny_model_dir / "config.json").read_text())
    write_medusa(tmp_path / "medusa", target["hidden_size"], target["vocab_size"], False, 3)
    return tmp_path / "medusa"


def test_medusa_choices_flag_drafts_the_tree(
    tiny_model_dir, medusa_dir, tmp_path, capsys, monkeypatch
):
    """``--medusa-choices`` as JSON text and as a file reaches the drafter (its tree is
    drafted, each choice a beam) and the text is AR's."""
    from mlx_redrafter.generate import main as generate_main

    trees = []
    tree = MedusaDrafter._tree

    def recording(self, lp, root, depth):
        draft = tree(self, lp, root, depth)
        trees.append(int(draft.beams.shape[0]))
        return draft

    monkeypatch.setattr(MedusaDrafter, "_tree", recording)
    (tmp_path / "choices.json").write_text(json.dumps(CHOICES))
    code, ar, _ = _cli(generate_main, tiny_model_dir, ["--drafter", "none"], capsys)
    assert code == 0 and not trees
    for value, beams in (("[[0],[0,0],[1]]", 3), (str(tmp_path / "choices.json"), 8)):
        flags = ["--drafter", str(medusa_dir), "--beam-length", "4", "--medusa-choices", value]
        code, out, err = _cli(generate_main, tiny_model_dir, flags, capsys)
        assert code == 0 and out == ar, err
        assert trees and set(trees) == {beams}  # CHOICES: 8 paths fit 3 ranks
        trees.clear()


@pytest.mark.parametrize(
    "value, named",
    [
        ("[[0],[-1]]", "ranks >= 0"),
        ("[]", "non-empty JSON list"),
        ('[[0], "a"]', "lists of ranks"),
        ("[[0],", "not valid JSON"),
        ("choices.json", "nor an existing file"),
        ("[[0, 0, 0, 0, 0]]", "no medusa_choices path fits beam length 4"),
    ],
)
def test_bad_medusa_choices_are_one_line(value, named, tiny_model_dir, medusa_dir, capsys):
    from mlx_redrafter.generate import main as generate_main

    flags = ["--drafter", str(medusa_dir), "--beam-length", "4", "--medusa-choices", value]
    code, _, err = _cli(generate_main, tiny_model_dir, flags, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], err


def test_medusa_choices_need_a_medusa_head(tiny_model_dir, head_dir, capsys):
    from mlx_redrafter.bench import main as bench_main
    from mlx_redrafter.generate import main as generate_main

    flags = ["--drafter", str(head_dir), "--medusa-choices", "[[0]]"]
    code, _, err = _cli(generate_main, tiny_model_dir, flags, capsys)
    assert code == 2 and "Medusa heads only" in err and len(err.strip().splitlines()) == 1
    bench = ["--model", str(tiny_model_dir), "--prompts", "unused.jsonl", *flags[:2]]
    code = bench_main([*bench, "--medusa-choices", "[[0],"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not valid JSON" in err[0]
