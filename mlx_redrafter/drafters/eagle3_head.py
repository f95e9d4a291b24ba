"""The EAGLE-3 draft head (Li et al. 2025): config and module, with the published names.

The head reads three of the target's pre-norm residual streams, the inputs of layers
``2``, ``L // 2`` and ``L - 3`` (:func:`tap_layers`), concatenated in that order
``a (3 d_t,)``. Entry ``j`` pairs them (or, while drafting, the head's own output at the
previous depth) with the embedding of the token that followed, ``e(x_{j+1})``::

    g_j = fc(a_j)                    (3 d_t -> d, no bias; skipped for a fed-back y (d,))
    z_j = [input_layernorm(e(x_{j+1})); hidden_norm(g_j)]          (2d)
    h_j = g_j + attn(z_j)            (q / k / v read 2d; RoPE at sequence positions)
    y_j = h_j + mlp(post_attention_layernorm(h_j))                 (fed back at depth + 1)
    logits_j = lm_head(norm(y_j))    (K draft ids; target id = draft id + d2t[draft id])

Parameter names are the published ones (``fc``, ``midlayer.*``, ``norm``, ``lm_head``,
optional ``embed_tokens``); the checkpoint reader is
:func:`mlx_redrafter.drafters.published.load_published_eagle3`.

Shapes: ``d`` head width, ``d_t`` target hidden size, ``K`` draft vocabulary, ``n`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_redrafter.drafters.eagle_head import MLP, Attention, EagleConfig

DRAFT_KIND = "eagle3"
#: The fewest target layers whose taps ``2 < L // 2 < L - 3`` are three distinct layers.
MIN_TARGET_LAYERS = 7


def tap_layers(num_layers: int) -> tuple[int, int, int]:
    """Indices of the target layers whose inputs EAGLE-3 reads: ``(2, L // 2, L - 3)``.

    Raises:
        ValueError: fewer than :data:`MIN_TARGET_LAYERS` layers (the taps would coincide).
    """
    if num_layers < MIN_TARGET_LAYERS:
        raise ValueError(
            f"the target has {num_layers} layers; an EAGLE-3 head reads the inputs of layers "
            f"2, L//2 and L-3, which needs at least {MIN_TARGET_LAYERS}"
        )
    return 2, num_layers // 2, num_layers - 3


@dataclass
class Eagle3Config(EagleConfig):
    """:class:`EagleConfig` plus the target's hidden size ``d_t`` (``hidden_size`` is the
    head's ``d``); ``draft_vocab_size`` is ``K`` and the head always has its own output."""

    target_hidden_size: int = 0
    has_embedding: bool = False

    def __post_init__(self) -> None:
        if not self.target_hidden_size:
            self.target_hidden_size = self.hidden_size
        self.own_head = True
        self.bias = False


class _Attention(Attention):
    """Llama attention whose q / k / v read the ``2d`` pair ``z``."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__(cfg)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, cfg.num_key_value_heads * hd, bias=False)


class MidLayer(nn.Module):
    """EAGLE-3's decoder layer (``midlayer``): two input norms, attention over ``z``."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.hidden_norm = nn.RMSNorm(d, eps=eps)
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.self_attn = _Attention(cfg)
        self.mlp = MLP(cfg)

    def finish(self, g: mx.array, attended: mx.array) -> mx.array:
        """``y (..., d)`` from the residual ``g`` and the attention output (both ``(..., d)``)."""
        h = g + attended
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """The EAGLE-3 head, with the interface :class:`~.eagle.EagleDrafter` drafts through
    (:meth:`inputs`, ``layer.self_attn``, ``layer.finish``, :meth:`logits`)."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(3 * cfg.target_hidden_size, d, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(d, cfg.draft_size, bias=False)
        if cfg.has_embedding:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, d)

    @property
    def layer(self) -> MidLayer:
        return self.midlayer

    def inputs(
        self, embeds: mx.array, features: mx.array, from_target: bool = True
    ) -> tuple[mx.array, mx.array]:
        """``(g, z)``: the residual ``(..., d)`` and the attention input ``(..., 2d)`` of
        entries pairing ``embeds`` ``(..., d)`` with target taps ``(..., 3 d_t)``
        (``from_target``) or fed-back outputs ``(..., d)``."""
        features = features.astype(embeds.dtype)
        g = self.fc(features) if from_target else features
        layer = self.midlayer
        z = mx.concatenate([layer.input_layernorm(embeds), layer.hidden_norm(g)], axis=-1)
        return g, z

    def logits(self, out: mx.array, rows: mx.array | None = None) -> mx.array:
        """``(..., K)`` draft-vocabulary logits of outputs ``out`` ``(..., d)``."""
        return self.lm_head(self.norm(out))

    def __call__(
        self, embeds: mx.array, features: mx.array, positions: mx.array, mask: mx.array | str
    ) -> mx.array:
        """Teacher-forced pass: ``embeds (B, n, d)``, target taps ``features (B, n, 3 d_t)``,
        RoPE ``positions (n,)``, ``mask`` ``"causal"`` or bool -> ``y (B, n, d)``."""
        g, z = self.inputs(embeds, features)
        attn = self.midlayer.self_attn
        q, k, v = attn.qkv(z, positions)
        return self.midlayer.finish(g, attn.attend(q, k, v, mask))
