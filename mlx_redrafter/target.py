"""The target model: ordinary causal forwards and tree forwards over an unmodified mlx-lm model.

A tree forward appends the ``N`` nodes of a packed :class:`~mlx_redrafter.tree.Tree` after
the ``T`` cached tokens. Every node must see the cached prefix and its own ancestors only,
at position ``T + depth``. mlx-lm models offer no mask or position argument, but every
attention layer

* builds its mask through ``cache.make_mask(N, return_array=..., window_size=...)`` and
* applies ``self.rope(x, offset=cache.offset)``.

So :meth:`Target.tree_forward` hands each layer a :class:`_LayerView` of its real cache
whose ``make_mask`` returns the tree mask (with sliding windows measured in positions)
and whose ``offset`` is the ``(N,)`` array of per-node positions. At construction every
attention ``rope`` is shadowed by a :class:`_PositionalRoPE`, which behaves exactly like
the original rope except when handed such a per-token positions array: then it rotates
the ``(1, H, N, D)`` input as ``N`` rows of one token each (``mx.fast.rope`` takes one
offset per batch row).

The final hidden state (output of the final norm, input of the LM head) is recorded by a
:class:`_HiddenTap` shadowing the final norm; logits come from the model's own
``__call__``, so logit soft-capping and tied heads stay the model's. A drafter that reads
the residual stream at the inputs of some layers (EAGLE-3) asks for ``taps``: the model's
list of layers is then shadowed by a copy whose tapped entries are
:class:`_LayerInputTap` wrappers recording their input, and the features the target
returns are those inputs concatenated (without taps nothing is wrapped).

Shadowing sets a plain instance attribute (``object.__setattr__``) on the owning module.
Attribute lookup finds it before the module's dict entry, while the module tree (the
dict) keeps the original norm and rope objects: ``model.parameters()``, ``load_weights``
and ``nn.quantize`` see the model exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from mlx_redrafter.tree import Tree

#: Attribute paths (from the ``Model``) tried, in order, for the final norm.
NORM_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "norm"),
    ("model", "final_layernorm"),
    ("model", "ln_f"),
    ("transformer", "ln_f"),
    ("language_model", "model", "norm"),
    ("norm",),
)
#: Attribute paths (from the ``Model``) tried, in order, for the input embedding table.
EMBED_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "embed_tokens"),
    ("model", "wte"),
    ("transformer", "wte"),
    ("language_model", "model", "embed_tokens"),
    ("embed_tokens",),
)
#: Attribute paths (from the ``Model``) tried, in order, for the list of decoder layers.
LAYER_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "layers"),
    ("language_model", "model", "layers"),
    ("transformer", "h"),
    ("layers",),
)
#: Positions used to check that a rope module accepts per-token positions.
_PROBE_POSITIONS = (5, 2, 9, 0)


class UnsupportedModelError(ValueError):
    """The model cannot be run by :class:`Target` (the message names the reason)."""


class _HiddenTap:
    """Calls the final norm and keeps its last output.

    Attributes:
        norm: The model's final norm module.
        hidden: ``(B, n, d)`` output of the last call (``None`` before the first call).
    """

    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.hidden: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        """Apply the norm to ``x`` ``(B, n, d)`` and record the result."""
        self.hidden = self.norm(x)
        return self.hidden

    def __getattr__(self, name: str) -> Any:
        if name == "norm":
            raise AttributeError(name)
        return getattr(self.norm, name)


class _LayerInputTap:
    """Calls a decoder layer and keeps its last input (the pre-norm residual stream).

    Attributes:
        layer: The model's layer module.
        hidden: ``(B, n, d)`` input of the last call (``None`` before the first call).
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.hidden: mx.array | None = None

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        """Record ``x`` ``(B, n, d)`` and run the layer on it."""
        self.hidden = x
        return self.layer(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)


class _TappedLayers(list):
    """The model's layers with the ``taps`` entries wrapped in :class:`_LayerInputTap`."""

    def __init__(self, layers: list, taps: tuple[int, ...]):
        self.taps = tuple(taps)
        wrapped = {i: _LayerInputTap(layers[i]) for i in sorted(set(self.taps))}
        super().__init__(wrapped.get(i, layer) for i, layer in enumerate(layers))
        self.wrappers = [wrapped[i] for i in self.taps]


def _is_per_token(x: mx.array, offset: Any) -> bool:
    """``True`` if ``offset`` holds one position per token of ``x`` ``(1, H, n, D)``.

    mlx-lm passes an ``int`` offset, or a ``(B,)`` array (one per batch row) for batched
    caches; a ``(n,)`` array with batch size 1 and ``n > 1`` tokens is neither.
    """
    return (
        isinstance(offset, mx.array)
        and offset.ndim == 1
        and x.ndim == 4
        and x.shape[0] == 1
        and x.shape[2] > 1
        and offset.shape[0] == x.shape[2]
    )


class _PositionalRoPE:
    """A rope that also accepts per-token positions.

    Attributes:
        rope: The attention module's original rope (any callable ``rope(x, offset)``).
    """

    def __init__(self, rope: nn.Module):
        self.rope = rope

    def __call__(self, x: mx.array, offset: Any = 0, *args: Any, **kwargs: Any) -> mx.array:
        """Rotate ``x`` ``(B, H, n, D)`` like the original rope.

        If ``offset`` is an ``(n,)`` array of positions (and ``B == 1``), token ``i`` is
        rotated to position ``offset[i]`` by viewing ``x`` as ``(n, H, 1, D)``.
        """
        if _is_per_token(x, offset):
            rows = self.rope(x.swapaxes(0, 2), *args, offset=offset, **kwargs)
            return rows.swapaxes(0, 2)
        return self.rope(x, *args, offset=offset, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "rope":
            raise AttributeError(name)
        return getattr(self.rope, name)


@dataclass(frozen=True)
class _TreeLayout:
    """Where the ``N`` tree nodes sit relative to the ``T`` cached tokens.

    Attributes:
        positions: ``(N,)`` int32 position of each node, ``T + depth``.
        visible: ``(N, T + N)`` bool, cached prefix fully visible, then the tree's
            ancestor-or-self mask.
        key_positions: ``(T + N,)`` int32 position of every key (``0..T-1``, then
            ``positions``).
    """

    positions: mx.array
    visible: mx.array
    key_positions: mx.array

    @classmethod
    def build(cls, tree: Tree, num_cached: int) -> _TreeLayout:
        """Layout of ``tree`` appended after ``num_cached`` tokens."""
        n = tree.size
        positions = mx.array(tree.depth + np.int32(num_cached))
        visible = mx.concatenate(
            [mx.ones((n, num_cached), dtype=mx.bool_), mx.array(tree.mask)], axis=1
        )
        key_positions = mx.concatenate([mx.arange(num_cached, dtype=mx.int32), positions])
        return cls(positions=positions, visible=visible, key_positions=key_positions)

    def mask(self, window: int | None) -> mx.array:
        """``(N, T + N)`` bool visibility, limited to keys less than ``window`` positions back."""
        if window is None:
            return self.visible
        distance = self.positions[:, None] - self.key_positions[None, :]
        return self.visible & (distance < window)


class _LayerView:
    """One layer's cache as the model sees it during a :class:`Target` forward.

    Everything except ``offset`` and ``make_mask`` is the real cache's
    (``update_and_fetch``, ``state``, ``keys``, ``bits``, ...).

    Attributes:
        cache: The layer's real cache.
        window: Sliding window the layer had in the model's own cache (a
            ``RotatingKVCache``), applied when the model asks for a mask without one.
        layout: Tree layout during a tree forward, ``None`` for a causal forward.
    """

    def __init__(self, cache: Any, window: int | None, layout: _TreeLayout | None = None):
        self.cache = cache
        self.window = window
        self.layout = layout

    @property
    def offset(self) -> int | mx.array:
        """Cached length (causal) or ``(N,)`` per-node positions (tree)."""
        if self.layout is None:
            return self.cache.offset
        return self.layout.positions

    def make_mask(
        self, N: int, return_array: bool = False, window_size: int | None = None
    ) -> mx.array | str | None:
        """The attention mask for ``N`` new tokens (``(N, T + N)`` bool in a tree forward)."""
        window = window_size or self.window
        if self.layout is None:
            return self.cache.make_mask(N, return_array=return_array, window_size=window)
        if self.layout.positions.shape[0] != N:
            raise ValueError(
                f"mask asked for {N} tokens, tree has {self.layout.positions.shape[0]}"
            )
        return self.layout.mask(window)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Append ``(1, H, n, D)`` keys and values to the real cache."""
        return self.cache.update_and_fetch(keys, values)

    @property
    def state(self) -> Any:
        """The real cache's state."""
        return self.cache.state

    def __getattr__(self, name: str) -> Any:
        if name == "cache":
            raise AttributeError(name)
        return getattr(self.cache, name)


def _find(
    model: nn.Module, paths: tuple[tuple[str, ...], ...], kind: type = nn.Module
) -> tuple[Any, str] | None:
    """First ``(owner, attribute)`` in ``paths`` that exists on ``model`` as a ``kind``."""
    for path in paths:
        owner = model
        for name in path[:-1]:
            owner = owner.get(name) if isinstance(owner, dict) else None
            if owner is None:
                break
        if isinstance(owner, nn.Module) and isinstance(owner.get(path[-1]), kind):
            return owner, path[-1]
    return None


def _shadow(owner: nn.Module, name: str, value: Any) -> None:
    """Make ``owner.<name>`` resolve to ``value`` while the module tree keeps the original."""
    object.__setattr__(owner, name, value)


def _install_tap(model: nn.Module) -> _HiddenTap:
    """Shadow the model's final norm with a :class:`_HiddenTap` (reusing an installed one)."""
    found = _find(model, NORM_PATHS)
    if found is None:
        raise UnsupportedModelError(
            "no final norm found (looked for " + ", ".join(".".join(p) for p in NORM_PATHS) + ")"
        )
    owner, name = found
    current = vars(owner).get(name)
    if isinstance(current, _HiddenTap):
        return current
    tap = _HiddenTap(owner[name])
    _shadow(owner, name, tap)
    return tap


def _layers_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """``(owner, attribute)`` of the model's list of decoder layers."""
    found = _find(model, LAYER_PATHS, list)
    if found is None:
        raise UnsupportedModelError(
            "no list of layers found (looked for "
            + ", ".join(".".join(p) for p in LAYER_PATHS)
            + ")"
        )
    return found


def _install_layer_taps(model: nn.Module, taps: tuple[int, ...] | None) -> list[_LayerInputTap]:
    """Shadow the model's layer list so the inputs of layers ``taps`` are recorded (in
    that order); ``None`` removes a shadow a previous call installed."""
    if not taps:  # a shadow a previous call installed goes; no layer list is no error
        try:
            owner, name = _layers_owner(model)
        except UnsupportedModelError:
            return []
        if isinstance(vars(owner).get(name), _TappedLayers):
            del vars(owner)[name]
        return []
    owner, name = _layers_owner(model)
    current = vars(owner).get(name)
    layers = owner[name]
    outside = [i for i in taps if not 0 <= i < len(layers)]
    if outside:
        raise UnsupportedModelError(
            f"the target has {len(layers)} layers; cannot read the inputs of layers {outside}"
        )
    if isinstance(current, _TappedLayers) and current.taps == tuple(taps):
        return current.wrappers
    shadow = _TappedLayers(layers, tuple(taps))
    _shadow(owner, name, shadow)
    return shadow.wrappers


def _probe_dims(rope: Any, owner: nn.Module) -> int:
    """Head dimension to probe ``rope`` with."""
    for source, attr in ((rope, "dims"), (rope, "dim"), (owner, "head_dim")):
        value = getattr(source, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"cannot tell the head dimension of {type(rope).__name__}")


def _check_positional(rope: _PositionalRoPE, dims: int) -> None:
    """Raise unless ``rope`` rotates per-token positions like one call per token."""
    x = mx.random.normal((1, 2, len(_PROBE_POSITIONS), dims), key=mx.random.key(0))
    name = type(rope.rope).__name__
    try:
        got = rope(x, offset=mx.array(_PROBE_POSITIONS, dtype=mx.int32))
        want = mx.concatenate(
            [rope.rope(x[:, :, i : i + 1], offset=p) for i, p in enumerate(_PROBE_POSITIONS)],
            axis=2,
        )
        error = mx.abs(got - want).max().item()
    except Exception as exc:  # any failure means the rope cannot take array offsets
        raise UnsupportedModelError(f"rope {name} cannot take per-token positions: {exc}") from exc
    if not error <= 1e-5:
        raise UnsupportedModelError(
            f"rope {name} gives different results for per-token positions (error {error:.3g})"
        )


def _install_ropes(layers: list[nn.Module]) -> None:
    """Shadow the ``rope`` of every attention module in ``layers`` with a positional one."""
    for index, layer in enumerate(layers):
        owners = [m for _, m in layer.named_modules() if isinstance(m.get("rope"), nn.Module)]
        if not owners:
            raise UnsupportedModelError(
                f"layer {index} has no `rope` module; tree positions cannot be applied"
            )
        for owner in owners:
            if isinstance(vars(owner).get("rope"), _PositionalRoPE):
                continue
            rope = _PositionalRoPE(owner["rope"])
            _check_positional(rope, _probe_dims(rope.rope, owner))
            _shadow(owner, "rope", rope)


def _layer_windows(model: nn.Module, num_layers: int) -> list[int | None]:
    """Per-layer sliding window implied by the model's own cache kinds.

    ``KVCache`` layers have none; ``RotatingKVCache`` layers get its ``max_size``.
    """
    if not hasattr(model, "make_cache"):
        return [None] * num_layers
    windows: list[int | None] = []
    for index, cache in enumerate(model.make_cache()):
        if type(cache) is KVCache:
            windows.append(None)
        elif type(cache) is RotatingKVCache and cache.keep == 0:
            windows.append(cache.max_size)
        elif type(cache) is RotatingKVCache:
            raise UnsupportedModelError(
                f"layer {index} needs a RotatingKVCache that keeps its first {cache.keep} "
                "entries (attention sinks); tree verification does not model that"
            )
        else:
            raise UnsupportedModelError(
                f"layer {index} needs a {type(cache).__name__} (not a plain attention KV "
                "cache, e.g. a state-space or chunked-attention layer); only attention layers "
                "with plain or sliding-window KV caches can verify trees"
            )
    if len(windows) != num_layers:
        raise UnsupportedModelError(f"model makes {len(windows)} caches for {num_layers} layers")
    return windows


class Target:
    """Runs an unmodified mlx-lm ``Model`` for speculative decoding.

    Construction shadows the final norm and the rope modules of ``model`` in place (see
    the module docstring); the model computes exactly what it did before.

    Args:
        model: The mlx-lm model.
        taps: Layers whose inputs are the features :meth:`forward` and
            :meth:`tree_forward` return, concatenated in this order (``(n, len(taps) d)``);
            ``None``: the final norm's output ``(n, d)``.

    Attributes:
        model: The wrapped mlx-lm model.
        windows: Per-layer sliding window (``None`` = full attention) enforced in masks.
        hidden_size: ``d``, width of the final hidden state.
        vocab_size: ``V``, number of logits.
    """

    def __init__(self, model: nn.Module, taps: tuple[int, ...] | None = None):
        self.model = model
        layers = [
            layer.layer if isinstance(layer, _LayerInputTap) else layer for layer in model.layers
        ]
        self.windows = _layer_windows(model, len(layers))
        found = _find(model, EMBED_PATHS)
        if found is None:
            raise UnsupportedModelError("no input embedding table found")
        self._embedding = found[0][found[1]]
        self._tap = _install_tap(model)
        _install_ropes(layers)
        self._layer_taps = _install_layer_taps(model, taps)
        args = getattr(model, "args", None)
        hidden = getattr(args, "hidden_size", None) or self._tap.norm.weight.shape[-1]
        vocab = getattr(args, "vocab_size", None) or self._embedding.weight.shape[0]
        self.hidden_size = int(hidden)
        self.vocab_size = int(vocab)

    def make_cache(self) -> list[KVCache]:
        """A fresh plain ``KVCache`` per layer (sliding windows are enforced in masks)."""
        return [KVCache() for _ in self.windows]

    def embed(self, ids: mx.array) -> mx.array:
        """Input embedding rows ``(..., d)`` of ``ids`` ``(...)`` (no model-specific scaling)."""
        return self._embedding(ids)

    def _features(self) -> mx.array:
        """``(1, n, d)`` final-norm output, or ``(1, n, len(taps) d)`` tapped inputs."""
        if not self._layer_taps:
            return self._tap.hidden
        return mx.concatenate([tap.hidden for tap in self._layer_taps], axis=-1)

    def forward(self, tokens: mx.array, cache: list[Any]) -> tuple[mx.array, mx.array]:
        """Causal forward of ``tokens`` ``(1, n)`` (or ``(n,)``), appended to ``cache``.

        Returns:
            ``(logits (n, V), hidden (n, d))``, ``hidden`` being the final-norm output (the
            tapped layer inputs ``(n, len(taps) d)`` with ``taps``).
        """
        tokens = tokens.reshape(1, -1)
        views = [
            c if window is None else _LayerView(c, window)
            for c, window in zip(cache, self.windows, strict=True)
        ]
        logits = self.model(tokens, cache=views)
        return logits[0], self._features()[0]

    def tree_forward(self, tree: Tree, cache: list[Any]) -> tuple[mx.array, mx.array]:
        """Forward the ``N`` nodes of ``tree`` after the ``T`` tokens in ``cache``.

        Node ``i`` sits at position ``T + tree.depth[i]`` and attends to all cached tokens
        and to its ancestors (limited by each layer's sliding window, if any). The cache
        grows by ``N`` entries in packed node order.

        Returns:
            ``(logits (N, V), hidden (N, d))``.
        """
        num_cached = _common_offset(cache)
        layout = _TreeLayout.build(tree, num_cached)
        views = [
            _LayerView(c, window, layout) for c, window in zip(cache, self.windows, strict=True)
        ]
        tokens = mx.array(tree.tokens)[None]
        logits = self.model(tokens, cache=views)
        return logits[0], self._features()[0]


def _common_offset(cache: list[Any]) -> int:
    """The cached length shared by all layers; raises for caches a tree cannot extend."""
    offsets = set()
    for index, c in enumerate(cache):
        if not isinstance(c, (KVCache, QuantizedKVCache)):
            raise TypeError(
                f"layer {index}: tree forward needs KVCache or QuantizedKVCache, got "
                f"{type(c).__name__} (use Target.make_cache())"
            )
        offsets.add(c.offset)
    if len(offsets) != 1:
        raise ValueError(f"cache layers disagree on their length: {sorted(offsets)}")
    return offsets.pop()
