"""The parallel draft head (ParallelSpec, Xiao et al. 2024): ``k`` future tokens in one pass.

For an anchor ``t`` (the last accepted position) the head reads ``C`` *context* items and
``k`` *mask* items and predicts ``x_{t+2} .. x_{t+k+1}`` at once (``g0 = x_{t+1}`` is the
root, already known):

* hidden items: ``hidden_proj(h_p)`` for the target's final hidden states at the last
  ``C`` accepted positions ``p = t-C+1 .. t`` (slots before the start of the sequence are
  padding that no mask reads), at RoPE positions ``p - t`` (``-C+1 .. 0``);
* the root item: ``token_proj(e(g0))`` (``e`` the target's frozen input embedding), at
  position ``1``;
* mask ``j = 1 .. k``: ``mask_embedding[j-1] + mask_position[j-1]``, at position ``1 + j``
  (where its token ``x_{t+1+j}`` sits).

One pre-norm transformer layer (multi-head attention with rotary positions under the
group-wise visibility of :mod:`mlx_redrafter.drafters.group_mask`, then a SwiGLU MLP),
a final RMSNorm and the shared bias-free ``lm_head`` ``(d -> K)`` turn the ``k`` mask
outputs into ``k`` distributions over the draft vocabulary (``K = V`` or a reduced
vocabulary of target ids, as for ReDrafter). The drafter builds a candidate tree from them
(:mod:`mlx_redrafter.drafters.factorized_tree`); the engine verifies it unchanged.

Checkpoint: a directory with ``config.json`` (``model_type: "parallel_spec_drafter"``,
``vocab_size``, ``hidden_size``, ``num_masks`` (``k``), ``context`` (``C``), ``num_heads``,
``mlp_dim``, ``rope_base``, optional ``draft_vocab_size``) and ``model.safetensors`` whose
keys are the parameter names of :class:`ParallelHead` plus the optional int32
``draft_vocab`` ``(K,)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.beam_search import Embedder, compile_with_head
from mlx_redrafter.drafters.factorized_tree import factorized_tree
from mlx_redrafter.drafters.group_mask import example_layout, group_attention_mask
from mlx_redrafter.drafters.redrafter import (
    CONFIG_FILE,
    DRAFT_VOCAB_KEY,
    WEIGHTS_FILE,
    _check_draft_vocab,
    check_dims,
    compute_dtype,
    embedding_dims,
    find_input_embedding,
)

MODEL_TYPE = "parallel_spec_drafter"
_CORE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_masks",
    "context",
    "num_heads",
    "mlp_dim",
    "rope_base",
    "draft_vocab_size",
)


@dataclass
class ParallelConfig:
    """Shape of a parallel head (the ``config.json`` of a checkpoint).

    Attributes:
        vocab_size: ``V``, the target's vocabulary.
        hidden_size: ``d``, the target's hidden size (also the layer's width).
        num_masks: ``k``, tokens drafted per pass.
        context: ``C``, hidden states of the last accepted positions read per pass.
        num_heads: Attention heads (``d`` must be a multiple, with an even head size).
        mlp_dim: Width of the SwiGLU MLP.
        rope_base: Base of the rotary position frequencies.
        draft_vocab_size: ``K`` for a reduced draft vocabulary, ``None`` for ``K = V``.
        extra: Other ``config.json`` keys, kept verbatim.
    """

    vocab_size: int
    hidden_size: int
    num_masks: int
    context: int = 4
    num_heads: int = 4
    mlp_dim: int = 0
    rope_base: float = 10000.0
    draft_vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mlp_dim == 0:
            self.mlp_dim = 2 * self.hidden_size
        for key in ("vocab_size", "hidden_size", "num_masks", "context", "num_heads", "mlp_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"parallel drafter config: '{key}' must be a positive integer")
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_dim % 2:
            raise ValueError(
                f"parallel drafter config: hidden_size {self.hidden_size} is not num_heads "
                f"{self.num_heads} x an even head size"
            )
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError("parallel drafter config: draft_vocab_size must be in [1, vocab_size]")

    @property
    def output_size(self) -> int:
        """``K``: rows of ``lm_head``."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ParallelConfig:
        """Parse a ``config.json`` dict (unknown keys go to ``extra``)."""
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"drafter config: 'model_type' must be '{MODEL_TYPE}', got {raw.get('model_type')!r}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "num_masks") if k not in raw]
        if missing:
            raise ValueError(f"parallel drafter config: missing key '{missing[0]}'")
        known = {k: raw[k] for k in _CORE_KEYS[1:] if k in raw}
        return cls(**known, extra={k: v for k, v in raw.items() if k not in _CORE_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict."""
        out: dict[str, Any] = {
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_masks": self.num_masks,
            "context": self.context,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "rope_base": self.rope_base,
        }
        if self.draft_vocab_size is not None:
            out["draft_vocab_size"] = self.draft_vocab_size
        out.update(self.extra)
        return out


def rotate(x: mx.array, positions: mx.array, base: float) -> mx.array:
    """Rotary position embedding of ``x`` ``(B, H, S, hd)`` at ``positions`` ``(B or 1, S)``."""
    half = x.shape[-1] // 2
    freqs = mx.exp(-math.log(base) * mx.arange(half, dtype=mx.float32) / half)
    angles = positions.astype(mx.float32)[:, None, :, None] * freqs
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class ParallelLayer(nn.Module):
    """One pre-norm transformer layer: masked rotary attention, then a SwiGLU MLP."""

    def __init__(self, dims: int, num_heads: int, mlp_dim: int, rope_base: float):
        super().__init__()
        self.num_heads = num_heads
        self.rope_base = rope_base
        self.attention_norm = nn.RMSNorm(dims)
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.o_proj = nn.Linear(dims, dims, bias=False)
        self.mlp_norm = nn.RMSNorm(dims)
        self.gate_proj = nn.Linear(dims, mlp_dim, bias=False)
        self.up_proj = nn.Linear(dims, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, dims, bias=False)

    def _split_heads(self, y: mx.array) -> mx.array:
        """``(B, S, d) -> (B, H, S, d / H)``."""
        b, s, d = y.shape
        return y.reshape(b, s, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    def attention(self, x: mx.array, positions: mx.array, visible: mx.array) -> mx.array:
        """``(B, S, d) -> (B, S, d)``; ``positions`` ``(B or 1, S)``, ``visible`` ``(B or 1, S, S)``."""
        b, s, d = x.shape
        q = rotate(self._split_heads(self.q_proj(x)), positions, self.rope_base)
        k = rotate(self._split_heads(self.k_proj(x)), positions, self.rope_base)
        v = self._split_heads(self.v_proj(x))
        scores = (q @ k.transpose(0, 1, 3, 2)) * (d // self.num_heads) ** -0.5
        scores = mx.where(visible[:, None], scores, mx.array(-mx.inf, scores.dtype))
        out = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype) @ v
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, s, d))

    def __call__(self, x: mx.array, positions: mx.array, visible: mx.array) -> mx.array:
        """``x`` ``(B, S, d)`` -> ``(B, S, d)`` under ``visible`` ``(B or 1, S, S)``."""
        x = x + self.attention(self.attention_norm(x), positions, visible)
        y = self.mlp_norm(x)
        return x + self.down_proj(nn.silu(self.gate_proj(y)) * self.up_proj(y))


class ParallelHead(nn.Module):
    """The parallel draft head; ``ParallelHead(config)`` is randomly initialised.

    Args:
        config: Shape of the head.
        draft_vocab: ``(K,)`` int32 target ids of a reduced draft vocabulary; required
            exactly when ``config.draft_vocab_size`` is set. Not a trainable parameter.
    """

    def __init__(self, config: ParallelConfig, draft_vocab: mx.array | None = None):
        super().__init__()
        d, k = config.hidden_size, config.num_masks
        self._config = config
        self.hidden_proj = nn.Linear(d, d)
        self.token_proj = nn.Linear(d, d)
        self.mask_embedding = mx.random.normal((k, d)) * 0.02
        self.mask_position = mx.random.normal((k, d)) * 0.02
        self.layer = ParallelLayer(d, config.num_heads, config.mlp_dim, config.rope_base)
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, config.output_size, bias=False)
        if (draft_vocab is None) != (config.draft_vocab_size is None):
            raise ValueError("draft_vocab must be given exactly when draft_vocab_size is set")
        if draft_vocab is not None and tuple(draft_vocab.shape) != (config.output_size,):
            raise ValueError(
                f"'{DRAFT_VOCAB_KEY}' has shape {tuple(draft_vocab.shape)}, "
                f"expected ({config.output_size},)"
            )
        self._draft_vocab = None if draft_vocab is None else draft_vocab.astype(mx.int32)

    @property
    def config(self) -> ParallelConfig:
        """The head's :class:`ParallelConfig`."""
        return self._config

    @property
    def draft_vocab(self) -> mx.array | None:
        """``(K,)`` int32 target ids of the draft vocabulary, ``None`` when ``K = V``."""
        return self._draft_vocab

    @property
    def dtype(self) -> mx.Dtype:
        """Dtype of the head's weights."""
        return self.lm_head.weight.dtype

    def example_positions(self) -> mx.array:
        """``(1, S)`` int32 RoPE positions of one example ``[C hidden, root, k masks]``."""
        c, k = self._config.context, self._config.num_masks
        return mx.arange(-c + 1, k + 2, dtype=mx.int32)[None]

    def example_items(self, hidden: mx.array, root_embedding: mx.array) -> mx.array:
        """Input items ``(B, C + 1 + k, d)`` from ``hidden`` ``(B, C, d)`` and ``e(g0)`` ``(B, d)``."""
        b = hidden.shape[0]
        masks = (self.mask_embedding + self.mask_position).astype(hidden.dtype)
        return mx.concatenate(
            [
                self.hidden_proj(hidden),
                self.token_proj(root_embedding)[:, None],
                mx.broadcast_to(masks[None], (b, *masks.shape)),
            ],
            axis=1,
        )

    def outputs(self, items: mx.array, positions: mx.array, visible: mx.array) -> mx.array:
        """Draft logits ``(B, S, K)`` of every item of packed sequences ``(B, S, d)``.

        ``positions`` ``(B or 1, S)`` and ``visible`` ``(B or 1, S, S)``
        (:func:`~mlx_redrafter.drafters.group_mask.group_attention_mask`). Only the
        mask items' rows are drafts.
        """
        return self.lm_head(self.norm(self.layer(items, positions, visible)))

    def logits(
        self,
        hidden: mx.array,
        valid: mx.array,
        root_embedding: mx.array,
        depths: int | None = None,
    ) -> mx.array:
        """Draft logits ``(B, D, K)`` of ``x_{t+2} .. x_{t+D+1}`` for ``B`` anchors.

        Args:
            hidden: ``(B, C, d)`` hidden states ``h_{t-C+1} .. h_t``, oldest first.
            valid: ``(B, C)`` bool, slots holding a real state.
            root_embedding: ``(B, d)`` target embedding of ``g0 = x_{t+1}``.
            depths: ``D <= k`` depths to project onto the vocabulary (default ``k``).
        """
        k = self._config.num_masks
        group, window = example_layout(valid, k)
        visible = group_attention_mask(group, window)
        items = self.example_items(hidden, root_embedding)
        first = self._config.context + 1
        x = self.layer(items, self.example_positions(), visible)
        return self.lm_head(self.norm(x[:, first : first + (depths or k)]))

    def to_target_ids(self, ids: mx.array) -> mx.array:
        """Map draft-vocabulary ids ``(...)`` in ``[0, K)`` to target ids ``(...)``."""
        if self._draft_vocab is None:
            return ids.astype(mx.int32)
        return self._draft_vocab[ids]

    def checkpoint_weights(self, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
        """All checkpoint tensors by name, floating ones cast to ``dtype``."""
        weights = dict(tree_flatten(self.parameters()))
        if dtype is not None:
            weights = {k: v.astype(dtype) for k, v in weights.items()}
        if self._draft_vocab is not None:
            weights[DRAFT_VOCAB_KEY] = self._draft_vocab
        return weights


# ------------------------------------------------------------------------- file I/O


def expected_shapes(config: ParallelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of a head with ``config`` and its shape."""
    d, k, m = config.hidden_size, config.num_masks, config.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        "hidden_proj.weight": (d, d),
        "hidden_proj.bias": (d,),
        "token_proj.weight": (d, d),
        "token_proj.bias": (d,),
        "mask_embedding": (k, d),
        "mask_position": (k, d),
        "layer.attention_norm.weight": (d,),
        "layer.mlp_norm.weight": (d,),
        "layer.gate_proj.weight": (m, d),
        "layer.up_proj.weight": (m, d),
        "layer.down_proj.weight": (d, m),
        "norm.weight": (d,),
        "lm_head.weight": (config.output_size, d),
    }
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"layer.{name}.weight"] = (d, d)
    if config.draft_vocab_size is not None:
        shapes[DRAFT_VOCAB_KEY] = (config.draft_vocab_size,)
    return shapes


def validate_weights(config: ParallelConfig, weights: dict[str, mx.array]) -> None:
    """Check that ``weights`` are exactly the keys and shapes of a head with ``config``."""
    shapes = expected_shapes(config)
    for key, shape in shapes.items():
        if key not in weights:
            raise ValueError(f"parallel drafter weights: missing key '{key}'")
        if tuple(weights[key].shape) != shape:
            raise ValueError(
                f"parallel drafter weights: '{key}' has shape {tuple(weights[key].shape)}, "
                f"expected {shape}"
            )
    unexpected = sorted(k for k in weights if k not in shapes)
    if unexpected:
        raise ValueError(f"parallel drafter weights: unexpected key '{unexpected[0]}'")
    if config.draft_vocab_size is not None:
        _check_draft_vocab(config, weights[DRAFT_VOCAB_KEY])


def read_config(path: str | Path) -> ParallelConfig:
    """Read and validate ``path/config.json``."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"no {CONFIG_FILE} in drafter directory {path}")
    return ParallelConfig.from_dict(json.loads(file.read_text()))


def load_head(
    path: str | Path, model: nn.Module | None = None, dtype: mx.Dtype | None = None
) -> ParallelHead:
    """Load and validate a parallel head directory (checked against ``model`` if given)."""
    path = Path(path)
    config = read_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in drafter directory {path}")
    weights = mx.load(str(file))
    validate_weights(config, weights)
    head = ParallelHead(config, draft_vocab=weights.get(DRAFT_VOCAB_KEY))
    head.load_weights([(k, v) for k, v in weights.items() if k != DRAFT_VOCAB_KEY])
    if model is not None:
        check_dims(config, *embedding_dims(find_input_embedding(model)))
    if dtype is not None:
        head.set_dtype(dtype)
    mx.eval(head.parameters())
    return head


def save_head(head: ParallelHead, path: str | Path, dtype: mx.Dtype | None = None) -> Path:
    """Write ``head`` as a drafter directory (``config.json`` + ``model.safetensors``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = head.checkpoint_weights(dtype)
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    (path / CONFIG_FILE).write_text(json.dumps(head.config.to_dict(), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- drafter


def draft_pass(
    head: ParallelHead,
    embedding: Embedder,
    recent: mx.array,
    count: mx.array,
    root: mx.array,
    width: int,
    length: int,
    budget: int | None,
    with_logprobs: bool,
) -> tuple[mx.array, ...]:
    """One proposal as a pure MLX graph (what :class:`ParallelDrafter` compiles).

    Args:
        head, embedding: The head and the target's input embedding.
        recent: ``(n, d)`` hidden states of the last ``n`` accepted positions, oldest
            first (the last ``C`` are used; fewer are padded).
        count: ``()`` int32, how many of the last rows of ``recent`` are real.
        root: ``()`` int32 root token ``g0``.
        width, length: ``W`` beams of ``L`` tokens (``L - 1 <= k``).
        budget: Drafted-node budget of the tree (``None``: ``W x (L - 1)``).
        with_logprobs: Also return the draft log-probabilities ``(L-1, K)``.

    Returns:
        ``(beams (W, L) int32 target ids, valid (W, L) bool)`` and, with
        ``with_logprobs``, ``logprobs (L-1, K) float32``.
    """
    c = head.config.context
    n = recent.shape[0]
    if n >= c:
        recent = recent[n - c :]
    else:
        recent = mx.concatenate([mx.zeros((c - n, recent.shape[1]), recent.dtype), recent])
    valid = mx.arange(c) >= c - mx.minimum(count, min(n, c))
    root = root.reshape(1).astype(mx.int32)
    embedded = embedding(root).astype(head.dtype)
    logits = head.logits(recent[None].astype(head.dtype), valid[None], embedded, length - 1)[0]
    logprobs = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    paths, _, keep = factorized_tree(logprobs, width, budget)
    beams = mx.concatenate(
        [mx.broadcast_to(root[None], (width, 1)), head.to_target_ids(paths)], axis=1
    )
    valid_out = mx.concatenate([mx.ones((width, 1), mx.bool_), keep], axis=1)
    if with_logprobs:
        return beams, valid_out, logprobs
    return beams, valid_out


class ParallelDrafter:
    """Proposes a tree from one pass of a :class:`ParallelHead` (deterministic, pipelined).

    Args:
        head: The head.
        embedding: The target's input embedding module or a callable ``(n,) -> (n, d)``.
        budget: Drafted nodes per tree (``None``: every position of the ``W`` beams).
        keep_logprobs: Return ``Draft.draft_logprobs`` ``(W, L-1, V)`` (for the
            ReDrafter acceptance rule).
        compile: Compile one graph per ``(W, L)`` (default).
    """

    stochastic: bool = False
    needs_host_tokens: bool = False

    def __init__(
        self,
        head: ParallelHead,
        embedding: Embedder,
        *,
        budget: int | None = None,
        keep_logprobs: bool = False,
        compile: bool = True,
    ):
        self.head = head
        self.embedding = embedding
        self.budget = budget
        self.keep_logprobs = keep_logprobs
        self.compile = compile
        self._functions: dict[tuple[int, int, int | None, bool], Any] = {}

    @property
    def hidden_window(self) -> int:
        """``C``: the engine keeps this many recent hidden states in ``DraftContext``."""
        return self.head.config.context

    @classmethod
    def from_model(
        cls, model: nn.Module, head: ParallelHead | str | Path, **kwargs: Any
    ) -> ParallelDrafter:
        """A drafter for ``model`` from a head or a head directory (computes in the target's dtype)."""
        if not isinstance(head, ParallelHead):
            head = load_head(head, model=model, dtype=compute_dtype(model))
        else:
            check_dims(head.config, *embedding_dims(find_input_embedding(model)))
        return cls(head, find_input_embedding(model), **kwargs)

    def _function(self, width: int, length: int) -> Any:
        if width < 1 or not 2 <= length <= self.head.config.num_masks + 1:
            raise ValueError(
                f"need width >= 1 and 2 <= length <= k + 1 = {self.head.config.num_masks + 1}, "
                f"got W={width}, L={length}"
            )
        key = (width, length, self.budget, self.keep_logprobs)
        if key not in self._functions:
            fn = partial(
                draft_pass,
                self.head,
                self.embedding,
                width=width,
                length=length,
                budget=self.budget,
                with_logprobs=self.keep_logprobs,
            )
            if self.compile:
                fn = compile_with_head(fn, self.head, self.embedding)
            self._functions[key] = fn
        return self._functions[key]

    def reset(self, prompt_tokens: list[int]) -> None:
        """Nothing to reset: a proposal depends only on the context it is given."""

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """``W`` beams ``(W, L)`` of target ids (root first) and their valid mask (lazy)."""
        recent = context.recent_hidden
        count = context.recent_count
        if recent is None:
            recent, count = context.hidden[None], mx.array(1, mx.int32)
        outputs = self._function(width, length)(recent, count, context.root)
        logprobs = None
        if self.keep_logprobs:
            logprobs = self._target_logprobs(outputs[2], width)
        return Draft(beams=outputs[0], draft_logprobs=logprobs, valid=outputs[1])

    def _target_logprobs(self, logprobs: mx.array, width: int) -> mx.array:
        """``(L-1, K)`` draft log-probabilities as ``(W, L-1, V)`` (same at every beam)."""
        vocab = self.head.config.vocab_size
        if self.head.draft_vocab is None:
            full = logprobs
        else:
            full = mx.full((logprobs.shape[0], vocab), -mx.inf, dtype=mx.float32)
            full[:, self.head.draft_vocab] = logprobs
        return mx.broadcast_to(full[None], (width, *full.shape))

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to update: the engine keeps the recent hidden states."""
