"""Key/value storage for a batch of independent sequences ("slots") of different lengths.

Per layer, keys and values live in ``(B, H, capacity, D)`` buffers. Row ``b`` holds its
sequence at columns ``[0, lengths[b])``; nothing is left-padded. Two kinds of forward:

* decode (:meth:`SlotCache.begin_decode`): one token per row, row ``b`` written at column
  ``lengths[b]`` with ``mx.put_along_axis`` (in place: the buffer is donated), rotary
  offset ``lengths[b]``, attention over columns ``[0, max(lengths) + 1)`` with a per-row
  mask;
* prefill (:meth:`SlotCache.begin_prefill`): ``T`` tokens per row, all rows starting at
  the same column (right-padded prompts), ordinary causal mask.

mlx-lm attention modules only touch ``cache.offset``, ``cache.make_mask(...)`` and
``cache.update_and_fetch(keys, values)``; :class:`SlotLayerCache` is the per-layer view
that provides them. The mask is built once per forward and shared by all layers.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

#: Columns are added to the key/value buffers in multiples of this.
CAPACITY_STEP = 256


class UnsupportedModelError(ValueError):
    """The model's cache layout is not a plain list of full-attention ``KVCache``."""


def num_cache_layers(model: nn.Module) -> int:
    """Number of per-layer caches ``model`` uses; raises if they are not plain ``KVCache``.

    Raises:
        UnsupportedModelError: For models with rotating, quantized or state-space caches.
    """
    caches = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in caches):
        kinds = sorted({type(c).__name__ for c in caches})
        raise UnsupportedModelError(
            f"only models whose caches are all KVCache are supported, got {kinds}"
        )
    return len(caches)


def _round_capacity(columns: int) -> int:
    return -(-max(columns, 1) // CAPACITY_STEP) * CAPACITY_STEP


class SlotCache:
    """Keys/values of ``batch_size`` rows for every layer (see the module docstring).

    Attributes:
        batch_size: Number of rows ``B``.
        layers: One :class:`SlotLayerCache` per layer: the model's cache list.
        capacity: Columns allocated per row (0 until the first write).
        width: Columns the current forward attends over.
        start: Common first column of a prefill forward, or -1 during decode.
    """

    def __init__(self, num_layers: int, batch_size: int):
        self.batch_size = batch_size
        self.layers = [SlotLayerCache(self, i) for i in range(num_layers)]
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.capacity = 0
        self.width = 0
        self.start = 0
        self._wanted = 0
        self._positions: mx.array | None = None
        self._write_index: mx.array | None = None
        self._masks: dict[tuple[int, int | None], Any] = {}

    # -- forward setup -------------------------------------------------------------------

    def reserve(self, columns: int) -> None:
        """Make every row able to hold ``columns`` positions (grows in steps of 256)."""
        self._wanted = max(self._wanted, columns)
        if self.keys[0] is not None and columns > self.capacity:
            self._grow(_round_capacity(columns))

    def begin_decode(self, lengths: np.ndarray) -> None:
        """Set up a one-token-per-row forward; row ``b`` writes at column ``lengths[b]``.

        Args:
            lengths: ``(B,)`` ints, the positions each row already holds.
        """
        self.start = -1
        self._positions = mx.array(lengths.astype(np.int32))
        self.width = int(lengths.max()) + 1
        self._write_index = None
        self._masks = {}
        self.reserve(self.width)

    def begin_prefill(self, start: int, num_tokens: int) -> None:
        """Set up a forward of ``num_tokens`` tokens per row at columns ``[start, start+T)``."""
        self.start = start
        self._positions = None
        self.width = start + num_tokens
        self._write_index = None
        self._masks = {}
        self.reserve(self.width)

    # -- what the layer views call -------------------------------------------------------

    def offset(self) -> int | mx.array:
        """Rotary offset: the common start (prefill) or the ``(B,)`` positions (decode)."""
        return self._positions if self.start < 0 else self.start

    def mask(self, num_tokens: int, window_size: int | None) -> Any:
        """This forward's attention mask, built once and shared by all layers.

        Returns:
            ``"causal"``, or a bool array: ``(T, width)`` for prefill, ``(B, 1, 1, width)``
            for decode.
        """
        key = (num_tokens, window_size)
        if key not in self._masks:
            self._masks[key] = self._build_mask(num_tokens, window_size)
        return self._masks[key]

    def _build_mask(self, num_tokens: int, window_size: int | None) -> Any:
        if self.start >= 0:
            if self.start == 0 and window_size is None:
                return "causal"
            return create_causal_mask(num_tokens, offset=self.start, window_size=window_size)
        cols = mx.arange(self.width)[None]
        pos = self._positions[:, None]
        visible = cols <= pos
        if window_size is not None:
            visible = visible & (cols > pos - window_size)
        return visible[:, None, None, :]

    def update_and_fetch(
        self, layer: int, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Store ``(B, H, T, D)`` keys/values of ``layer``; return its ``(B, H, width, D)``."""
        if self.keys[layer] is None:
            self._allocate(layer, keys.shape, values.shape, keys.dtype)
        if self.start >= 0:
            end = self.start + keys.shape[2]
            self.keys[layer][..., self.start : end, :] = keys
            self.values[layer][..., self.start : end, :] = values
        else:
            index = self._index(keys.shape)
            self.keys[layer] = mx.put_along_axis(self.keys[layer], index, keys, axis=2)
            if values.shape != keys.shape:
                index = mx.broadcast_to(self._positions[:, None, None, None], values.shape)
            self.values[layer] = mx.put_along_axis(self.values[layer], index, values, axis=2)
        w = self.width
        return self.keys[layer][..., :w, :], self.values[layer][..., :w, :]

    def _index(self, shape: tuple[int, ...]) -> mx.array:
        if self._write_index is None or self._write_index.shape != tuple(shape):
            self._write_index = mx.broadcast_to(self._positions[:, None, None, None], shape)
        return self._write_index

    # -- storage ---------------------------------------------------------------------------

    def _allocate(
        self, layer: int, key_shape: tuple[int, ...], value_shape: tuple[int, ...], dtype: Any
    ) -> None:
        if self.capacity == 0:
            self.capacity = _round_capacity(max(self._wanted, self.width))
        b, h = self.batch_size, key_shape[1]
        self.keys[layer] = mx.zeros((b, h, self.capacity, key_shape[3]), dtype)
        self.values[layer] = mx.zeros((b, value_shape[1], self.capacity, value_shape[3]), dtype)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is None:
                continue
            pad_k = mx.zeros((*k.shape[:2], extra, k.shape[3]), k.dtype)
            pad_v = mx.zeros((*v.shape[:2], extra, v.shape[3]), v.dtype)
            self.keys[i] = mx.concatenate([k, pad_k], axis=2)
            self.values[i] = mx.concatenate([v, pad_v], axis=2)
        self.capacity = capacity

    def insert_rows(self, rows: list[int], source: SlotCache, columns: int) -> None:
        """Copy columns ``[0, columns)`` of every row of ``source`` into ``rows``.

        Args:
            rows: Destination row of each of ``source``'s rows, in order.
            source: A cache whose rows were just prefilled (same layer count).
            columns: Number of leading columns to copy.
        """
        self.reserve(columns)
        idx = mx.array(rows, dtype=mx.int32)
        for i in range(len(self.layers)):
            src_k, src_v = source.keys[i], source.values[i]
            if self.keys[i] is None:
                self._allocate(i, src_k.shape, src_v.shape, src_k.dtype)
            self.keys[i][idx, :, :columns, :] = src_k[..., :columns, :]
            self.values[i][idx, :, :columns, :] = src_v[..., :columns, :]

    def fill_prefix(self, keys: list[mx.array], values: list[mx.array]) -> None:
        """Write the same ``(1, H, p, D)`` keys/values per layer into columns ``[0, p)`` of
        every row."""
        p = keys[0].shape[2]
        self.reserve(p)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if self.keys[i] is None:
                self._allocate(i, k.shape, v.shape, k.dtype)
            b = self.batch_size
            self.keys[i][..., :p, :] = mx.broadcast_to(k, (b, *k.shape[1:]))
            self.values[i][..., :p, :] = mx.broadcast_to(v, (b, *v.shape[1:]))

    def keep_rows(self, rows: np.ndarray) -> None:
        """Drop every row not in ``rows`` (kept rows are renumbered ``0..len(rows)-1``)."""
        idx = mx.array(np.asarray(rows, dtype=np.int32))
        for i in range(len(self.layers)):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][idx]
                self.values[i] = self.values[i][idx]
        self.batch_size = int(idx.shape[0])

    def arrays(self) -> list[mx.array]:
        """Every allocated buffer (e.g. to evaluate them)."""
        return [a for a in (*self.keys, *self.values) if a is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(a.nbytes for a in self.arrays())


class SlotLayerCache:
    """The cache object one attention layer sees: a view of its :class:`SlotCache`."""

    def __init__(self, parent: SlotCache, layer: int):
        self.parent = parent
        self.layer = layer

    @property
    def offset(self) -> int | mx.array:
        """Rotary offset of this forward's first token (int, or ``(B,)`` per row)."""
        return self.parent.offset()

    def make_mask(
        self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs: Any
    ) -> Any:
        """Mask for ``N`` new tokens per row (see :meth:`SlotCache.mask`)."""
        mask = self.parent.mask(N, window_size)
        if return_array and isinstance(mask, str):
            return create_causal_mask(N, offset=self.parent.start)
        return mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store ``(B, H, T, D)`` keys/values; return ``(B, H, width, D)`` keys/values."""
        return self.parent.update_and_fetch(self.layer, keys, values)

    @property
    def state(self) -> tuple[Any, Any]:
        """This layer's ``(keys, values)`` buffers."""
        return self.parent.keys[self.layer], self.parent.values[self.layer]
