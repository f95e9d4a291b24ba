"""Cache compaction: a simulated speculative loop rebuilds exactly the AR cache."""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache
from tiny_models import tiny_model

from mlx_redrafter.cache import CacheRewindError, compact, gather_path, set_length
from mlx_redrafter.target import Target
from mlx_redrafter.tree import pack

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

VOCAB = 96
ATOL = 1e-5


def speculative_loop(
    target: Target,
    cache: list,
    rng: np.random.Generator,
    steps: int,
    prompt_length: int = 6,
    lazy_garbage: bool = False,
) -> tuple[list[int], int]:
    """Run ``steps`` random tree steps; return ``(accepted tokens, next root)``.

    Every step verifies a random tree, accepts a random beam prefix of random length and
    compacts the cache to it.
    """
    tokens = [int(t) for t in rng.integers(0, VOCAB, prompt_length)]
    target.forward(mx.array(tokens)[None], cache)
    root = int(rng.integers(0, VOCAB))
    for _ in range(steps):
        width, length = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        beams = rng.integers(0, 4, (width, length))
        beams[:, 0] = root
        tree = pack(beams)
        num_prefix = len(tokens)
        target.tree_forward(tree, cache)
        beam, keep = int(rng.integers(0, width)), int(rng.integers(1, length + 1))
        path = mx.array(tree.unpack[beam])  # fixed length L, only `keep` entries matter
        if lazy_garbage:  # entries past `keep` are junk, computed lazily on the device
            junk = mx.arange(length, dtype=mx.int32) * 7 + 3
            path = mx.where(mx.arange(length) < keep, path, junk)
        gather_path(cache, path, num_prefix)
        set_length(cache, num_prefix + keep)
        accepted = beams[beam, :keep].tolist()
        tokens.extend(accepted)
        next_index = keep if keep < length else 0
        root = int(beams[beam, next_index]) if next_index else int(rng.integers(0, VOCAB))
    return tokens, root


def ar_cache(target: Target, tokens: list[int], quantized: bool = False) -> list:
    """The cache plain AR decoding builds: one token per forward."""
    cache = target.make_cache()
    if quantized:
        cache = [c.to_quantized(group_size=32, bits=8) for c in cache]
    for t in tokens:
        target.forward(mx.array([[t]]), cache)
    return cache


def kv(layer) -> tuple[mx.array, mx.array]:
    """Keys and values ``(B, H, offset, D)`` (dequantized for a QuantizedKVCache)."""
    keys, values = layer.keys_and_values()
    if isinstance(layer, QuantizedKVCache):
        keys = mx.dequantize(*keys, group_size=layer.group_size, bits=layer.bits)
        values = mx.dequantize(*values, group_size=layer.group_size, bits=layer.bits)
    return keys, values


def cache_error(a: list, b: list) -> float:
    """Max abs difference of keys/values, in units of ``max(1, max |b|)`` per tensor.

    K/V entries reach ~6 in the tiny models, and fp32 matmuls of different row counts
    round differently, so the 1e-5 bound is relative to the entries' scale.
    """
    assert [c.offset for c in a] == [c.offset for c in b]
    error = 0.0
    for la, lb in zip(a, b, strict=True):
        for xa, xb in zip(kv(la), kv(lb), strict=True):
            assert xa.shape == xb.shape
            scale = max(1.0, mx.abs(xb).max().item())
            error = max(error, mx.abs(xa - xb).max().item() / scale)
    return error


@pytest.mark.parametrize("seed,arch", list(enumerate(["llama", "gemma3_text", "qwen3", "phi3"])))
@pytest.mark.parametrize("lazy_garbage", [False, True])
def test_loop_rebuilds_the_ar_cache(seed, arch, lazy_garbage):
    target = Target(tiny_model(arch))
    rng = np.random.default_rng(2 * seed + lazy_garbage)
    cache = target.make_cache()
    tokens, root = speculative_loop(target, cache, rng, steps=40, lazy_garbage=lazy_garbage)
    assert cache[0].offset == len(tokens) > 6 + 40
    reference = ar_cache(target, tokens)
    assert cache_error(cache, reference) <= ATOL
    logits, hidden = target.forward(mx.array([[root]]), cache)
    ref_logits, ref_hidden = target.forward(mx.array([[root]]), reference)
    assert mx.abs(logits - ref_logits).max().item() <= 1e-4
    assert mx.abs(hidden - ref_hidden).max().item() <= 1e-4


def test_loop_with_quantized_cache_moves_entries_exactly():
    """QuantizedKVCache: compaction moves the packed entries bit for bit."""
    target = Target(tiny_model("llama", head_dim=32))
    rng = np.random.default_rng(7)
    cache = [c.to_quantized(group_size=32, bits=8) for c in target.make_cache()]
    tokens = [int(t) for t in rng.integers(0, VOCAB, 5)]
    target.forward(mx.array(tokens)[None], cache)
    for _ in range(15):
        beams = rng.integers(0, 4, (4, 5))
        beams[:, 0] = int(rng.integers(0, VOCAB))
        tree = pack(beams)
        num_prefix = len(tokens)
        target.tree_forward(tree, cache)
        before = [tuple(np.array(x) for x in c.keys_and_values()[0]) for c in cache]
        beam, keep = int(rng.integers(0, 4)), int(rng.integers(1, 6))
        compact(cache, mx.array(tree.unpack[beam]), num_prefix, keep)
        rows = num_prefix + tree.unpack[beam, :keep]
        for layer, old in zip(cache, before, strict=True):
            assert layer.offset == num_prefix + keep
            for part, old_part in zip(layer.keys_and_values()[0], old, strict=True):
                np.testing.assert_array_equal(
                    np.array(part)[..., :num_prefix, :], old_part[..., :num_prefix, :]
                )
                np.testing.assert_array_equal(
                    np.array(part)[..., num_prefix:, :], old_part[..., rows, :]
                )
        tokens.extend(beams[beam, :keep].tolist())
    reference = ar_cache(target, tokens, quantized=True)
    # Same tokens, same quantization; only float noise can flip a rounding step.
    assert cache_error(cache, reference) <= 0.05


def test_rotating_cache_before_it_rotates():
    rng = np.random.default_rng(3)
    cache = [RotatingKVCache(max_size=64)]
    keys = mx.array(rng.normal(size=(1, 2, 10, 4)).astype(np.float32))
    values = keys * 2
    cache[0].update_and_fetch(keys[:, :, :4], values[:, :, :4])
    cache[0].update_and_fetch(keys[:, :, 4:], values[:, :, 4:])
    compact(cache, mx.array([0, 3, 5], dtype=mx.int32), 4, 3)
    assert cache[0].offset == 7 and cache[0]._idx == 7
    k, v = cache[0].keys_and_values()
    np.testing.assert_array_equal(np.array(k), np.array(keys[:, :, [0, 1, 2, 3, 4, 7, 9]]))
    np.testing.assert_array_equal(np.array(v), np.array(values[:, :, [0, 1, 2, 3, 4, 7, 9]]))
    # Later single-token updates continue from the compacted end.
    new = mx.ones((1, 2, 1, 4))
    k, _ = cache[0].update_and_fetch(new, new)
    assert k.shape[2] == 8 and mx.array_equal(k[:, :, 7:], new)


def test_rotated_cache_is_refused():
    cache = [RotatingKVCache(max_size=4)]
    x = mx.zeros((1, 1, 1, 4))
    for _ in range(6):
        cache[0].update_and_fetch(x, x)
    with pytest.raises(CacheRewindError, match="rotated"):
        gather_path(cache, mx.array([0], dtype=mx.int32), 5)
    with pytest.raises(CacheRewindError, match="rotated"):
        set_length(cache, 3)


def test_ssm_cache_is_refused():
    with pytest.raises(CacheRewindError, match="ArraysCache"):
        set_length([ArraysCache(2)], 0)


def test_bad_lengths_are_refused():
    cache = [KVCache()]
    x = mx.zeros((1, 1, 5, 4))
    cache[0].update_and_fetch(x, x)
    with pytest.raises(ValueError, match="cannot set length"):
        set_length(cache, 6)
    with pytest.raises(ValueError, match="only 3 tree entries"):
        gather_path(cache, mx.zeros((4,), dtype=mx.int32), 2)
    with pytest.raises(ValueError, match="num_keep"):
        compact(cache, mx.zeros((2,), dtype=mx.int32), 2, 3)


# --- Teeth: wrong compactions must fail the same comparison. ---


def test_trimming_without_gathering_fails():
    target = Target(tiny_model("llama"))
    rng = np.random.default_rng(5)
    cache = target.make_cache()
    tokens = [int(t) for t in rng.integers(0, VOCAB, 6)]
    target.forward(mx.array(tokens)[None], cache)
    beams = np.array([[9, 1, 2, 3], [9, 2, 3, 1], [9, 3, 1, 2]])
    tree = pack(beams)
    target.tree_forward(tree, cache)
    set_length(cache, len(tokens) + 4)  # packed order kept: nodes of beam 0, not beam 2
    tokens.extend(beams[2].tolist())
    assert cache_error(cache, ar_cache(target, tokens)) > 100 * ATOL


def next_logits_error(num_keep_error: int) -> float:
    """Accept 3 nodes of beam 1, compact keeping ``3 + num_keep_error``, compare next logits."""
    target = Target(tiny_model("llama"))
    rng = np.random.default_rng(6)
    tokens = [int(t) for t in rng.integers(0, VOCAB, 6)]
    cache = target.make_cache()
    target.forward(mx.array(tokens)[None], cache)
    beams = np.array([[9, 1, 2, 3, 4], [9, 2, 3, 1, 5], [9, 3, 1, 2, 6]])
    tree = pack(beams)
    target.tree_forward(tree, cache)
    compact(cache, mx.array(tree.unpack[1]), len(tokens), 3 + num_keep_error)
    reference = ar_cache(target, tokens + beams[1, :3].tolist())
    logits, _ = target.forward(mx.array([[11]]), cache)
    ref_logits, _ = target.forward(mx.array([[11]]), reference)
    return mx.abs(logits - ref_logits).max().item()


def test_keeping_one_node_too_many_or_too_few_fails():
    assert next_logits_error(0) <= 1e-4
    assert next_logits_error(-1) > 100 * ATOL
    assert next_logits_error(1) > 100 * ATOL


def test_wrong_prefix_length_fails():
    target = Target(tiny_model("llama"))
    rng = np.random.default_rng(8)
    cache = target.make_cache()
    tokens = [int(t) for t in rng.integers(0, VOCAB, 6)]
    target.forward(mx.array(tokens)[None], cache)
    beams = np.array([[9, 1, 2], [9, 2, 3]])
    tree = pack(beams)
    target.tree_forward(tree, cache)
    gather_path(cache, mx.array(tree.unpack[1]), len(tokens) - 1)  # off by one
    set_length(cache, len(tokens) + 3)
    tokens.extend(beams[1].tolist())
    assert cache_error(cache, ar_cache(target, tokens)) > 100 * ATOL
