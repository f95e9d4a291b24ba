"""Published EAGLE-3 heads on mlx-lm targets.

* A random checkpoint in the published layout (numpy + safetensors, no torch), with a
  permuted draft vocabulary (non-trivial ``d2t``), with and without ``embed_tokens``
  (without: the target's embedding; with: a head wider than the target, ``d = 3 d_t``):
  loaded directly and after ``python -m convert drafter``, its teacher-forced outputs and
  logits, and every candidate the drafter grows over 4 depths (fed-back outputs, draft ids
  mapped through ``d2t``), equal a float64 numpy reference of the published equations.
* The target's taps are the inputs of layers ``2, L//2, L-3`` (a manual layer loop).
* Greedy output equals AR on three architectures (chain, beams, dynamic trees), with the
  random head and an oracle-like one (more than one token accepted per step on average).
* A second turn on a prompt cache equals a fresh run.
* Mismatches are refused with one line naming them; a truncated file names the file.
* Mutants (wrong tap layer, no hidden_norm, fc applied at depth 2, d2t ignored) fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import mutant
from safetensors.numpy import save_file
from test_eagle import SHAPES, OracleEagle, _prompts, _tokens
from test_published_heads import _context, _generate_error, _one_line
from tiny_models import byte_tokenizer, save_tiny_model_dir, tiny_model

import mlx_redrafter.drafters.eagle as eagle_module
from convert.cli import main as convert_main
from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import EagleDrafter, load_drafter
from mlx_redrafter.drafters.eagle3_head import Eagle3Head
from mlx_redrafter.drafters.published import published_kind
from mlx_redrafter.prompt_cache import make_prompt_cache
from mlx_redrafter.target import Target

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

V, DT, LAYERS, K = 96, 64, 8, 72

# ----------------------------------------------------------------------------- checkpoints


def eagle3_config(d: int, vocab: int = V, k: int = K, target_hidden: int = DT) -> dict:
    """A published EAGLE-3 ``config.json``."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": d,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500.0,
        "vocab_size": vocab,
        "draft_vocab_size": k,
        "target_hidden_size": target_hidden,
        "torch_dtype": "float32",
    }


def draft_ids(seed: int, vocab: int = V, k: int = K) -> np.ndarray:
    """``(K,)`` target ids of the draft ids, in a random (non-monotone) order."""
    return np.random.default_rng(seed).permutation(vocab)[:k]


def eagle3_weights(raw: dict, ids: np.ndarray, seed: int, embed: bool) -> dict[str, np.ndarray]:
    """Random tensors under the published names; ``d2t`` / ``t2d`` encode ``ids``."""
    rng = np.random.default_rng(seed)
    d, dt, inter = raw["hidden_size"], raw["target_hidden_size"], raw["intermediate_size"]
    hd = d // raw["num_attention_heads"]
    q, kv = raw["num_attention_heads"] * hd, raw["num_key_value_heads"] * hd
    a = "midlayer.self_attn."
    shapes = {
        "fc.weight": (d, 3 * dt),
        a + "q_proj.weight": (q, 2 * d),
        a + "k_proj.weight": (kv, 2 * d),
        a + "v_proj.weight": (kv, 2 * d),
        a + "o_proj.weight": (d, q),
        "midlayer.mlp.gate_proj.weight": (inter, d),
        "midlayer.mlp.up_proj.weight": (inter, d),
        "midlayer.mlp.down_proj.weight": (d, inter),
        "lm_head.weight": (ids.size, d),
    }
    w = {k: rng.standard_normal(s) / np.sqrt(s[-1]) for k, s in shapes.items()}
    for norm in ("hidden_norm", "input_layernorm", "post_attention_layernorm"):
        w[f"midlayer.{norm}.weight"] = 1.0 + 0.3 * rng.standard_normal(d)
    w["norm.weight"] = 1.0 + 0.3 * rng.standard_normal(d)
    if embed:
        w["embed_tokens.weight"] = rng.standard_normal((raw["vocab_size"], d))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    w["d2t"] = (ids - np.arange(ids.size)).astype(np.int64)
    t2d = np.zeros(raw["vocab_size"], dtype=bool)
    t2d[ids] = True
    w["t2d"] = t2d
    return w


def write(path: Path, raw: dict, weights: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"), {"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw))
    return path


# ----------------------------------------------------------------------------- reference


class Reference:
    """The published EAGLE-3 equations in float64 numpy (Hugging Face Llama attention:
    ``rotate_half`` RoPE, key-value head ``h // (H / Hkv)``, scale ``hd^-1/2``)."""

    def __init__(self, raw: dict, w: dict[str, np.ndarray], target_embed: np.ndarray, ids):
        self.raw = raw
        self.w = {k: v.astype(np.float64) for k, v in w.items() if k not in ("d2t", "t2d")}
        self.table = self.w.get("embed_tokens.weight", np.asarray(target_embed, np.float64))
        self.ids = np.asarray(ids)

    def _rms(self, x: np.ndarray, name: str) -> np.ndarray:
        eps = self.raw["rms_norm_eps"]
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * self.w[name]

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        hd = x.shape[-1]
        inv = 1.0 / self.raw["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        emb = np.concatenate([np.outer(positions, inv)] * 2, axis=-1)
        rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1)
        return x * np.cos(emb) + rotated * np.sin(emb)

    def fc(self, taps: np.ndarray) -> np.ndarray:
        return np.asarray(taps, np.float64) @ self.w["fc.weight"].T

    def layer(self, g: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Causal layer over residuals ``g`` ``(n, d)`` paired with ``tokens``: ``y (n, d)``."""
        r, w, p = self.raw, self.w, "midlayer."
        n, heads, kvh = g.shape[0], r["num_attention_heads"], r["num_key_value_heads"]
        hd = r["hidden_size"] // heads
        z = np.concatenate(
            [
                self._rms(self.table[tokens], p + "input_layernorm.weight"),
                self._rms(g, p + "hidden_norm.weight"),
            ],
            axis=-1,
        )

        def proj(name: str, count: int) -> np.ndarray:
            y = z @ w[f"{p}self_attn.{name}.weight"].T
            return y.reshape(n, count, hd).transpose(1, 0, 2)

        q = self._rope(proj("q_proj", heads), positions)
        k = self._rope(proj("k_proj", kvh), positions)
        v = proj("v_proj", kvh)
        causal = np.tril(np.ones((n, n), dtype=bool))
        outs = []
        for h in range(heads):
            s = np.where(causal, q[h] @ k[h // (heads // kvh)].T / np.sqrt(hd), -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            outs.append(e / e.sum(-1, keepdims=True) @ v[h // (heads // kvh)])
        h = g + np.concatenate(outs, axis=-1) @ w[p + "self_attn.o_proj.weight"].T
        x = self._rms(h, p + "post_attention_layernorm.weight")
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        return h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T

    def logits(self, y: np.ndarray) -> np.ndarray:
        return self._rms(y, "norm.weight") @ self.w["lm_head.weight"].T

    def path_log_probs(self, taps: np.ndarray, next_tokens: np.ndarray, path: list[int]):
        """Log-prob of each drafted target id of ``path``: the depth-``t`` entry pairs the
        depth ``t-1`` output ``y`` itself (no fc) with its token, one position later."""
        gs, toks, out = list(self.fc(taps)), list(next_tokens), []
        for token in path:
            y = self.layer(np.array(gs), np.array(toks), np.arange(len(toks)))[-1]
            z = self.logits(y)
            z = z - z.max()
            lp = z - np.log(np.exp(z).sum())
            out.append(float(lp[int(np.flatnonzero(self.ids == token)[0])]))
            gs.append(y)
            toks.append(token)
        return out


# ----------------------------------------------------------------------------- math


def target(arch: str = "mistral", seed: int = 2, **kw):
    return tiny_model(arch, seed=seed, vocab_size=V, num_hidden_layers=LAYERS, **kw)


def check_math(tmp_path: Path, embed: bool) -> None:
    """Raises AssertionError when the drafter departs from :class:`Reference`."""
    model = target()
    d = 3 * DT if embed else DT
    raw = eagle3_config(d)
    ids = draft_ids(1)
    weights = eagle3_weights(raw, ids, seed=3, embed=embed)
    src = write(tmp_path / "published", raw, weights)
    assert published_kind(src) == "eagle3"
    dst = tmp_path / "converted"
    assert convert_main(["drafter", str(src), str(dst)]) == 0
    ref = Reference(raw, weights, np.array(model.model.embed_tokens.weight), ids)
    rng = np.random.default_rng(0)
    n = 9
    taps = rng.standard_normal((n, 3 * DT)).astype(np.float32)
    tokens = rng.integers(0, V, size=n + 1).astype(np.int32)
    for path in (src, dst):
        drafter = load_drafter(path, model)
        assert isinstance(drafter.head, Eagle3Head) and drafter.feature_layers == (2, 4, 5)
        positions = np.arange(n) + 2
        y = drafter.head(
            drafter.embed(mx.array(tokens[1:]))[None],
            mx.array(taps)[None],
            mx.array(positions),
            "causal",
        )[0]
        want = ref.layer(ref.fc(taps), tokens[1:], positions)
        np.testing.assert_allclose(np.array(y), want, rtol=1e-4, atol=1e-4)
        logits = np.array(drafter.head.logits(y))
        np.testing.assert_allclose(logits, ref.logits(want), rtol=1e-4, atol=2e-4)
        cand = drafter.grow(_context(drafter, taps, tokens), 2, 4)
        mx.eval(cand.paths, cand.scores, cand.depth)
        paths, scores, depths = (np.array(a) for a in (cand.paths, cand.scores, cand.depth))
        assert set(depths.tolist()) == {1, 2, 3, 4}
        for p, score, dep in zip(paths, scores, depths, strict=True):
            lp = ref.path_log_probs(taps, tokens[1:], [int(t) for t in p[:dep]])
            np.testing.assert_allclose(score, sum(lp), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("embed", [False, True], ids=["target-embedding", "own-embedding"])
def test_eagle3_head_equals_the_published_math(embed, tmp_path):
    check_math(tmp_path, embed)


def layer_inputs(model, tokens: mx.array, layers: tuple[int, ...]) -> np.ndarray:
    """``(n, 3d)`` residual stream entering ``layers``, by a manual loop (llama)."""
    inner = model.model
    h = inner.embed_tokens(tokens[None])
    seen = {}
    for i, layer in enumerate(inner["layers"]):
        seen[i] = h
        h = layer(h, "causal", None)
    return np.concatenate([np.array(seen[i][0]) for i in layers], axis=-1)


def check_taps(model) -> None:
    drafter = EagleDrafter.for_target(model, *_random_head(model), source="random")
    tokens = mx.array([5, 9, 2, 41, 7], dtype=mx.int32)
    t = Target(model, taps=drafter.feature_layers)
    logits, features = t.forward(tokens, t.make_cache())
    want = layer_inputs(model, tokens, (2, LAYERS // 2, LAYERS - 3))
    np.testing.assert_allclose(np.array(features), want, rtol=1e-5, atol=1e-5)
    plain = Target(model)  # removes the taps: the final norm's output again
    ar_logits, hidden = plain.forward(tokens, plain.make_cache())
    assert hidden.shape == (5, DT) and mx.array_equal(logits, ar_logits)


def _random_head(model, embed: bool = False):
    from mlx_redrafter.drafters.published import load_published_eagle3

    return load_published_eagle3(_RANDOM_DIRS[embed])


_RANDOM_DIRS: dict[bool, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def random_dirs(tmp_path_factory):
    for embed in (False, True):
        raw = eagle3_config(3 * DT if embed else DT)
        path = tmp_path_factory.mktemp("eagle3")
        _RANDOM_DIRS[embed] = write(path, raw, eagle3_weights(raw, draft_ids(4), 5, embed))


def test_taps_are_the_inputs_of_layers_2_mid_and_minus_3():
    check_taps(target("llama"))


# ----------------------------------------------------------------------------- mutants

MUTANTS = {
    "wrong_tap_layer": (eagle_module, "tap_layers", "num_layers // 2, ", "num_layers // 2 + 1, "),
    "no_hidden_norm": (Eagle3Head, "inputs", "layer.hidden_norm(g)", "g"),
    "fc_again": (Eagle3Head, "inputs", "if from_target else features", "if True else features"),
    "d2t_ignored": (EagleDrafter, "_to_target", "if self.vocab is None", "if True"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutants_fail(name, tmp_path, monkeypatch):
    owner, attr, original, broken = MUTANTS[name]
    function = getattr(owner, attr)
    monkeypatch.setattr(owner, attr, mutant(function, original, broken))
    with pytest.raises(AssertionError):
        if name == "wrong_tap_layer":
            check_taps(target("llama"))
        else:
            check_math(tmp_path, embed=True)


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(byte_tokenizer())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_greedy_equals_ar(arch, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    vocab = len(tokenizer._tokenizer)
    assert vocab == V
    model = tiny_model(arch, seed=3, scale=2.0, vocab_size=V, num_hidden_layers=LAYERS)
    per_step = []
    for i, prompt in enumerate(_prompts(3, V, 2)):
        ar = _tokens(model, tokenizer, prompt, 24)
        for width, length, nodes in SHAPES[i::2]:
            published = load_drafter(_RANDOM_DIRS[i == 1], model, tree_nodes=nodes)
            for drafter in (published, OracleEagle.of(published, prompt + ar, V)):
                stats = gen.StepStats()
                out = _tokens(
                    model,
                    tokenizer,
                    prompt,
                    24,
                    drafter=drafter,
                    beam_width=width,
                    beam_length=length,
                    stats=stats,
                )
                assert out == ar, (arch, width, length, nodes, type(drafter).__name__)
                if isinstance(drafter, OracleEagle):
                    per_step.append(sum(stats.accepted) / len(stats.accepted))
    assert min(per_step) > 1.0, per_step


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "q4"])
def test_greedy_equals_ar_on_half_and_4bit_targets(kind, tokenizer, monkeypatch):
    """The head is cast to the target's dtype (float16 for 4-bit: its scales'); output is
    AR's (4-bit: up to a float16 tie, see ``test_dtypes``)."""
    from test_dtypes import assert_lossless, cast

    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    model = cast(target("llama", seed=3, scale=2.0), kind)
    prompt = _prompts(5, V, 2)[1]
    ar = _tokens(model, tokenizer, prompt, 24)
    published = load_drafter(_RANDOM_DIRS[False], model, tree_nodes=6)
    want = mx.float16 if kind == "q4" else getattr(mx, kind)
    assert published.head.fc.weight.dtype == want == published.dtype
    accepted = 0
    for drafter in (published, OracleEagle.of(published, prompt + ar, V)):
        stats = gen.StepStats()
        out = _tokens(
            model, tokenizer, prompt, 24, drafter=drafter, beam_width=3, beam_length=5, stats=stats
        )
        assert_lossless(model, kind, prompt, ar, out, f"{kind} {type(drafter).__name__}")
        accepted = sum(stats.accepted)
    assert accepted > 24 // 3


def test_second_turn_on_a_prompt_cache_equals_a_fresh_run(tokenizer, monkeypatch):
    from test_prompt_cache import Recorder, _run, _turns

    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    model = tiny_model("llama", seed=7, scale=3.0, vocab_size=V, num_hidden_layers=LAYERS)
    drafter = load_drafter(_RANDOM_DIRS[False], model)
    shape = {"beam_width": 2, "beam_length": 4}
    first, second = _turns(V)
    rec = Recorder(model, drafter, monkeypatch)
    cache = make_prompt_cache(model)
    out1 = _run(model, tokenizer, first, drafter=drafter, prompt_cache=cache, **shape)
    rec.take()
    stats = gen.StepStats()
    out2 = _run(model, tokenizer, second, drafter=drafter, prompt_cache=cache, stats=stats, **shape)
    _, drafts = rec.take()
    assert stats.cached_tokens > len(first)
    fresh = _run(model, tokenizer, first + out1 + second, drafter=drafter, **shape)
    _, fresh_drafts = rec.take()
    assert out2 == fresh and len(drafts) == len(fresh_drafts)
    assert all(np.array_equal(a, b) for a, b in zip(drafts, fresh_drafts, strict=True))


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny 8-layer llama model directory (``d = 64``, ``V = 96``)."""
    path = tmp_path_factory.mktemp("tiny-llama-8")
    return save_tiny_model_dir(path, arch="llama", seed=1, num_hidden_layers=LAYERS)


def _head(path: Path, drop: str | None = None, **changes) -> Path:
    raw = eagle3_config(DT) | changes
    ids = draft_ids(6, raw["vocab_size"], raw["draft_vocab_size"])
    weights = eagle3_weights(raw, ids, seed=7, embed=False)
    weights.pop(drop, None)
    return write(path, raw, weights)


@pytest.mark.parametrize(
    "changes, drop, named",
    [
        ({"target_hidden_size": 32}, None, "hidden size 32"),
        ({"vocab_size": 100}, None, "vocabulary 100"),
        ({}, "midlayer.hidden_norm.weight", "midlayer.hidden_norm.weight"),
        ({}, "d2t", "missing d2t"),
    ],
    ids=["hidden-size", "vocabulary", "missing-weight", "missing-d2t"],
)
def test_mismatched_heads_are_one_line(changes, drop, named, model_dir, tmp_path, capsys):
    head = _head(tmp_path / "head", drop, **changes)
    err = _generate_error(model_dir, str(head), capsys)
    assert named in _one_line(err)
    assert (
        convert_main(["drafter", str(head), str(tmp_path / "out"), "--model", str(model_dir)]) == 2
    )
    assert named in _one_line(capsys.readouterr().err)


def test_maps_that_disagree_are_refused(tmp_path):
    raw = eagle3_config(DT)
    weights = eagle3_weights(raw, draft_ids(6), seed=7, embed=False)
    weights["t2d"][np.flatnonzero(~weights["t2d"])[0]] = True
    with pytest.raises(ValueError, match="t2d marks 73 target ids"):
        load_drafter(write(tmp_path / "h", raw, weights), target())


def test_too_few_target_layers_is_one_line(tiny_model_dir, tmp_path, capsys):
    err = _generate_error(tiny_model_dir, str(_head(tmp_path / "head")), capsys)
    assert "the target has 2 layers" in _one_line(err) and "at least 7" in err


def test_truncated_weights_name_the_file(model_dir, tmp_path, capsys):
    head = _head(tmp_path / "head")
    data = (head / "model.safetensors").read_bytes()
    (head / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _one_line(_generate_error(model_dir, str(head), capsys))
    assert "model.safetensors" in err and "truncated or corrupt" in err


def test_generate_with_an_eagle3_dir_prints_ar_text(model_dir, tmp_path, capsys):
    from test_published_heads import _generate

    head = _head(tmp_path / "head")
    code, spec, _ = _generate(model_dir, str(head), capsys)
    ar_code, ar, _ = _generate(model_dir, "none", capsys)
    assert code == ar_code == 0 and spec == ar


# ----------------------------------------------------------------------------- sampling


def sampled_first_tokens(monkeypatch, tmp_path: Path, broken_residual: bool) -> dict:
    """:func:`test_eagle_sampling.fit` of the first three tokens ``stream_generate`` emits
    at T = 1 with an EAGLE-3 chain (reduced, permuted draft vocabulary) steered close to
    the target's law, as ``test_eagle_sampling`` does for EAGLE-1."""
    import test_eagle_sampling as es
    from test_exact_sampling import PROMPT, VOCAB, Setup

    from mlx_redrafter import accept
    from mlx_redrafter.engine import stream_generate

    class DeepSetup(Setup):
        def __init__(self):
            self.model = tiny_model(
                "llama", seed=0, scale=2.5, vocab_size=VOCAB, num_hidden_layers=LAYERS
            )

    class CloseEagle3(es.CloseEagle):
        def __init__(self, model, law, path: Path):
            loaded = load_drafter(path, model)
            vocab = np.array(loaded.vocab)
            EagleDrafter.__init__(
                self, loaded.head, None, loaded.embed, vocab, feature_layers=loaded.feature_layers
            )
            self.head = es.SteeredHead(loaded.head, self._steer)
            self.law = law
            rng = np.random.default_rng(7)
            self.bias = mx.array((es.BIAS * rng.standard_normal(vocab.size)).astype(np.float32))
            self.sampled = self.proposals = 0

    if broken_residual:
        from mutants import walk_mutant

        monkeypatch.setattr(accept, "_compiled_walk", walk_mutant("sampled_residual_is_p"))
    setup = DeepSetup()
    law = es.Law(setup)
    raw = eagle3_config(DT, vocab=VOCAB, k=es.REDUCED.size)
    ids = np.random.default_rng(2).permutation(es.REDUCED)
    drafter = CloseEagle3(
        setup.model, law, write(tmp_path / "h", raw, eagle3_weights(raw, ids, 3, False))
    )
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}
    params = es.SETTINGS["plain"]
    draws = []
    for i in range(es.DRAWS):
        mx.random.seed(60000 + i)
        responses = stream_generate(
            setup.model,
            tok,
            PROMPT,
            max_tokens=3,
            sampler=params,
            drafter=drafter,
            beam_width=1,
            beam_length=es.LENGTH,
        )
        draws.append([r.token for r in responses])
    assert drafter.sampled == drafter.proposals > 0
    return es.fit(np.array(draws), law.joint(params))


@pytest.mark.slow
def test_sampled_chain_keeps_the_target_law(monkeypatch, tmp_path):
    result = sampled_first_tokens(monkeypatch, tmp_path, broken_residual=False)
    for p_value, _, impossible in result.values():
        assert impossible == 0 and p_value > 1e-3, result


@pytest.mark.slow
def test_a_broken_residual_fails_the_sampling_test(monkeypatch, tmp_path):
    result = sampled_first_tokens(monkeypatch, tmp_path, broken_residual=True)
    assert min(p for p, _, _ in result.values()) < 1e-3, result
