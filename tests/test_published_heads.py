"""Published EAGLE-1/2 heads (SafeAILab's layout) on mlx-lm targets.

* A random checkpoint written in the published layout with numpy + safetensors (no torch):
  converted with ``python -m convert drafter`` and loaded directly, its features and logits
  (teacher-forced) and every candidate the drafter grows over 3 depths (fed-back features)
  equal a float64 numpy reference of the published equations, computed from the raw
  arrays written to the file and the published config's own defaults (``bias`` true when
  absent, ``rope_theta`` 10000 when absent); with and without the fc bias.
* Greedy output equals AR through the engine on three architectures (chain, beams, EAGLE-2
  dynamic trees), and ``generate --drafter PUBLISHED_DIR`` prints AR's text.
* Mismatches and bad files are one error line naming the problem, exit code 2: hidden
  size, vocabulary (the embedding copy), a missing weight, ``pytorch_model.bin`` without
  torch, a Hub repo id offline, and a truncated ``model.safetensors`` for a published,
  a converted and a ReDrafter head.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import mutant
from safetensors.numpy import save_file
from test_eagle import SHAPES, OracleEagle, Reference, _prompts, _tokens
from tiny_models import byte_tokenizer, tiny_model

from convert.cli import main as convert_main
from mlx_redrafter import accept
from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import EagleDrafter, load_drafter
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.drafters.eagle_head import is_eagle_dir
from mlx_redrafter.drafters.published import published_kind
from mlx_redrafter.generate import main as generate_main

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

# ----------------------------------------------------------------------------- checkpoints


def published_config(d: int, vocab: int, bias: bool | None, rope_theta: float | None) -> dict:
    """A SafeAILab-style ``config.json`` (``bias`` / ``rope_theta`` left out when None)."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": d,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": vocab,
    }
    if bias is not None:
        raw["bias"] = bias
    if rope_theta is not None:
        raw["rope_theta"] = rope_theta
    return raw


def published_weights(raw: dict, embed: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Random float32 tensors under the published names (``embed_tokens.weight``: ``embed``)."""
    rng = np.random.default_rng(seed)
    d, inter = raw["hidden_size"], raw["intermediate_size"]
    hd = d // raw["num_attention_heads"]
    q, kv = raw["num_attention_heads"] * hd, raw["num_key_value_heads"] * hd
    shapes = {
        "fc.weight": (d, 2 * d),
        "layers.0.self_attn.q_proj.weight": (q, d),
        "layers.0.self_attn.k_proj.weight": (kv, d),
        "layers.0.self_attn.v_proj.weight": (kv, d),
        "layers.0.self_attn.o_proj.weight": (d, q),
        "layers.0.mlp.gate_proj.weight": (inter, d),
        "layers.0.mlp.up_proj.weight": (inter, d),
        "layers.0.mlp.down_proj.weight": (d, inter),
    }
    out = {k: rng.standard_normal(s) / np.sqrt(s[-1]) for k, s in shapes.items()}
    out["layers.0.post_attention_layernorm.weight"] = 1.0 + 0.2 * rng.standard_normal(d)
    if raw.get("bias", True):
        out["fc.bias"] = 0.3 * rng.standard_normal(d)
    out["embed_tokens.weight"] = embed
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_published(path: Path, raw: dict, weights: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"), {"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw))
    return path


def embedding_table(model) -> np.ndarray:
    return np.array(model.model.embed_tokens.weight)


class PublishedReference(Reference):
    """:class:`test_eagle.Reference` (float64 numpy) on the raw published arrays, with the
    published config's defaults read here: ``bias`` true and ``rope_theta`` 10000 when
    absent, ``head_dim = d / H``; the embedding is the file's own copy."""

    def __init__(self, raw: dict, weights: dict[str, np.ndarray], rows: np.ndarray):
        heads = raw["num_attention_heads"]
        self.cfg = SimpleNamespace(
            rope_theta=raw.get("rope_theta", 10000.0),
            bias=raw.get("bias", True),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw["hidden_size"] // heads,
            rms_norm_eps=raw["rms_norm_eps"],
            own_head=False,
        )
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.embed_table = self.w["embed_tokens.weight"]
        self.rows = np.asarray(rows, dtype=np.float64)


# ----------------------------------------------------------------------------- math

V = 96


def _context(drafter: EagleDrafter, features: np.ndarray, tokens: np.ndarray) -> DraftContext:
    """Prime all but the last 5 entries; the engine's context at root ``tokens[n]``."""
    n, c = features.shape[0], 5
    primed = n - c + 2
    drafter.reset([])
    drafter.prime(mx.array(features[:primed]), mx.array(tokens[1 : primed + 1]))
    return DraftContext(
        hidden=mx.array(features[-1]),
        root=mx.array(tokens[n]),
        position=mx.array(n, dtype=mx.int32),
        tokens=tokens[: n + 1].tolist(),
        recent_hidden=mx.array(features[n - c :]),
        recent_count=mx.array(c, dtype=mx.int32),
        recent_tokens=mx.array(tokens[n - c + 1 : n + 1]),
    )


@pytest.mark.parametrize(
    "bias, rope_theta", [(None, 500.0), (False, None)], ids=["bias-absent", "no-bias"]
)
def test_published_head_equals_the_published_math(bias, rope_theta, tmp_path, capsys):
    model = tiny_model("mistral", seed=2, vocab_size=V)  # untied LM head, d = 64
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(
        json.dumps({"vocab_size": V, "hidden_size": 64})
    )
    raw = published_config(64, V, bias, rope_theta)
    weights = published_weights(raw, embedding_table(model), seed=3)
    src = write_published(tmp_path / "published", raw, weights)
    assert published_kind(src) == "eagle" and not is_eagle_dir(src)
    dst = tmp_path / "converted"
    assert convert_main(["drafter", str(src), str(dst), "--model", str(tmp_path / "target")]) == 0
    assert is_eagle_dir(dst) and "embed_tokens.weight" not in mx.load(
        str(dst / "model.safetensors")
    )
    ref = PublishedReference(raw, weights, np.array(model.lm_head.weight))
    rng = np.random.default_rng(0)
    n = 9
    features = rng.standard_normal((n, 64)).astype(np.float32)
    tokens = rng.integers(0, V, size=n + 1).astype(np.int32)
    for path in (src, dst):
        drafter = load_drafter(path, model)
        assert isinstance(drafter, EagleDrafter)
        # teacher-forced features and logits
        positions = np.arange(n) + 2
        out = drafter.head(
            drafter.embed(mx.array(tokens[1:]))[None],
            mx.array(features)[None],
            mx.array(positions),
            "causal",
        )[0]
        want = ref.layer(ref.entries(tokens[1:], features), positions)
        np.testing.assert_allclose(np.array(out), want, rtol=1e-4, atol=1e-4)
        logits = drafter.head.logits(out, drafter.rows)
        np.testing.assert_allclose(np.array(logits), ref.logits(want), rtol=1e-4, atol=2e-4)
        # every grown node over 3 depths (fed-back features) scores its reference path
        cand = drafter.grow(_context(drafter, features, tokens), 2, 3)
        mx.eval(cand.paths, cand.scores, cand.depth)
        paths, scores, depths = (np.array(a) for a in (cand.paths, cand.scores, cand.depth))
        for p, score, dep in zip(paths, scores, depths, strict=True):
            lp = ref.path_log_probs(features, tokens[1:], [int(t) for t in p[:dep]])
            np.testing.assert_allclose(score, sum(lp), rtol=1e-4, atol=1e-4)
        assert set(depths.tolist()) == {1, 2, 3}


def test_the_reference_sees_a_wrong_default(tmp_path):
    """Power: reading ``bias`` as false when absent (the head keeps its fc bias, the
    reference drops it) moves the features far beyond the tolerance."""
    model = tiny_model("mistral", seed=2, vocab_size=V)
    raw = published_config(64, V, None, None)
    weights = published_weights(raw, embedding_table(model), seed=3)
    drafter = load_drafter(write_published(tmp_path / "p", raw, weights), model)
    wrong = PublishedReference({**raw, "bias": False}, weights, np.array(model.lm_head.weight))
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4, 64)).astype(np.float32)
    tokens = rng.integers(0, V, size=4).astype(np.int32)
    out = drafter.head(
        drafter.embed(mx.array(tokens))[None], mx.array(features)[None], mx.arange(4), "causal"
    )[0]
    want = wrong.layer(wrong.entries(tokens, features), np.arange(4))
    assert np.abs(np.array(out) - want).max() > 1e-2


# ----------------------------------------------------------------------------- engine

ARCHS = ["llama", "qwen3", "gemma3_text"]


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(byte_tokenizer())


def greedy_runs(arch: str, tokenizer, tmp_path: Path) -> list[tuple[list[int], list[int], int]]:
    """``(AR tokens, speculative tokens, accepted drafts)`` on ``arch`` for each prompt and
    shape: the published head loaded from its directory as a user would (random: few
    drafts accepted), and the same head under :class:`test_eagle.OracleEagle`'s bias
    toward AR's continuation (long blocks accepted, a wrong token every third step)."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=3, scale=2.0, vocab_size=vocab)
    raw = published_config(64, vocab, None, 10000.0)
    src = write_published(
        tmp_path / "head", raw, published_weights(raw, embedding_table(model), seed=4)
    )
    runs = []
    for i, prompt in enumerate(_prompts(ARCHS.index(arch), vocab, 2)):
        ar = _tokens(model, tokenizer, prompt, 32)
        for width, length, nodes in SHAPES[i::2]:
            published = load_drafter(src, model, tree_nodes=nodes)
            oracle = OracleEagle(model, prompt + ar, seed=i, tree_nodes=nodes)
            oracle.head = published.head
            for drafter in (published, oracle):
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
                runs.append((ar, out, sum(stats.accepted)))
    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_ar(arch, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    runs = greedy_runs(arch, tokenizer, tmp_path)
    for ar, out, _ in runs:
        assert out == ar
    assert sum(accepted for *_, accepted in runs) > 32 * len(runs) // 4


def test_greedy_check_has_teeth(tokenizer, tmp_path, monkeypatch):
    """Power: an acceptance that takes one drafted token past the first mismatch breaks
    the equality on the same runs."""
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    broken = mutant(
        accept.accept_greedy,
        "num = lengths[best]",
        "num = mx.minimum(lengths[best] + 1, unpack.shape[1] - 1)",
    )
    monkeypatch.setattr(gen, "accept_greedy", broken)
    assert any(out != ar for ar, out, _ in greedy_runs("llama", tokenizer, tmp_path))


def _generate(model_dir: Path, drafter: str, capsys) -> tuple[int, str, str]:
    code = generate_main(
        ["--model", str(model_dir), "--prompt", "the cat sat", "--max-tokens", "16"]
        + ["--drafter", drafter, "--beam-width", "2", "--beam-length", "4"]
    )
    out, err = capsys.readouterr()
    return code, out.split("\nPrompt: ")[0], err


def tiny_target_published(tiny_model_dir: Path, path: Path, **changes) -> Path:
    """A published head for ``tiny_model_dir`` (its config changed by ``changes``)."""
    target = json.loads((tiny_model_dir / "config.json").read_text())
    raw = published_config(target["hidden_size"], target["vocab_size"], None, None) | changes
    embed = np.zeros((raw["vocab_size"], raw["hidden_size"]), dtype=np.float32)
    return write_published(path, raw, published_weights(raw, embed, seed=5))


def test_generate_with_a_published_dir_prints_ar_text(tiny_model_dir, tmp_path, capsys):
    src = tiny_target_published(tiny_model_dir, tmp_path / "head")
    code, spec, _ = _generate(tiny_model_dir, str(src), capsys)
    ar_code, ar, _ = _generate(tiny_model_dir, "none", capsys)
    assert code == ar_code == 0 and spec == ar and len(ar) > 5


# ----------------------------------------------------------------------------- bad input


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _converted(argv: list[str], capsys) -> tuple[int, str]:
    code = convert_main(["drafter", *argv])
    return code, capsys.readouterr().err


def _generate_error(model_dir: Path, drafter: str, capsys) -> str:
    """The one error line of ``generate --drafter drafter`` (exit code 2)."""
    code, _, err = _generate(model_dir, drafter, capsys)
    assert code == 2, err
    return _one_line(err)


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(hidden_size=32), ("hidden size 32", "hidden size 64")),
        (dict(vocab_size=120), ("vocabulary 120", "vocabulary")),
    ],
)
def test_a_head_for_another_target_is_refused(changes, named, tiny_model_dir, tmp_path, capsys):
    src = tiny_target_published(tiny_model_dir, tmp_path / "head", **changes)
    code, err = _converted(
        [str(src), str(tmp_path / "out"), "--model", str(tiny_model_dir)], capsys
    )
    line = _one_line(err)
    assert code == 2 and all(s in line for s in named), line
    line = _generate_error(tiny_model_dir, str(src), capsys)
    assert all(s in line for s in named), line


def test_malformed_published_heads_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    src = tiny_target_published(tiny_model_dir, tmp_path / "head")
    weights = dict(mx.load(str(src / "model.safetensors")))
    cases = {}
    # a missing weight
    bad = write_published(tmp_path / "missing", json.loads((src / "config.json").read_text()), {})
    mx.save_safetensors(
        str(bad / "model.safetensors"),
        {k: v for k, v in weights.items() if k != "layers.0.mlp.up_proj.weight"},
    )
    cases[bad] = "up_proj"
    # the embedding copy disagrees with the config
    bad = tmp_path / "embed"
    shutil.copytree(src, bad)
    mx.save_safetensors(
        str(bad / "model.safetensors"), {**weights, "embed_tokens.weight": mx.zeros((7, 64))}
    )
    cases[bad] = "embed_tokens.weight of shape (7, 64)"
    for path, named in cases.items():
        code, err = _converted([str(path), str(tmp_path / "out")], capsys)
        assert code == 2 and named in _one_line(err), err
        assert named in _generate_error(tiny_model_dir, str(path), capsys)


def test_torch_file_without_torch_names_the_extra(tiny_model_dir, tmp_path, capsys, monkeypatch):
    src = tiny_target_published(tiny_model_dir, tmp_path / "head")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    code, err = _converted([str(src), str(tmp_path / "out")], capsys)
    line = _one_line(err)
    assert code == 2 and "pytorch_model.bin" in line and "mlx-redrafter[torch]" in line
    assert "mlx-redrafter[torch]" in _generate_error(tiny_model_dir, str(src), capsys)


def test_a_hub_repo_id_offline_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _converted(["someone/eagle-head", str(tmp_path / "out")], capsys)
    line = _one_line(err)
    assert code == 2 and "someone/eagle-head" in line and "Hugging Face" in line
    assert "someone/eagle-head" in _generate_error(tiny_model_dir, "someone/eagle-head", capsys)


@pytest.mark.parametrize("kind", ["published", "converted", "redrafter"])
def test_a_truncated_weights_file_is_one_line(kind, tiny_model_dir, head_dir, tmp_path, capsys):
    src = tiny_target_published(tiny_model_dir, tmp_path / "published")
    if kind == "converted":
        assert _converted([str(src), str(tmp_path / "converted")], capsys)[0] == 0
        src = tmp_path / "converted"
    elif kind == "redrafter":
        src = Path(shutil.copytree(head_dir, tmp_path / "redrafter"))
    file = src / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    line = _generate_error(tiny_model_dir, str(src), capsys)
    assert str(file) in line or (str(src) in line and "model.safetensors" in line), line
