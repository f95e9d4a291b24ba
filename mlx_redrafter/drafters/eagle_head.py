"""The feature-level draft head (EAGLE, Li et al. 2024): config, module, checkpoint I/O.

The head drafts at the level of the target's features. Entry ``j`` of its sequence pairs
the target's final-norm hidden state ``f_j`` ``(d,)`` with the embedding of the token that
followed it, ``e(x_{j+1})``; one Llama decoder layer (its own KV cache over the entries,
RoPE position ``j``) turns the entries into predicted next features::

    x_j   = fc([e(x_{j+1}); f_j])                      (2d -> d, bias optional)
    h_j   = x_j + attn(x_j)                            (no input norm, as EAGLE-1)
    o_j   = h_j + mlp(post_attention_layernorm(h_j))   (o_j ~ f_{j+1})
    logits_j = o_j @ W[vocab].T                        (the target's frozen LM head rows)

Drafting feeds ``o_j`` back as the feature of the next entry. The logits come from the
target's own LM head restricted to a draft vocabulary of ``K`` target ids (all ``V`` when
none is configured), so the head learns features, not an output distribution; a head may
instead carry its own output layer ``lm_head`` ``(K, d)`` (trained, not the target's).

A checkpoint directory holds ``config.json`` (Llama fields, ``num_hidden_layers: 1``,
``"bias"`` for the fc bias, plus ``"draft_kind": "eagle"``, ``vocab_size``, optional
``draft_vocab_size``) and ``model.safetensors`` with EAGLE-1's weight names: ``fc.weight``
``(d, 2d)`` [+ ``fc.bias``], ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.mlp.{gate,up,down}_proj.weight``, ``layers.0.post_attention_layernorm.weight``,
and when present ``draft_vocab`` ``(K,)`` int32 target ids and ``lm_head.weight``
``(K, d)``. The embedding table is the target's (EAGLE-1 files store a copy as
``embed_tokens.weight``; it is read and ignored).

Shapes: ``d`` hidden size, ``H`` / ``Hkv`` query / key-value heads, ``hd`` head size,
``K`` draft vocabulary, ``n`` entries, ``S`` keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_redrafter.checkpoint_files import load_exact_weights, load_safetensors

DRAFT_KIND = "eagle"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DRAFT_VOCAB_KEY = "draft_vocab"
IGNORED_KEYS = ("embed_tokens.weight",)


@dataclass
class EagleConfig:
    """Shape of a feature-level head (Llama field names).

    Attributes:
        hidden_size: ``d``, the target's hidden size.
        vocab_size: ``V``, the target's vocabulary size.
        num_attention_heads: ``H``.
        num_key_value_heads: ``Hkv``.
        head_dim: ``hd``.
        intermediate_size: Width of the SwiGLU MLP.
        rope_theta: RoPE base.
        rms_norm_eps: Epsilon of the post-attention RMSNorm.
        bias: Whether ``fc`` has a bias.
        draft_vocab_size: ``K`` for a reduced draft vocabulary, ``None`` for ``K = V``.
        own_head: The head has its own output layer ``lm_head`` instead of the target's.
    """

    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    bias: bool = True
    draft_vocab_size: int | None = None
    own_head: bool = False

    @property
    def draft_size(self) -> int:
        """``K``."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @classmethod
    def for_target(cls, model: nn.Module, **overrides: Any) -> EagleConfig:
        """A head shaped like one decoder layer of the mlx-lm ``model``."""
        args = model.args
        d = int(args.hidden_size)
        heads = int(args.num_attention_heads)
        fields = {
            "hidden_size": d,
            "vocab_size": int(args.vocab_size),
            "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(args, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(args, "head_dim", None) or d // heads),
            "intermediate_size": int(args.intermediate_size),
            "rope_theta": float(getattr(args, "rope_theta", 10000.0)),
            "rms_norm_eps": float(getattr(args, "rms_norm_eps", 1e-5)),
        }
        fields.update(overrides)
        return cls(**fields)

    def to_json(self) -> dict:
        """The ``config.json`` dict."""
        out = {
            "draft_kind": DRAFT_KIND,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": 1,
            **asdict(self),
        }
        if self.draft_vocab_size is None:
            del out["draft_vocab_size"]
        return out

    @classmethod
    def from_json(cls, raw: dict) -> EagleConfig:
        """Read a ``config.json`` dict (unknown Llama fields are ignored)."""
        missing = [
            k
            for k in ("hidden_size", "vocab_size", "num_attention_heads", "intermediate_size")
            if k not in raw
        ]
        if missing:
            raise ValueError(f"eagle head config: missing {', '.join(missing)}")
        heads = int(raw["num_attention_heads"])
        d = int(raw["hidden_size"])
        return cls(
            hidden_size=d,
            vocab_size=int(raw["vocab_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or d // heads),
            intermediate_size=int(raw["intermediate_size"]),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            bias=bool(raw.get("bias", True)),
            draft_vocab_size=(
                None if raw.get("draft_vocab_size") is None else int(raw["draft_vocab_size"])
            ),
            own_head=bool(raw.get("own_head", False)),
        )


def rope(x: mx.array, positions: mx.array, theta: float) -> mx.array:
    """Rotary embedding (Llama's half-split layout) of ``x`` ``(..., n, hd)`` at
    ``positions`` ``(n,)`` (any integers, e.g. tree depths)."""
    half = x.shape[-1] // 2
    inv = mx.exp(-math.log(theta) * mx.arange(0, half, dtype=mx.float32) / half)
    angles = positions.astype(mx.float32)[:, None] * inv[None, :]
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    def __init__(self, cfg: EagleConfig):
        super().__init__()
        d, h, hkv, hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, hkv * hd, bias=False)
        self.v_proj = nn.Linear(d, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def qkv(self, x: mx.array, positions: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """``x`` ``(..., n, d)`` -> ``q (..., H, n, hd)``, ``k, v (..., Hkv, n, hd)`` (roped)."""
        *lead, n, _ = x.shape

        def heads(y: mx.array, count: int) -> mx.array:
            return y.reshape(*lead, n, count, self.head_dim).swapaxes(-2, -3)

        q = rope(heads(self.q_proj(x), self.num_heads), positions, self.theta)
        k = rope(heads(self.k_proj(x), self.num_kv_heads), positions, self.theta)
        return q, k, heads(self.v_proj(x), self.num_kv_heads)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
        """``q (B, H, n, hd)`` over ``k, v (B, Hkv, S, hd)`` with bool ``mask`` (n, S) or
        (B, 1, n, S) -> ``(B, n, d)`` after ``o_proj``."""
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        b, _, n, _ = out.shape
        return self.o_proj(out.swapaxes(1, 2).reshape(b, n, -1))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU MLP; ``act`` (``silu(gate) * up``) may be swapped for a faster equal one."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act = swiglu

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Layer(nn.Module):
    """A Llama decoder layer without input norm (EAGLE-1's layer 0)."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def finish(self, x: mx.array, attended: mx.array) -> mx.array:
        """The layer's output from its input ``x`` and attention output (both ``(..., d)``)."""
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleHead(nn.Module):
    """The feature-level head; parameter names are EAGLE-1's checkpoint names."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=cfg.bias)
        self.layers = [Layer(cfg)]
        if cfg.own_head:
            self.lm_head = nn.Linear(d, cfg.draft_size, bias=False)

    @property
    def layer(self) -> Layer:
        return self.layers[0]

    def entries(self, embeds: mx.array, features: mx.array) -> mx.array:
        """Layer inputs ``(..., d)`` of (next-token embedding, feature) pairs ``(..., d)``."""
        return self.fc(mx.concatenate([embeds, features.astype(embeds.dtype)], axis=-1))

    def inputs(
        self, embeds: mx.array, features: mx.array, from_target: bool = True
    ) -> tuple[mx.array, mx.array]:
        """``(x, x)``: the layer input ``(..., d)`` is both the residual and the attention
        input (no input norm); target and fed-back features are read alike."""
        x = self.entries(embeds, features)
        return x, x

    def logits(self, out: mx.array, rows: mx.array | None) -> mx.array:
        """``(..., K)`` draft logits of predicted features ``out`` ``(..., d)``; ``rows``
        ``(K, d)`` are the target's LM-head rows of the draft vocabulary (unused with an
        own head)."""
        if self.config.own_head:
            return self.lm_head(out)
        return out @ rows.T

    def __call__(
        self, embeds: mx.array, features: mx.array, positions: mx.array, mask: mx.array | str
    ) -> mx.array:
        """Teacher-forced pass over whole sequences (training, prompt priming).

        Args:
            embeds: ``(B, n, d)`` embeddings of the next tokens ``x_{j+1}``.
            features: ``(B, n, d)`` target features ``f_j``.
            positions: ``(n,)`` RoPE positions.
            mask: ``"causal"`` or a bool mask ``(n, n)`` / ``(B, 1, n, n)``.

        Returns:
            ``(B, n, d)`` predicted next features.
        """
        x = self.entries(embeds, features)
        attn = self.layer.self_attn
        q, k, v = attn.qkv(x, positions)
        return self.layer.finish(x, attn.attend(q, k, v, mask))


# --------------------------------------------------------------------------- checkpoints


def save_head(
    path: str | Path,
    head: EagleHead,
    draft_vocab: np.ndarray | None = None,
    dtype: mx.Dtype | None = None,
    extra: dict | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (``draft_vocab`` when reduced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(head.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    if draft_vocab is not None:
        weights[DRAFT_VOCAB_KEY] = mx.array(np.asarray(draft_vocab, dtype=np.int32))
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights)
    config = head.config.to_json() | (extra or {})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def is_eagle_dir(path: str | Path) -> bool:
    """True when ``path/config.json`` declares a feature-level head."""
    file = Path(path) / CONFIG_FILE
    try:
        return json.loads(file.read_text()).get("draft_kind") == DRAFT_KIND
    except (OSError, ValueError, AttributeError):
        return False


def head_from_weights(
    config: EagleConfig, weights: dict[str, mx.array], source: str = "eagle head"
) -> tuple[EagleHead, np.ndarray | None]:
    """A head from its config and checkpoint tensors (EAGLE-1 names; ``embed_tokens.weight``
    dropped); returns ``(head, draft vocabulary (K,) or None)``.

    Raises:
        ValueError: The tensors do not describe a well-formed head (names ``source`` and
            the key).
    """
    weights = dict(weights)
    for key in IGNORED_KEYS:
        weights.pop(key, None)
    vocab = weights.pop(DRAFT_VOCAB_KEY, None)
    if (vocab is None) != (config.draft_vocab_size is None):
        raise ValueError(f"{source}: draft_vocab and draft_vocab_size must come together")
    if vocab is not None and vocab.shape != (config.draft_vocab_size,):
        raise ValueError(
            f"{source}: draft_vocab has shape {vocab.shape}, expected ({config.draft_vocab_size},)"
        )
    head = EagleHead(config)
    load_exact_weights(head, weights, source)
    return head, None if vocab is None else np.array(vocab, dtype=np.int32)


def load_head(path: str | Path) -> tuple[EagleHead, np.ndarray | None]:
    """Read a head directory; returns ``(head, draft vocabulary (K,) or None)``.

    Raises:
        ValueError: The files do not describe a well-formed head (message names the key),
            or the weights file is unreadable (names the file).
    """
    path = Path(path)
    config = EagleConfig.from_json(json.loads((path / CONFIG_FILE).read_text()))
    return head_from_weights(config, load_safetensors(path / WEIGHTS_FILE))
