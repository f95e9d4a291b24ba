"""Tree forward over unmodified mlx-lm models equals sequential forwards of every beam."""

from __future__ import annotations

import dataclasses

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import rope_utils
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache
from tiny_models import ARCH_CONFIGS, tiny_model

from mlx_redrafter.target import (
    Target,
    UnsupportedModelError,
    _check_positional,
    _PositionalRoPE,
    _TreeLayout,
)
from mlx_redrafter.tree import Tree, pack

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

ATOL = 1e-4
VOCAB = 96
ARCHS = sorted(ARCH_CONFIGS)
# Longer than gemma3_text's sliding window (8) from 13 on.
PREFIX_LENGTHS = (1, 5, 13, 21)


def random_beams(rng: np.random.Generator, width: int, length: int, alphabet: int = 3):
    """``(W, L)`` beams over a small alphabet (lots of shared prefixes)."""
    beams = rng.integers(0, alphabet, (width, length))
    beams[:, 0] = int(rng.integers(0, VOCAB))
    return beams


def tree_vs_sequential(target: Target, prefix: mx.array, beams: np.ndarray, tree: Tree) -> float:
    """Max abs difference between tree-forward and per-beam sequential logits/hidden."""
    cache = target.make_cache()
    target.forward(prefix, cache)
    logits, hidden = target.tree_forward(tree, cache)
    assert logits.shape == (tree.size, target.vocab_size)
    assert hidden.shape == (tree.size, target.hidden_size)
    assert cache[0].offset == prefix.shape[1] + tree.size
    error = 0.0
    for w in range(beams.shape[0]):
        ref_cache = target.make_cache()
        target.forward(prefix, ref_cache)
        ref_logits, ref_hidden = target.forward(mx.array(beams[w])[None], ref_cache)
        rows = mx.array(tree.unpack[w])
        error = max(
            error,
            mx.abs(logits[rows] - ref_logits).max().item(),
            mx.abs(hidden[rows] - ref_hidden).max().item(),
        )
    return error


@pytest.fixture(scope="module", params=ARCHS)
def arch_target(request) -> tuple[str, Target]:
    return request.param, Target(tiny_model(request.param))


@pytest.mark.parametrize("num_prefix", PREFIX_LENGTHS)
def test_tree_forward_matches_sequential(arch_target, num_prefix):
    arch, target = arch_target
    rng = np.random.default_rng(num_prefix)
    prefix = mx.array(rng.integers(0, VOCAB, (1, num_prefix)))
    for width, length in [(4, 5), (1, 4), (3, 1), (6, 3)]:
        beams = random_beams(rng, width, length)
        error = tree_vs_sequential(target, prefix, beams, pack(beams))
        assert error <= ATOL, f"{arch} W={width} L={length}: {error}"


def test_sequential_reference_matches_the_raw_model(arch_target):
    """Target.forward (plain KVCache everywhere) equals the model with its own caches."""
    arch, target = arch_target
    rng = np.random.default_rng(1)
    tokens = mx.array(rng.integers(0, VOCAB, (1, 20)))
    cache = target.make_cache()
    assert all(type(c) is KVCache for c in cache)
    logits, _ = target.forward(tokens[:, :12], cache)
    steps = [target.forward(tokens[:, i : i + 1], cache)[0] for i in range(12, 20)]
    ours = mx.concatenate([logits, *steps])
    raw_cache = make_prompt_cache(target.model)
    raw = target.model(tokens[:, :12], cache=raw_cache)[0]
    raw_steps = [target.model(tokens[:, i : i + 1], cache=raw_cache)[0] for i in range(12, 20)]
    raw = mx.concatenate([raw, *raw_steps])
    assert mx.abs(ours - raw).max().item() <= ATOL, arch


def test_hidden_is_the_final_norm_output():
    target = Target(tiny_model("llama"))
    tokens = mx.array([[3, 1, 4, 1, 5]])
    logits, hidden = target.forward(tokens, target.make_cache())
    expected = target.model.model(tokens)[0]
    assert mx.abs(hidden - expected).max().item() <= 1e-6
    head = target.model.model.embed_tokens.as_linear(hidden)  # tied head
    assert mx.abs(head - logits).max().item() <= 1e-5


def test_gemma_soft_capping_stays_the_models():
    model = tiny_model("gemma2")
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 30.0
    target = Target(model)
    tokens = mx.array([[3, 1, 4, 1, 5]])
    logits, hidden = target.forward(tokens, target.make_cache())
    cap = target.model.final_logit_softcapping
    uncapped = target.model.model.embed_tokens.as_linear(hidden)
    assert mx.abs(logits - cap * mx.tanh(uncapped / cap)).max().item() <= 1e-5
    assert mx.abs(uncapped).max().item() > cap  # capping actually matters here


def test_embed_is_the_raw_table():
    target = Target(tiny_model("gemma3_text"))
    ids = mx.array([[0, 5], [7, 95]])
    out = target.embed(ids)
    assert out.shape == (2, 2, target.hidden_size)
    np.testing.assert_array_equal(
        np.array(out), np.array(target.model.model.embed_tokens.weight[ids])
    )


def test_model_is_unchanged_by_wrapping():
    model = tiny_model("llama3")
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    before_params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    before = model(tokens)
    Target(model)
    Target(model)  # a second wrapper reuses the first one's shadows
    after_params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert before_params.keys() == after_params.keys()
    assert all((before_params[k] == after_params[k]).all() for k in before_params)
    assert mx.array_equal(model(tokens), before)
    attn = model.model.layers[0].self_attn
    assert isinstance(vars(attn)["rope"], _PositionalRoPE)
    assert vars(attn)["rope"].rope is attn["rope"]  # wraps the original, not a wrapper
    # Updating weights through the module tree still reaches the shadowed final norm.
    model.update({"model": {"norm": {"weight": mx.full((64,), 2.0)}}})
    assert not mx.allclose(model(tokens), before)


def test_quantized_model(arch_target):
    arch, _ = arch_target
    model = tiny_model(arch)
    nn.quantize(model, group_size=32, bits=4)
    assert any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
    target = Target(model)
    rng = np.random.default_rng(3)
    prefix = mx.array(rng.integers(0, VOCAB, (1, 11)))
    beams = random_beams(rng, 4, 5)
    assert tree_vs_sequential(target, prefix, beams, pack(beams)) <= ATOL


def test_quantized_kv_cache():
    target = Target(tiny_model("qwen3", head_dim=32))
    rng = np.random.default_rng(4)
    prefix = mx.array(rng.integers(0, VOCAB, (1, 9)))
    beams = random_beams(rng, 3, 4)
    tree = pack(beams)
    cache = [c.to_quantized(group_size=32, bits=8) for c in target.make_cache()]
    target.forward(prefix, cache)
    logits, _ = target.tree_forward(tree, cache)
    for w in range(3):
        ref = [c.to_quantized(group_size=32, bits=8) for c in target.make_cache()]
        target.forward(prefix, ref)
        ref_logits, _ = target.forward(mx.array(beams[w])[None], ref)
        diff = mx.abs(logits[mx.array(tree.unpack[w])] - ref_logits).max().item()
        assert diff <= ATOL


@pytest.mark.parametrize(
    "arch,overrides",
    [
        (
            "phi3",
            {
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [1.0 + 0.1 * i for i in range(8)],
                    "long_factor": [1.0 + 0.3 * i for i in range(8)],
                },
                "max_position_embeddings": 512,
                "original_max_position_embeddings": 32,
            },
        ),
        ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0}}),
        ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
        ("llama", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 6}),
    ],
)
def test_model_variants(arch, overrides):
    target = Target(tiny_model(arch, **overrides))
    rope = vars(target.model.model.layers[0].self_attn)["rope"].rope
    expected = {"phi3": "SuScaledRoPE", "qwen2": "YarnRoPE", "llama": "RoPE"}[arch]
    assert type(rope).__name__ == expected
    if "sliding_window" in overrides:
        assert target.windows == [6, None]
    rng = np.random.default_rng(5)
    prefix = mx.array(rng.integers(0, VOCAB, (1, 40)))
    beams = random_beams(rng, 4, 5)
    assert tree_vs_sequential(target, prefix, beams, pack(beams)) <= ATOL


ROPES = {
    "default": nn.RoPE(16, base=10000.0),
    "traditional": nn.RoPE(16, traditional=True, base=10000.0),
    "partial": nn.RoPE(8, base=10000.0),
    "llama3": rope_utils.Llama3RoPE(
        16, 64, False, 500000.0, {"factor": 8.0, "original_max_position_embeddings": 64}
    ),
    "su": rope_utils.SuScaledRoPE(16, 10000.0, 512, 32, [1.1] * 8, [1.7] * 8),
    "yarn": rope_utils.YarnRoPE(16, scaling_factor=4.0),
    "proportional": rope_utils.ProportionalRoPE(16, 8),
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_positional_rope(name):
    original = ROPES[name]
    rope = _PositionalRoPE(original)
    _check_positional(rope, 16)
    x = mx.random.normal((1, 3, 5, 16), key=mx.random.key(1))
    positions = [12, 13, 13, 14, 40]
    got = rope(x, offset=mx.array(positions, dtype=mx.int32))
    for i, p in enumerate(positions):
        want = original(x[:, :, i : i + 1], offset=p)
        assert mx.abs(got[:, :, i : i + 1] - want).max().item() <= 1e-5
    # Anything else passes straight through.
    assert mx.array_equal(rope(x, offset=7), original(x, offset=7))
    batch = mx.random.normal((2, 3, 5, 16), key=mx.random.key(2))
    rows = mx.array([3, 9])
    assert mx.array_equal(rope(batch, offset=rows), original(batch, offset=rows))
    single = x[:, :, :1]
    assert mx.array_equal(rope(single, offset=mx.array([4])), original(single, offset=4))


def test_rope_without_array_offsets_is_refused():
    rope = _PositionalRoPE(rope_utils.DynamicNTKScalingRoPE(16, 64, False, 10000.0, 2.0))
    with pytest.raises(UnsupportedModelError, match="DynamicNTKScalingRoPE"):
        _check_positional(rope, 16)
    model = tiny_model("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="per-token positions"):
        Target(model)


def test_unsupported_caches_are_refused():
    model = tiny_model("llama")
    model.make_cache = lambda: [ArraysCache(2), KVCache()]
    with pytest.raises(UnsupportedModelError, match="ArraysCache"):
        Target(model)
    model.make_cache = lambda: [RotatingKVCache(16, keep=4), KVCache()]
    with pytest.raises(UnsupportedModelError, match="RotatingKVCache"):
        Target(model)


def test_layer_without_rope_is_refused():
    model = tiny_model("llama")
    del model.model.layers[1].self_attn["rope"]
    with pytest.raises(UnsupportedModelError, match="layer 1 has no `rope`"):
        Target(model)


def test_tree_forward_refuses_rotating_cache():
    target = Target(tiny_model("gemma3_text"))
    cache = make_prompt_cache(target.model)
    target.model(mx.array([[1, 2, 3]]), cache=cache)
    with pytest.raises(TypeError, match="RotatingKVCache"):
        target.tree_forward(pack(np.array([[1, 2]])), cache)


def _two_rotating_caches() -> list:
    return [RotatingKVCache(max_size=8), RotatingKVCache(max_size=8)]


def tree_vs_rotating_ar(target: Target, prefix: mx.array, beams: np.ndarray, tree: Tree) -> float:
    """Tree forward vs the raw model decoding each beam token by token with its own caches."""
    cache = target.make_cache()
    target.forward(prefix, cache)
    logits, _ = target.tree_forward(tree, cache)
    error = 0.0
    for w in range(beams.shape[0]):
        raw_cache = target.model.make_cache()
        target.model(prefix, cache=raw_cache)
        for j in range(beams.shape[1]):
            raw = target.model(mx.array(beams[w, j : j + 1])[None], cache=raw_cache)[0, 0]
            diff = mx.abs(logits[int(tree.unpack[w, j])] - raw).max().item()
            error = max(error, diff)
    return error


def test_windows_come_from_the_models_caches():
    assert Target(tiny_model("gemma3_text")).windows == [8, None, 8, None]
    assert Target(tiny_model("llama")).windows == [None, None]


def test_default_window_of_rotating_caches():
    """A model relying on RotatingKVCache alone (no window_size in make_mask) is windowed."""
    model = tiny_model("llama")
    model.make_cache = _two_rotating_caches
    target = Target(model)
    assert target.windows == [8, 8]
    rng = np.random.default_rng(6)
    prefix = mx.array(rng.integers(0, VOCAB, (1, 13)))
    beams = random_beams(rng, 4, 5)
    assert tree_vs_rotating_ar(target, prefix, beams, pack(beams)) <= ATOL


# --- Teeth: deliberately wrong variants must fail the same check. ---


@pytest.fixture(scope="module")
def teeth_case():
    rng = np.random.default_rng(11)
    beams = np.array([[5, 1, 2, 0, 1], [5, 1, 0, 2, 2], [5, 2, 1, 1, 0], [5, 0, 2, 1, 1]])
    prefix = mx.array(rng.integers(0, VOCAB, (1, 13)))
    return prefix, beams, pack(beams)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
def test_one_wrong_mask_entry_fails(arch, teeth_case):
    prefix, beams, tree = teeth_case
    target = Target(tiny_model(arch))
    assert tree_vs_sequential(target, prefix, beams, tree) <= ATOL
    deep = int(tree.unpack[1, 4])
    other = int(tree.unpack[0, 3])  # a node of another branch, not an ancestor
    assert not tree.mask[deep, other]
    mask = tree.mask.copy()
    mask[deep, other] = True
    wrong = dataclasses.replace(tree, mask=mask)
    assert tree_vs_sequential(target, prefix, beams, wrong) > 10 * ATOL


@pytest.mark.parametrize("arch", ["llama", "llama3", "gemma3_text", "qwen3"])
def test_positions_off_by_one_fail(arch, teeth_case):
    prefix, beams, tree = teeth_case
    target = Target(tiny_model(arch))
    wrong = dataclasses.replace(tree, depth=tree.depth + np.int32(1))
    assert tree_vs_sequential(target, prefix, beams, wrong) > 10 * ATOL


def test_consecutive_positions_fail(teeth_case):
    """Numbering tree nodes consecutively (what a plain offset would do) is wrong."""
    prefix, beams, tree = teeth_case
    target = Target(tiny_model("llama"))
    wrong = dataclasses.replace(tree, depth=np.arange(tree.size, dtype=np.int32))
    assert tree_vs_sequential(target, prefix, beams, wrong) > 10 * ATOL


def test_missing_sliding_window_fails(teeth_case, monkeypatch):
    prefix, beams, tree = teeth_case
    target = Target(tiny_model("gemma3_text"))
    assert prefix.shape[1] > 8
    assert tree_vs_sequential(target, prefix, beams, tree) <= ATOL
    monkeypatch.setattr(_TreeLayout, "mask", _unwindowed_mask)
    assert tree_vs_sequential(target, prefix, beams, tree) > 10 * ATOL


def _unwindowed_mask(layout: _TreeLayout, window: int | None) -> mx.array:
    return layout.visible


def test_missing_default_window_fails(teeth_case):
    prefix, beams, tree = teeth_case
    model = tiny_model("llama")
    model.make_cache = _two_rotating_caches
    target = Target(model)
    target.windows = [None, None]
    assert tree_vs_rotating_ar(target, prefix, beams, tree) > 10 * ATOL
