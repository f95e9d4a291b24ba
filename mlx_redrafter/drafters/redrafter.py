"""The ReDrafter draft head: config, module, checkpoint I/O and the :class:`ReDrafter` drafter.

The head (Zhang et al. 2024, Apple-compatible) predicts the tokens after ``g0`` from the
target's last hidden state ``h`` ``(..., d)`` and a recurrent state ``s`` ``(..., d)`` fed
by the target's own (frozen, shared) input embedding table ``e``:

* ``rnn: true``:  ``s_0 = 0``, ``s_t = SiLU(W e(g_{t-1}) + U s_{t-1} + b)``;
* ``rnn: false``: ``s_t = s_{t-1} + e(g_{t-1})``;
* ``x = concat(h, s_t)`` ``(..., 2d)``, then ``input_proj`` (``2d -> exit_dim``, only when
  ``exit_dim != 2d``), ``num_draft_layers`` blocks ``x <- x + SiLU(Linear(x))`` and a
  bias-free ``Linear(exit_dim -> K)``, ``K = V`` or the size of a reduced draft vocabulary.

A checkpoint directory holds ``config.json`` (``model_type: "recurrent_drafting_drafter"``)
and ``model.safetensors`` with Apple's weight names; the optional reduced vocabulary is the
int32 tensor ``draft_vocab`` ``(K,)`` of target ids plus ``draft_vocab_size: K`` in the
config. Parameter names of :class:`ReDrafterHead` are exactly the checkpoint names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.beam_search import BeamSearcher, BeamSearchResult, Embedder
from mlx_redrafter.drafters.sampled_chain import ChainSampler

MODEL_TYPE = "recurrent_drafting_drafter"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DRAFT_VOCAB_KEY = "draft_vocab"
_CORE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "exit_dim",
    "num_draft_layers",
    "rnn",
    "draft_vocab_size",
)
DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
}


# --------------------------------------------------------------------------- config


def _positive_int(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise ValueError(f"drafter config: missing key '{key}'")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"drafter config: '{key}' must be a positive integer, got {value!r}")
    return value


@dataclass
class ReDrafterConfig:
    """Shape of a ReDrafter head (the ``config.json`` of a checkpoint).

    Attributes:
        vocab_size: ``V``, the target's vocabulary (rows of its embedding table).
        hidden_size: ``d``, the target's hidden size.
        exit_dim: Width of the residual blocks (``2d`` means no ``input_proj``).
        num_draft_layers: Number of residual blocks.
        rnn: Recurrent state update (``True``) or running sum of embeddings (``False``).
        draft_vocab_size: ``K`` for a reduced draft vocabulary, ``None`` for ``K = V``.
        extra: Other ``config.json`` keys, kept verbatim so conversions round-trip.
    """

    vocab_size: int
    hidden_size: int
    exit_dim: int
    num_draft_layers: int
    rnn: bool = True
    draft_vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers"):
            _positive_int({key: getattr(self, key)}, key)
        if not isinstance(self.rnn, bool):
            raise ValueError(f"drafter config: 'rnn' must be true or false, got {self.rnn!r}")
        if self.draft_vocab_size is not None:
            _positive_int({"draft_vocab_size": self.draft_vocab_size}, "draft_vocab_size")
            if self.draft_vocab_size > self.vocab_size:
                raise ValueError(
                    f"drafter config: draft_vocab_size {self.draft_vocab_size} exceeds "
                    f"vocab_size {self.vocab_size}"
                )

    @property
    def output_size(self) -> int:
        """``K``: rows of the last layer (draft vocabulary size)."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @property
    def has_input_proj(self) -> bool:
        """Whether the head projects ``concat(h, s)`` ``(2d)`` to ``exit_dim`` first."""
        return self.exit_dim != 2 * self.hidden_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReDrafterConfig:
        """Parse and validate a ``config.json`` dict (unknown keys go to ``extra``)."""
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"drafter config: 'model_type' must be '{MODEL_TYPE}', got {model_type!r}"
            )
        if "rnn" not in raw:
            raise ValueError("drafter config: missing key 'rnn'")
        draft_vocab_size = raw.get("draft_vocab_size")
        return cls(
            vocab_size=_positive_int(raw, "vocab_size"),
            hidden_size=_positive_int(raw, "hidden_size"),
            exit_dim=_positive_int(raw, "exit_dim"),
            num_draft_layers=_positive_int(raw, "num_draft_layers"),
            rnn=raw["rnn"],
            draft_vocab_size=None if draft_vocab_size is None else int(draft_vocab_size),
            extra={k: v for k, v in raw.items() if k not in _CORE_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict (``draft_vocab_size`` only for a reduced vocabulary)."""
        out: dict[str, Any] = {
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "exit_dim": self.exit_dim,
            "num_draft_layers": self.num_draft_layers,
            "rnn": self.rnn,
        }
        if self.draft_vocab_size is not None:
            out["draft_vocab_size"] = self.draft_vocab_size
        out.update(self.extra)
        return out


def read_config(path: str | Path) -> ReDrafterConfig:
    """Read and validate ``path/config.json``."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"no {CONFIG_FILE} in drafter directory {path}")
    return ReDrafterConfig.from_dict(json.loads(file.read_text()))


# ----------------------------------------------------------------------- validation


def expected_shapes(config: ReDrafterConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of a head with ``config`` and its shape."""
    d, x, n = config.hidden_size, config.exit_dim, config.num_draft_layers
    shapes: dict[str, tuple[int, ...]] = {}
    if config.rnn:
        shapes["rnn_w.weight"] = (d, d)
        shapes["rnn_u.weight"] = (d, d)
        shapes["rnn_u.bias"] = (d,)
    if config.has_input_proj:
        shapes["input_proj.weight"] = (x, 2 * d)
        shapes["input_proj.bias"] = (x,)
    for i in range(n):
        shapes[f"lm_head.{i}.linear.weight"] = (x, x)
        shapes[f"lm_head.{i}.linear.bias"] = (x,)
    shapes[f"lm_head.{n}.weight"] = (config.output_size, x)
    if config.draft_vocab_size is not None:
        shapes[DRAFT_VOCAB_KEY] = (config.draft_vocab_size,)
    return shapes


def _check_draft_vocab(config: ReDrafterConfig, ids: mx.array) -> None:
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"'{DRAFT_VOCAB_KEY}' must be an integer tensor, got {ids.dtype}")
    host = np.asarray(ids.astype(mx.int64))
    if host.size and (host.min() < 0 or host.max() >= config.vocab_size):
        raise ValueError(
            f"'{DRAFT_VOCAB_KEY}' holds ids outside [0, vocab_size={config.vocab_size})"
        )
    if np.unique(host).size != host.size:
        raise ValueError(f"'{DRAFT_VOCAB_KEY}' holds duplicate target ids")


def validate_weights(config: ReDrafterConfig, weights: dict[str, mx.array]) -> None:
    """Check that ``weights`` are exactly the keys and shapes a head with ``config`` has.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped key.
    """
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in weights]
    if missing:
        raise ValueError(
            f"drafter weights: missing key '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(k for k in weights if k not in shapes)
    if unexpected:
        raise ValueError(
            f"drafter weights: unexpected key '{unexpected[0]}' for a config with "
            f"rnn={config.rnn}, num_draft_layers={config.num_draft_layers}, "
            f"exit_dim={config.exit_dim}, hidden_size={config.hidden_size}"
        )
    for key, shape in shapes.items():
        got = tuple(weights[key].shape)
        if got != shape:
            raise ValueError(f"drafter weights: '{key}' has shape {got}, expected {shape}")
        if key != DRAFT_VOCAB_KEY and not mx.issubdtype(weights[key].dtype, mx.floating):
            raise ValueError(f"drafter weights: '{key}' must be floating, got {weights[key].dtype}")
    if config.draft_vocab_size is not None:
        _check_draft_vocab(config, weights[DRAFT_VOCAB_KEY])


def find_input_embedding(model: nn.Module) -> nn.Module:
    """The target's input embedding module (``nn.Embedding`` or ``nn.QuantizedEmbedding``).

    ``model`` may be an mlx-lm model or the embedding module itself.
    """
    kinds = (nn.Embedding, nn.QuantizedEmbedding)
    if isinstance(model, kinds):
        return model
    for owner in (model, getattr(model, "language_model", None)):
        inner = getattr(owner, "model", None)
        for holder in (inner, owner):
            embed = getattr(holder, "embed_tokens", None) if holder is not None else None
            if isinstance(embed, kinds):
                return embed
    for name, module in model.named_modules():
        if isinstance(module, kinds) and name.rsplit(".", 1)[-1] in ("embed_tokens", "wte"):
            return module
    raise ValueError("cannot find the target's input embedding (embed_tokens) in the model")


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The floating dtype the target computes in (its input embedding's, or its scales')."""
    embedding = find_input_embedding(model)
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.scales.dtype
    return embedding.weight.dtype


def embedding_dims(embedding: nn.Module) -> tuple[int, int]:
    """``(V, d)`` of an ``nn.Embedding`` / ``nn.QuantizedEmbedding``."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.num_embeddings, embedding.dims
    rows, dims = embedding.weight.shape
    return rows, dims


def check_dims(config: ReDrafterConfig, vocab_size: int, hidden_size: int) -> None:
    """Check the head's ``vocab_size`` / ``hidden_size`` against a target's ``(V, d)``.

    Raises:
        ValueError: naming ``vocab_size`` or ``hidden_size`` on a mismatch.
    """
    if config.vocab_size != vocab_size:
        raise ValueError(
            f"drafter vocab_size {config.vocab_size} does not match the target's vocabulary "
            f"size {vocab_size}"
        )
    if config.hidden_size != hidden_size:
        raise ValueError(
            f"drafter hidden_size {config.hidden_size} does not match the target's hidden "
            f"size {hidden_size}"
        )


def check_target(config: ReDrafterConfig, model: nn.Module) -> None:
    """Check that the head fits the target ``model`` (or its input embedding module).

    The target's ``(V, d)`` are the shape of its input embedding table.

    Raises:
        ValueError: naming ``vocab_size`` or ``hidden_size`` on a mismatch.
    """
    check_dims(config, *embedding_dims(find_input_embedding(model)))


# ---------------------------------------------------------------------------- module


class ResBlock(nn.Module):
    """``x <- x + SiLU(Linear(x))`` on ``(..., exit_dim)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        """``(..., exit_dim) -> (..., exit_dim)``."""
        return x + nn.silu(self.linear(x))


class ReDrafterHead(nn.Module):
    """The draft head. ``ReDrafterHead(config)`` is randomly initialised (for training).

    Args:
        config: Shape of the head.
        draft_vocab: ``(K,)`` int32 target ids of a reduced draft vocabulary; required
            exactly when ``config.draft_vocab_size`` is set. Not a trainable parameter.
    """

    def __init__(self, config: ReDrafterConfig, draft_vocab: mx.array | None = None):
        super().__init__()
        d, x = config.hidden_size, config.exit_dim
        self._config = config
        if config.rnn:
            self.rnn_w = nn.Linear(d, d, bias=False)
            self.rnn_u = nn.Linear(d, d, bias=True)
        if config.has_input_proj:
            self.input_proj = nn.Linear(2 * d, x, bias=True)
        self.lm_head = [ResBlock(x) for _ in range(config.num_draft_layers)]
        self.lm_head.append(nn.Linear(x, config.output_size, bias=False))
        if (draft_vocab is None) != (config.draft_vocab_size is None):
            raise ValueError(
                "draft_vocab must be given exactly when config.draft_vocab_size is set"
            )
        if draft_vocab is not None:
            if tuple(draft_vocab.shape) != (config.output_size,):
                raise ValueError(
                    f"'{DRAFT_VOCAB_KEY}' has shape {tuple(draft_vocab.shape)}, "
                    f"expected ({config.output_size},)"
                )
            self._draft_vocab = draft_vocab.astype(mx.int32)
        else:
            self._draft_vocab = None

    @property
    def config(self) -> ReDrafterConfig:
        """The head's :class:`ReDrafterConfig`."""
        return self._config

    @property
    def draft_vocab(self) -> mx.array | None:
        """``(K,)`` int32 target ids of the draft vocabulary, ``None`` when ``K = V``."""
        return self._draft_vocab

    @property
    def dtype(self) -> mx.Dtype:
        """Dtype of the head's weights."""
        return self.lm_head[-1].weight.dtype

    def initial_state(self, batch_shape: tuple[int, ...] = ()) -> mx.array:
        """``s_0 = 0`` of shape ``(*batch_shape, d)``."""
        return mx.zeros((*batch_shape, self._config.hidden_size), dtype=self.dtype)

    def rnn_step(self, state: mx.array, emb: mx.array) -> mx.array:
        """One state update ``s_{t-1}, e(g_{t-1}) -> s_t``, shapes ``(..., d)``."""
        if self._config.rnn:
            return nn.silu(self.rnn_w(emb) + self.rnn_u(state))
        return state + emb

    def logits(self, h: mx.array, state: mx.array) -> mx.array:
        """Draft logits ``(..., K)`` from ``h`` ``(..., d)`` and ``s_t`` ``(..., d)``.

        ``h`` broadcasts against ``state`` over the leading dimensions.
        """
        h = mx.broadcast_to(h, (*state.shape[:-1], h.shape[-1]))
        x = mx.concatenate([h, state], axis=-1)
        if self._config.has_input_proj:
            x = self.input_proj(x)
        for layer in self.lm_head:
            x = layer(x)
        return x

    def to_target_ids(self, ids: mx.array) -> mx.array:
        """Map draft-vocabulary ids ``(...)`` in ``[0, K)`` to target ids ``(...)``."""
        if self._draft_vocab is None:
            return ids.astype(mx.int32)
        return self._draft_vocab[ids]

    def target_to_draft(self) -> mx.array:
        """``(V,)`` int32: the draft id of each target id, ``-1`` outside the draft vocabulary."""
        v = self._config.vocab_size
        if self._draft_vocab is None:
            return mx.arange(v, dtype=mx.int32)
        table = mx.full((v,), -1, dtype=mx.int32)
        table[self._draft_vocab] = mx.arange(self._config.output_size, dtype=mx.int32)
        return table

    def checkpoint_weights(self, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
        """All checkpoint tensors by checkpoint name, floating ones cast to ``dtype``."""
        weights = dict(tree_flatten(self.parameters()))
        if dtype is not None:
            weights = {k: v.astype(dtype) for k, v in weights.items()}
        if self._draft_vocab is not None:
            weights[DRAFT_VOCAB_KEY] = self._draft_vocab
        return weights


def head_from_weights(config: ReDrafterConfig, weights: dict[str, mx.array]) -> ReDrafterHead:
    """Build a head from checkpoint tensors after :func:`validate_weights`."""
    validate_weights(config, weights)
    head = ReDrafterHead(config, draft_vocab=weights.get(DRAFT_VOCAB_KEY))
    head.load_weights([(k, v) for k, v in weights.items() if k != DRAFT_VOCAB_KEY])
    mx.eval(head.parameters())
    return head


# ------------------------------------------------------------------------- file I/O


def load_drafter(
    path: str | Path, model: nn.Module | None = None, dtype: mx.Dtype | None = None
) -> ReDrafterHead:
    """Load and validate a drafter directory (``config.json`` + ``model.safetensors``).

    Args:
        path: The directory.
        model: The target model (or its input embedding); when given, the head's
            ``vocab_size`` and ``hidden_size`` are checked against it.
        dtype: Cast the floating weights to this dtype (default: as stored).

    Raises:
        ValueError: naming the key or dimension that is missing or does not fit.
    """
    path = Path(path)
    config = read_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in drafter directory {path}")
    weights = mx.load(str(file))
    head = head_from_weights(config, weights)
    if model is not None:
        check_target(config, model)
    if dtype is not None:
        head.set_dtype(dtype)
    return head


def save_drafter(
    head: ReDrafterHead,
    path: str | Path,
    dtype: mx.Dtype | None = None,
    metadata_format: str = "mlx",
) -> Path:
    """Write ``head`` as a drafter directory (``config.json`` + ``model.safetensors``).

    Args:
        head: The head.
        path: Output directory (created if needed).
        dtype: Dtype of the floating tensors on disk (default: the head's).
        metadata_format: The safetensors ``format`` metadata (``"pt"`` for the Apple /
            transformers layout).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = head.checkpoint_weights(dtype)
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights, metadata={"format": metadata_format})
    (path / CONFIG_FILE).write_text(json.dumps(head.config.to_dict(), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- drafter


class ReDrafter:
    """The ReDrafter drafter: beam search of a :class:`ReDrafterHead`.

    Greedy decoding, and ``W > 1``, get the head's beam search (deterministic). Sampling
    with ``W = 1`` gets one chain *sampled* from the head (``sample``, the default; see
    :mod:`mlx_redrafter.drafters.sampled_chain`), returned with its proposal
    distribution in ``Draft.proposal`` so the exact walk tests it with ``min(1, p/q)``.

    Args:
        head: The draft head.
        embedding: The target's input embedding module or a callable ``(W,) -> (W, d)``.
        keep_logprobs: Return the head's log-probabilities in ``Draft.draft_logprobs``
            (target space, for the ReDrafter acceptance rule) and keep them in
            :attr:`last_search` (``logprobs`` ``(W, L-1, K)``; map them with
            :meth:`BeamSearchResult.target_logprobs`).
        sample: Sample the chain when decoding samples with ``W = 1`` (default: unless
            ``keep_logprobs``, whose rule is defined on beam search).
        compile: Compile one beam-search graph per ``(W, L)`` (default).
        top_k: Beam search renormalises the head's logits over their top ``top_k`` (Apple's
            ``warp_logits``; ``50`` reproduces Apple's beams and, with ``keep_logprobs``,
            its log-probabilities); ``None`` (default): the full log-softmax.

    Raises:
        ValueError: ``sample`` together with ``keep_logprobs``.
    """

    stochastic: bool = False
    #: Beam search drafts from the lazy hidden state and root: pipelined before the sync.
    needs_host_tokens: bool = False

    def __init__(
        self,
        head: ReDrafterHead,
        embedding: Embedder,
        *,
        keep_logprobs: bool = False,
        sample: bool | None = None,
        compile: bool = True,
        top_k: int | None = None,
    ):
        if sample and keep_logprobs:
            raise ValueError(
                "the ReDrafter rule (keep_logprobs) verifies beam search: use sample=False"
            )
        self.head = head
        self.keep_logprobs = keep_logprobs
        self.sample = not keep_logprobs if sample is None else sample
        self.searcher = BeamSearcher(head, embedding, compile=compile, top_k=top_k)
        self.sampler = ChainSampler(head, embedding, compile=compile)
        self.last_search: BeamSearchResult | None = None

    @classmethod
    def from_model(
        cls, model: nn.Module, head: ReDrafterHead | str | Path, **kwargs: Any
    ) -> ReDrafter:
        """A drafter for target ``model`` from a head or a drafter directory (checked).

        A head read from a directory computes in the target's dtype (a float16 file drafts
        in float32 for a float32 target: on CPUs float16 matmuls are several times slower).
        """
        if not isinstance(head, ReDrafterHead):
            head = load_drafter(head, model=model, dtype=compute_dtype(model))
        else:
            check_target(head.config, model)
        return cls(head, find_input_embedding(model), **kwargs)

    def reset(self, prompt_tokens: list[int]) -> None:
        """Nothing to reset: the head is conditioned only on ``hidden`` and ``root``."""
        self.last_search = None

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """``width`` beams ``(W, L)`` of target ids, column 0 = ``root`` (lazy): a sampled
        chain with its ``proposal`` (sampling, ``W = 1``), else beam search."""
        if self.sample and width == 1 and not context.params.greedy:
            self.last_search = None
            chain, log_q = self.sampler(context.hidden, context.root, length, context.params)
            return Draft(beams=chain, proposal=log_q)
        result = self.searcher(
            context.hidden, context.root, width, length, with_logprobs=self.keep_logprobs
        )
        self.last_search = result
        logprobs = None
        if self.keep_logprobs:
            logprobs = result.target_logprobs(self.head.config.vocab_size)
        return Draft(beams=result.beams, draft_logprobs=logprobs, valid=result.valid)

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to update: the head keeps no state across proposals."""
