"""Keeping only the accepted path of a verified tree in the target's KV cache.

After :meth:`~mlx_redrafter.target.Target.tree_forward` each layer's cache holds the ``T``
prefix entries followed by ``N`` tree nodes in packed order. The accepted path is a chain
of nodes ``path[0] = 0 (root), path[1], ...`` that is generally not contiguous in packed
order. Compaction copies their keys and values to slots ``T, T+1, ...`` and then cuts the
cache at ``T + num_keep``.

It is split in two so that a decoding step needs a single host synchronisation:

* :func:`gather_path` is lazy and has fixed shapes: ``path`` may be an unevaluated device
  array of a fixed length (e.g. ``L``) whose entries past ``num_keep`` are ignored.
* :func:`set_length` takes the host ``int`` learned at the step's synchronisation.

Supported caches: ``KVCache``, ``QuantizedKVCache`` and a ``RotatingKVCache`` that has
not rotated yet (slot ``i`` still holds position ``i``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache


class CacheRewindError(ValueError):
    """A cache cannot be rewound to an earlier length (the message names the reason)."""


def _check_rewindable(index: int, cache: Any) -> None:
    """Raise :class:`CacheRewindError` unless slot ``i`` of ``cache`` holds position ``i``."""
    if type(cache) in (KVCache, QuantizedKVCache):
        return
    if type(cache) is RotatingKVCache:
        if cache.keep == 0 and cache._idx == cache.offset:
            return
        raise CacheRewindError(
            f"layer {index}: RotatingKVCache has rotated (offset {cache.offset}, "
            f"write index {cache._idx}, keep {cache.keep}); its old entries are gone. "
            "Use Target.make_cache(), which keeps every entry and windows the mask instead"
        )
    raise CacheRewindError(
        f"layer {index}: {type(cache).__name__} cannot be rewound "
        "(only KVCache, QuantizedKVCache and unrotated RotatingKVCache can)"
    )


def _gather(buffer: mx.array, path: mx.array, start: int) -> None:
    """Copy rows ``start + path`` of ``buffer`` ``(B, H, S, D)`` to rows ``start .. start+P``."""
    buffer[..., start : start + path.shape[0], :] = mx.take(buffer, start + path, axis=2)


def gather_path(cache: list[Any], path: mx.array, num_prefix: int) -> None:
    """Move the K/V of the tree nodes ``path`` to the slots right after the prefix (lazy).

    Args:
        cache: Per-layer caches holding ``num_prefix`` prefix entries followed by the
            ``N`` tree nodes in packed order.
        path: ``(P,)`` int32 packed node indices, root first; may be lazy. Entries past
            the number eventually kept are moved too (into slots that
            :func:`set_length` then drops); they are clipped to ``[0, N)``.
        num_prefix: ``T``, number of entries before the tree.

    Does not change ``offset``; call :func:`set_length` afterwards.
    """
    path = path.astype(mx.int32)
    for index, layer in enumerate(cache):
        _check_rewindable(index, layer)
        num_nodes = layer.offset - num_prefix
        if num_nodes < path.shape[0]:
            raise ValueError(
                f"layer {index}: path of length {path.shape[0]} but only {num_nodes} "
                "tree entries after the prefix"
            )
        rows = mx.clip(path, 0, num_nodes - 1)
        if isinstance(layer.keys, tuple):  # QuantizedKVCache: (packed, scales, biases)
            for part_k, part_v in zip(layer.keys, layer.values, strict=True):
                _gather(part_k, rows, num_prefix)
                _gather(part_v, rows, num_prefix)
        else:
            _gather(layer.keys, rows, num_prefix)
            _gather(layer.values, rows, num_prefix)


def set_length(cache: list[Any], length: int) -> None:
    """Cut every layer of ``cache`` to its first ``length`` entries.

    Raises:
        ValueError: if ``length`` is negative or longer than a layer's current length.
        CacheRewindError: for caches that cannot be rewound.
    """
    for index, layer in enumerate(cache):
        _check_rewindable(index, layer)
        if not 0 <= length <= layer.offset:
            raise ValueError(f"layer {index}: cannot set length {length} (has {layer.offset})")
        if type(layer) is RotatingKVCache:
            # Drop the stale tail so the cache's own trimming never sees it.
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
            layer._idx = length
        layer.offset = length


def compact(cache: list[Any], path: mx.array, num_prefix: int, num_keep: int) -> None:
    """Keep the prefix and the first ``num_keep`` nodes of ``path`` in ``cache``.

    Args:
        cache: Per-layer caches holding ``num_prefix + N`` entries (prefix, then tree).
        path: ``(P,)`` int32 packed node indices of the accepted path, root first.
        num_prefix: ``T``, number of entries before the tree.
        num_keep: Number of path nodes to keep (``1 <= num_keep <= P``).

    Afterwards every layer has ``offset == num_prefix + num_keep``.
    """
    if not 0 <= num_keep <= path.shape[0]:
        raise ValueError(f"num_keep {num_keep} outside [0, {path.shape[0]}]")
    gather_path(cache, path, num_prefix)
    set_length(cache, num_prefix + num_keep)
