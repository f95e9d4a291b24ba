"""The native one-token attention kernel: same result as MLX's attention, build and fallback."""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: fast BLAS)

# isort: split
import platform
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import tiny_model

from mlx_redrafter.train import fast_ops, native_attention
from mlx_redrafter.train.batch_generate import Request, SlotGenerator

needs_kernel = pytest.mark.skipif(
    not native_attention.available(), reason="no C compiler / not Linux"
)


def _inputs(b: int, hq: int, hkv: int, s: int, d: int, capacity: int):
    """Queries ``(B, Hq, 1, D)`` (transposed, as attention modules pass them) and keys /
    values ``(B, Hkv, S, D)`` as column views of ``capacity``-wide buffers."""
    q = mx.random.normal((b, 1, hq, d)).transpose(0, 2, 1, 3)
    kbuf = mx.random.normal((b, hkv, capacity, d)) * 2
    vbuf = mx.random.normal((b, hkv, capacity, d))
    return q, kbuf[:, :, :s], vbuf[:, :, :s]


@needs_kernel
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
def test_kernel_matches_mlx_attention_with_per_row_masks(hq: int, hkv: int) -> None:
    b, s, d = 5, 37, 16
    q, k, v = _inputs(b, hq, hkv, s, d, capacity=64)
    lengths = mx.array([37, 1, 12, 36, 20])
    mask = (mx.arange(s)[None] < lengths[:, None])[:, None, None, :]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    got = native_attention.decode_attention(q, k, v, 0.3, mask)
    assert got.shape == (b, hq, 1, d)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    # the mask matters: attending to every column gives other rows 1-4
    unmasked = native_attention.decode_attention(q, k, v, 0.3, None)
    np.testing.assert_allclose(
        unmasked, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=2e-5, atol=2e-6
    )
    assert mx.abs(unmasked[1:] - want[1:]).max().item() > 1e-2


@needs_kernel
def test_kernel_skips_only_columns_after_a_rows_last_visible_key() -> None:
    q, k, v = _inputs(3, 6, 2, 16, 8, capacity=16)
    mask = np.zeros((3, 1, 1, 16), dtype=bool)
    mask[0, ..., [0, 2, 5, 15]] = True  # holes, and the last column visible
    mask[1, ..., 3:9] = True  # starts late, ends early
    mask[2, ..., 7] = True
    mask = mx.array(mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mask)
    got = native_attention.decode_attention(q, k, v, 0.5, mask)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@needs_kernel
def test_kernel_takes_a_broadcast_mask_and_gives_zeros_for_rows_that_see_nothing() -> None:
    q, k, v = _inputs(3, 6, 2, 9, 8, capacity=9)
    shared = (mx.arange(9) < 4)[None, None, None, :]  # (1, 1, 1, S): one mask for all rows
    want = mx.fast.scaled_dot_product_attention(q, k[:, :, :4], v[:, :, :4], scale=0.5)
    np.testing.assert_allclose(
        native_attention.decode_attention(q, k, v, 0.5, shared), want, rtol=2e-5, atol=2e-6
    )
    nothing = mx.zeros((3, 1, 1, 9), dtype=mx.bool_)
    assert mx.all(native_attention.decode_attention(q, k, v, 0.5, nothing) == 0).item()


@needs_kernel
def test_decode_steps_run_the_kernel_and_greedy_output_is_unchanged(monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = native_attention.decode_attention

    def recording(queries, *args):
        calls.append(tuple(queries.shape))
        return real(queries, *args)

    model = tiny_model("llama")
    requests = [Request(i, (1, 2, 3 + i, 5, 7 + 2 * i)) for i in range(6)]
    outputs = {}
    monkeypatch.setattr(native_attention, "decode_attention", recording)
    for native in (False, True):
        gen = SlotGenerator(model, {0}, batch_size=4, max_new_tokens=12, native_attention=native)
        assert gen.fast_kernels and gen.native_attention == native
        calls.clear()
        outputs[native] = {c.key: c.response.tolist() for c in gen.generate(list(requests))}
        if native:
            assert len(calls) >= len(model.layers) * gen.stats.decode_steps
            assert all(shape[2] == 1 for shape in calls)
        else:
            assert calls == []
    assert outputs[True] == outputs[False]
    lanes = SlotGenerator(model, {0}, batch_size=4, max_new_tokens=12, streams=2)
    assert not lanes.native_attention  # a host sync per layer would serialise the lanes


def test_a_failing_compiler_is_reported_and_mlx_attention_is_kept(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("MLX_REDRAFTER_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="failed to build decode_attention.c"):
        native_attention.build()
    monkeypatch.setattr(native_attention, "_tried", False)
    monkeypatch.setattr(native_attention, "_library", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native_attention.available()
    reported = any("native decode attention unavailable" in str(w.message) for w in caught)
    # on macOS (CI's second pass fakes it) the kernel is never built, so nothing to report
    assert reported == (platform.system() == "Linux")
    q, k, v = _inputs(2, 4, 2, 6, 8, 6)
    np.testing.assert_allclose(  # fast_sdpa falls back to MLX's grouped matmuls
        fast_ops.fast_sdpa(q, k, v, None, 0.5, None),
        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5),
        rtol=2e-5,
        atol=2e-6,
    )
    with pytest.raises(RuntimeError, match="not available"):
        native_attention.decode_attention(*_inputs(1, 2, 1, 3, 4, 3), 1.0, None)


@needs_kernel
def test_the_built_library_is_cached_by_source_and_cpu(tmp_path: Path) -> None:
    first = native_attention.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    again = native_attention.build(tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
