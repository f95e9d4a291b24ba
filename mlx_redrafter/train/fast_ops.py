"""Faster CPU kernels for batched decoding: ``exp``, SwiGLU and attention.

The Linux CPU build of MLX evaluates ``exp`` (and so softmax, sigmoid and SiLU) with a
polynomial whose multiply-adds are scalar ``fma`` library calls, about 14 ns per element:
at batch 64 that is a fifth of a SmolLM2 decode step. SwiGLU and the softmax of decode
attention use :func:`mlx_redrafter.fast_math.fast_exp` instead.

:func:`installed` swaps two functions in the model's mlx-lm module while a forward graph is
built, and restores them afterwards:

* ``swiglu`` -> :func:`fast_swiglu` (float32 inputs; anything else is passed through);
* ``scaled_dot_product_attention`` -> :func:`fast_sdpa`, which handles one query token per
  row (decode) with a boolean or no mask: with the native kernel of
  :mod:`mlx_redrafter.train.native_attention` when it is available (3-4x faster on a
  2-core x86 CPU), else via grouped-query matmuls, ``(B, Hkv, rep, D) @ (B, Hkv, D, S)``,
  and a fast softmax; several query tokens per row (prefill) with a causal or boolean
  mask go through the same grouped matmuls and fast softmax (:func:`prefill_attention`,
  ~2x faster than MLX's CPU attention at 1,600 tokens); every other call (additive masks,
  sinks, quantized caches, other dtypes) goes to the original.

Nothing is swapped unless MLX's default device is the CPU (on a GPU, MLX's fused kernels
are faster and smaller; see :mod:`mlx_redrafter.device`). Only float32 models of module files that import both names from mlx-lm's ``activations``
and ``base`` (llama, qwen2, qwen3, phi3, ...) are affected; the swap is checked against the
original forward on a probe input before it is used (see
:func:`mlx_redrafter.train.batch_generate.SlotGenerator`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations as _activations
from mlx_lm.models import base as _base
from mlx_lm.models.base import create_causal_mask

from mlx_redrafter.device import on_cpu
from mlx_redrafter.fast_math import exp_ops
from mlx_redrafter.train import native_attention


def _swiglu_body(gate: mx.array, x: mx.array) -> mx.array:
    y = 1.0 / (1.0 + exp_ops(mx.abs(gate)))
    sig = mx.where(gate < 0, y, 1.0 - y)
    return gate * sig * x


_swiglu_compiled = mx.compile(_swiglu_body)
_original_swiglu = _activations.swiglu
_original_sdpa = _base.scaled_dot_product_attention


def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` for any shape; float32 only (other dtypes use mlx-lm's)."""
    if gate.dtype != mx.float32 or x.dtype != mx.float32:
        return _original_swiglu(gate, x)
    return _swiglu_compiled(gate, x)


def _masked_exp_body(scores: mx.array, peak: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask, exp_ops(scores - peak), 0.0)


_masked_exp = mx.compile(_masked_exp_body)
_shifted_exp = mx.compile(lambda scores, peak: exp_ops(scores - peak))


def decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array | None
) -> mx.array:
    """Softmax attention of one query token per row.

    Args:
        queries: ``(B, Hq, 1, D)``.
        keys: ``(B, Hkv, S, D)`` (may be a strided view), ``Hq % Hkv == 0``.
        values: ``(B, Hkv, S, Dv)``.
        scale: Multiplier of the scores.
        mask: None, or bool broadcastable to ``(B, 1, 1, S)`` (True = attend).

    Returns:
        ``(B, Hq, 1, Dv)``.
    """
    b, hq, _, d = queries.shape
    hkv = keys.shape[1]
    q = (queries * scale).reshape(b, hkv, hq // hkv, d)
    scores = q @ keys.swapaxes(-1, -2)
    if mask is None:
        peak = scores.max(axis=-1, keepdims=True)
        weights = _shifted_exp(scores, peak)
    else:
        peak = mx.where(mask, scores, -mx.inf).max(axis=-1, keepdims=True)
        weights = _masked_exp(scores, peak, mask)
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(b, hq, 1, values.shape[-1])


def prefill_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array
) -> mx.array:
    """Softmax attention of ``T`` query tokens per row with a boolean mask.

    MLX's CPU attention spends most of a prefill in its softmax's ``exp`` (about 0.4 s per
    layer for one 1,600-token row of SmolLM2); here the scores are grouped-query matmuls
    and the softmax uses the fast ``exp``.

    Args:
        queries: ``(B, Hq, T, D)``.
        keys: ``(B, Hkv, S, D)``, ``Hq % Hkv == 0``.
        values: ``(B, Hkv, S, Dv)``.
        scale: Multiplier of the scores.
        mask: bool ``(T, S)`` or ``(B, 1, T, S)`` (True = attend); every query must see
            at least one key.

    Returns:
        ``(B, Hq, T, Dv)``.
    """
    b, hq, t, d = queries.shape
    hkv = keys.shape[1]
    q = (queries * scale).reshape(b, hkv, hq // hkv, t, d)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    m = mask if mask.ndim == 2 else mask[:, :, None]
    peak = mx.where(m, scores, -mx.inf).max(axis=-1, keepdims=True)
    weights = _masked_exp(scores, peak, m)
    out = (weights @ values[:, :, None]) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(b, hq, t, values.shape[-1])


def _prefill_mask(mask: Any, t: int, s: int) -> mx.array | None:
    """A bool mask for :func:`prefill_attention`, or None when it cannot take ``mask``."""
    if isinstance(mask, str):
        return create_causal_mask(t, offset=s - t) if mask == "causal" else None
    boolean = isinstance(mask, mx.array) and mask.dtype == mx.bool_
    if boolean and (mask.ndim == 2 or (mask.ndim == 4 and mask.shape[1] == 1)):
        return mask
    return None


def _decode_mask(mask: Any) -> tuple[bool, mx.array | None]:
    """Whether :func:`decode_attention` can take ``mask``, and the mask it should get."""
    if mask is None:
        return True, None
    per_row = isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim == 4
    if per_row and mask.shape[1] == 1 and mask.shape[2] == 1:
        return True, mask
    return False, None


def _sdpa(
    queries: mx.array,
    keys: Any,
    values: Any,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None,
    native: bool,
) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention`` with the decode and prefill fast paths."""
    grouped = (
        sinks is None
        and not hasattr(cache, "bits")
        and queries.dtype == mx.float32
        and queries.shape[1] % keys.shape[1] == 0
    )
    if grouped and queries.shape[2] == 1:
        ok, decode_mask = _decode_mask(mask)
        if ok:
            native = native and native_attention.available()
            attend = native_attention.decode_attention if native else decode_attention
            return attend(queries, keys, values, scale, decode_mask)
    elif grouped:
        prefill_mask = _prefill_mask(mask, queries.shape[2], keys.shape[2])
        if prefill_mask is not None:
            return prefill_attention(queries, keys, values, scale, prefill_mask)
    return _original_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def fast_sdpa(
    queries: mx.array,
    keys: Any,
    values: Any,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """Drop-in for mlx-lm's ``scaled_dot_product_attention``: the native decode kernel when
    it is available, else MLX's grouped matmuls (:func:`decode_attention`)."""
    return _sdpa(queries, keys, values, cache, scale, mask, sinks, native=True)


def mlx_sdpa(
    queries: mx.array,
    keys: Any,
    values: Any,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """Like :func:`fast_sdpa` with MLX's ops only (no host sync inside the graph)."""
    return _sdpa(queries, keys, values, cache, scale, mask, sinks, native=False)


_REPLACEMENTS = {
    "swiglu": (_original_swiglu, fast_swiglu),
    "scaled_dot_product_attention": (_original_sdpa, fast_sdpa),
}


def patchable(model: nn.Module) -> bool:
    """True when the model's module uses at least one of the replaceable functions."""
    module = sys.modules.get(type(model).__module__)
    return module is not None and any(
        getattr(module, name, None) is original for name, (original, _) in _REPLACEMENTS.items()
    )


@contextmanager
def installed(model: nn.Module, enabled: bool = True, native: bool = True) -> Iterator[None]:
    """Use the fast kernels in ``model``'s module while the ``with`` body builds a graph.

    Args:
        model: An mlx-lm ``Model``.
        enabled: When False, do nothing (nor on a GPU device: :func:`on_cpu`).
        native: Let decode attention use the native kernel (one host sync per layer while
            the graph is built; see :mod:`mlx_redrafter.train.native_attention`).
    """
    module = sys.modules.get(type(model).__module__) if enabled and on_cpu() else None
    swapped: list[tuple[str, Any]] = []
    replacements = dict(_REPLACEMENTS)
    if not native:
        replacements["scaled_dot_product_attention"] = (_original_sdpa, mlx_sdpa)
    if module is not None:
        for name, (original, fast) in replacements.items():
            if getattr(module, name, None) is original:
                setattr(module, name, fast)
                swapped.append((name, original))
    try:
        yield
    finally:
        for name, original in swapped:
            setattr(module, name, original)
