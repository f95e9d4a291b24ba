"""What each supported GGUF architecture (llama, gemma3) means for mlx-lm: its
``config.json`` (:func:`llama_config`, :func:`gemma3_config`), its tensor names
(:func:`mlx_name`), llama.cpp's q/k row permutation (:func:`unpermute_rows`) and Gemma's
``1 + w`` norm scales (:attr:`Architecture.norm_offset`), all in :data:`ARCHITECTURES`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from convert.gguf_reader import (
    MLX_NATIVE_TYPES,
    ConversionError,
    GGUFContents,
    numpy_dequantizable,
)


def _require(contents: GGUFContents, key: str) -> Any:
    """Metadata value for ``key`` or a ConversionError naming the missing key."""
    if key not in contents.metadata:
        raise ConversionError(f"GGUF metadata lacks {key!r}: {contents.path}")
    return contents.metadata[key]


def _common_config(contents: GGUFContents) -> dict[str, Any]:
    """Config keys shared by every supported architecture (``<arch>.*`` metadata)."""
    p = contents.architecture
    hidden = int(_require(contents, f"{p}.embedding_length"))
    n_heads = int(_require(contents, f"{p}.attention.head_count"))
    shapes = {t.name: t.shape for t in contents.tensors}
    if "token_embd.weight" not in shapes:
        raise ConversionError(f"GGUF file has no token_embd.weight tensor: {contents.path}")
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(_require(contents, f"{p}.block_count")),
        "intermediate_size": int(_require(contents, f"{p}.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(contents.metadata.get(f"{p}.attention.head_count_kv", n_heads)),
        "head_dim": int(contents.metadata.get(f"{p}.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(_require(contents, f"{p}.attention.layer_norm_rms_epsilon")),
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "rope_theta": float(contents.metadata.get(f"{p}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(contents.metadata.get(f"{p}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    scaling = contents.metadata.get(f"{p}.rope.scaling.type")
    if scaling == "linear":
        factor = float(_require(contents, f"{p}.rope.scaling.factor"))
        config["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": factor}
    elif scaling not in (None, "none"):
        raise ConversionError(f"unsupported RoPE scaling {scaling!r}")
    for key in ("bos_token_id", "eos_token_id"):
        value = contents.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return config


def llama_config(contents: GGUFContents) -> dict[str, Any]:
    """mlx-lm ``config.json`` dict for a ``general.architecture == "llama"`` file.

    Raises:
        ConversionError: missing keys or features mlx-lm's llama cannot express.
    """
    config = _common_config(contents)
    head_dim = config["head_dim"]
    rope_dims = int(contents.metadata.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(
            f"partial RoPE ({rope_dims} of {head_dim} head dims) is not supported by mlx-lm llama"
        )
    if "rope_freqs.weight" in contents.tensor_names():
        raise ConversionError("llama3-style rope_freqs tensors are not supported")
    names = contents.tensor_names()
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **config,
        "rope_traditional": False,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
    }


# llama.cpp fixes these for Gemma 3 in code rather than in the file (llama-model.cpp).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_27B_BLOCKS = 62


def gemma3_config(contents: GGUFContents) -> dict[str, Any]:
    """mlx-lm ``gemma3_text`` config for a ``general.architecture == "gemma3"`` file.

    The query scale follows llama.cpp: ``1/sqrt(head_dim)``, except the 27B model
    (62 blocks), which uses ``1/sqrt(hidden/heads)``.
    """
    config = _common_config(contents)
    scalar = config["head_dim"]
    if config["num_hidden_layers"] == GEMMA3_27B_BLOCKS:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        **config,
        "query_pre_attn_scalar": int(scalar),
        "rope_local_base_freq": float(
            contents.metadata.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)
        ),
        "sliding_window": int(contents.metadata.get("gemma3.attention.sliding_window", 512)),
        "sliding_window_pattern": GEMMA3_SLIDING_WINDOW_PATTERN,
    }


_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_ATTENTION_AND_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **_ATTENTION_AND_MLP,
}
_GEMMA3_BLOCK = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    **_ATTENTION_AND_MLP,
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias|scales|biases)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias|scales|biases)$")


@dataclass(frozen=True)
class Architecture:
    """How one ``general.architecture`` maps onto an mlx-lm model.

    Attributes:
        name: GGUF architecture name.
        config: Builds the mlx-lm ``config.json`` dict from the file.
        block_names: GGUF per-block tensor stem -> mlx-lm module path inside a layer.
        permute_qk: llama.cpp permuted the q/k rows (llama family) and they need undoing.
        norm_offset: Subtracted from every ``*norm.weight``: llama.cpp stores Gemma's
            ``(1 + w)`` RMSNorm scale, mlx-lm stores ``w``.
    """

    name: str
    config: Callable[[GGUFContents], dict[str, Any]]
    block_names: dict[str, str]
    permute_qk: bool
    norm_offset: float


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", llama_config, _LLAMA_BLOCK, True, 0.0),
    "gemma3": Architecture("gemma3", gemma3_config, _GEMMA3_BLOCK, False, 1.0),
}


def mlx_name(gguf_name: str, arch: Architecture = ARCHITECTURES["llama"]) -> str:
    """mlx-lm parameter name for a GGUF tensor name.

    ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; the MLX ``scales``
    and ``biases`` companions keep their suffix.

    Raises:
        ConversionError: a tensor name the importer does not know for ``arch``.
    """
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, suffix = m.groups()
        if part in arch.block_names:
            return f"model.layers.{layer}.{arch.block_names[part]}.{suffix}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ConversionError(f"unexpected tensor {gguf_name!r} for a {arch.name} GGUF")


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp writes ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(w.shape)`` with
    ``d`` the head dim, interleaving the two rotary halves of each head. This inverts it.

    Args:
        w: ``[n_head * d, ...]`` rows (a weight ``[out, in]``, packed weight, scales, biases
            ``[out, groups]`` or a bias ``[out]``).
        n_head: heads the rows belong to (query heads for q, KV heads for k).

    Returns:
        ``[n_head * d, ...]`` in the Hugging Face half-split order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConversionError(f"cannot un-permute {rows} rows over {n_head} heads")
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def heads_for(gguf_name: str, config: dict[str, Any]) -> int | None:
    """Head count whose rows llama.cpp permuted in ``gguf_name``, or None."""
    if ".attn_q." in gguf_name:
        return int(config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return int(config["num_key_value_heads"])
    return None


def check_supported(contents: GGUFContents) -> None:
    """Raise ConversionError unless the architecture and every tensor type can be imported."""
    import gguf

    arch = contents.architecture
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    checked: dict[str, bool] = {}
    for t in contents.tensors:
        if t.type_name not in checked:
            native = t.type_name in MLX_NATIVE_TYPES
            checked[t.type_name] = native or numpy_dequantizable(
                gguf.GGMLQuantizationType[t.type_name]
            )
        if not checked[t.type_name]:
            raise ConversionError(
                f"unsupported quantization type {t.type_name} (tensor {t.name!r})"
            )
