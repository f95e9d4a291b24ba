"""Import a llama.cpp GGUF file (llama or gemma3) as an mlx-lm model directory.

``convert_gguf(path, out_dir)`` writes ``config.json``, ``model.safetensors``,
``tokenizer.json`` and ``tokenizer_config.json``; ``mlx_lm.load(out_dir)`` opens the result.

Weights: files whose tensors are all F32/F16/Q4_0/Q4_1/Q8_0 are read by ``mx.load``, which
returns the quantized ones as MLX affine triples (``weight`` uint32 ``[rows, cols*bits/32]``,
``scales`` and ``biases`` float16 ``[rows, cols/32]``, group size 32). Other files (BF16,
Q5_x, K-quants, ...) are read with ``gguf.GGUFReader`` and dequantized by
``gguf.quants.dequantize``. Quantized tensors are dequantized in float32 and cast to the
requested dtype, unless ``keep_quantized`` keeps the MLX-native ones packed.

RoPE: llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its
interleaved ("traditional") RoPE matches the Hugging Face half-split RoPE. The importer undoes
that permutation (a pure row shuffle, exact even on packed quantized rows), so the result is
the Hugging Face layout and uses mlx-lm's default ``rope_traditional: false``.

Gemma 3 (``gemma3_text`` in mlx-lm): no row permutation; llama.cpp stores every RMSNorm
scale as ``1 + w``, so ``1`` is subtracted back.

The tokenizer: a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is rebuilt from
``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges`` with the pre-tokenizer that llama.cpp
uses for ``tokenizer.ggml.pre``; SentencePiece vocabularies (``"llama"``, e.g. Gemma) go
through transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

GROUP_SIZE = 32
DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
}
# Types ``mx.load`` returns exactly: plain floats and the three block formats it packs.
MLX_NATIVE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GGUF_MAGIC = b"GGUF"


class ConversionError(ValueError):
    """A GGUF file cannot be imported; the message names the problem in one line."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the GGUF header.

    Attributes:
        name: GGUF name, e.g. ``blk.0.attn_q.weight``.
        type_name: ggml type, e.g. ``"Q4_1"`` or ``"F32"``.
        shape: Logical shape in numpy (row-major) order, e.g. ``(out_features, in_features)``.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFContents:
    """Metadata and tensor directory of a validated GGUF file.

    Attributes:
        path: The file.
        metadata: Every key/value pair; arrays become lists, scalars Python values.
        tensors: Tensor entries in file order.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        """``general.architecture``, e.g. ``"llama"``."""
        return str(self.metadata.get("general.architecture", ""))

    def tensor_names(self) -> set[str]:
        """Names of all tensors in the file."""
        return {t.name for t in self.tensors}


# --------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------


def _reader(path: Path) -> Any:
    """Open ``path`` with ``gguf.GGUFReader``, turning any failure into ConversionError."""
    import gguf

    if not path.exists():
        raise ConversionError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ConversionError(f"not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConversionError(f"not a GGUF file (bad magic {magic!r}): {path}")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises bare ValueError/IndexError/... on bad data
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"corrupt or truncated GGUF file {path}: {detail}") from None


def _field_value(field: Any) -> Any:
    """Python value of a ``ReaderField``: str, int, float, bool or a list of them."""
    try:
        return field.contents()
    except Exception as e:
        raise ConversionError(f"corrupt GGUF metadata value {field.name!r}: {e}") from None


def read_gguf(path: str | os.PathLike[str]) -> GGUFContents:
    """Read and validate a GGUF file's header.

    Checks the magic, that every key/value parses and that every tensor's data lies inside
    the file (catches truncated downloads).

    Raises:
        ConversionError: missing, corrupt or truncated file.
    """
    path = Path(path)
    reader = _reader(path)
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    size = path.stat().st_size
    tensors = []
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise ConversionError(
                f"truncated GGUF file {path}: tensor {t.name!r} ends at byte "
                f"{t.data_offset + int(t.n_bytes)} but the file has {size} bytes"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors.append(TensorInfo(t.name, t.tensor_type.name, shape))
    return GGUFContents(path=path, metadata=metadata, tensors=tuple(tensors))


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _require(contents: GGUFContents, key: str) -> Any:
    """Metadata value for ``key`` or a ConversionError naming the missing key."""
    if key not in contents.metadata:
        raise ConversionError(f"GGUF metadata lacks {key!r}: {contents.path}")
    return contents.metadata[key]


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
            checked[t.type_name] = native or _numpy_dequantizable(
                gguf.GGMLQuantizationType[t.type_name]
            )
        if not checked[t.type_name]:
            raise ConversionError(
                f"unsupported quantization type {t.type_name} (tensor {t.name!r})"
            )


def _numpy_dequantizable(qtype: Any) -> bool:
    """True when ``gguf.quants.dequantize`` implements ``qtype`` (probed on one zero block)."""
    import gguf.quants

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True


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


# --------------------------------------------------------------------------------------
# Architectures: tensor names, q/k row permutation, norm offsets
# --------------------------------------------------------------------------------------

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


def _heads_for(gguf_name: str, config: dict[str, Any]) -> int | None:
    """Head count whose rows llama.cpp permuted in ``gguf_name``, or None."""
    if ".attn_q." in gguf_name:
        return int(config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return int(config["num_key_value_heads"])
    return None


# --------------------------------------------------------------------------------------
# Tensor loading
# --------------------------------------------------------------------------------------


def _is_native(contents: GGUFContents) -> bool:
    """True when ``mx.load`` can read every tensor of the file exactly."""
    return all(t.type_name in MLX_NATIVE_TYPES for t in contents.tensors)


def _load_native(contents: GGUFContents) -> dict[str, mx.array]:
    """All tensors through ``mx.load`` (GGUF names; quantized ones as MLX triples)."""
    try:
        return mx.load(str(contents.path))
    except Exception as e:
        raise ConversionError(f"cannot read tensors of {contents.path}: {e}") from None


def _iter_numpy(contents: GGUFContents) -> Iterator[tuple[str, mx.array]]:
    """Yield ``(gguf_name, float32 array)`` for each tensor via ``gguf.quants.dequantize``."""
    import gguf.quants

    reader = _reader(contents.path)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.asarray(t.data)
        try:
            if t.tensor_type.name in ("F32", "F16"):
                arr = data.astype(np.float32)
            else:
                arr = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise ConversionError(
                f"unsupported quantization type {t.tensor_type.name} (tensor {t.name!r})"
            ) from None
        yield t.name, mx.array(arr.reshape(shape).astype(np.float32))


def _bits_of(weight: mx.array, scales: mx.array) -> int:
    """Bits per element of a packed MLX triple: ``weight [.., cols*bits/32]``, ``scales [.., cols/32]``."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)


def _native_items(
    raw: dict[str, mx.array], contents: GGUFContents
) -> Iterator[tuple[str, dict[str, mx.array]]]:
    """Yield ``(gguf_name, parts)`` with parts ``{"weight"}`` or ``{"weight","scales","biases"}``."""
    for t in contents.tensors:
        stem = t.name.rsplit(".", 1)[0]
        parts = {"weight": raw[t.name]}
        if t.type_name in QUANT_BITS:
            parts["scales"] = raw[f"{stem}.scales"]
            parts["biases"] = raw[f"{stem}.biases"]
        yield t.name, parts


def _convert_parts(
    parts: dict[str, mx.array], dtype: mx.Dtype, keep_quantized: bool, offset: float = 0.0
) -> dict[str, mx.array]:
    """Dequantize (in float32) or keep a triple; cast everything to ``dtype``.

    Args:
        parts: ``{"weight"}`` (float) or ``{"weight", "scales", "biases"}`` (MLX packed).
        offset: Subtracted (in float32) from a float weight, for Gemma norm scales.

    Returns:
        ``{"weight": [rows, cols]}`` or, kept quantized, the packed triple with
        ``scales``/``biases`` cast to ``dtype``.
    """
    if "scales" not in parts:
        w = parts["weight"].astype(mx.float32)
        return {"weight": (w - offset if offset else w).astype(dtype)}
    scales = parts["scales"].astype(mx.float32)
    biases = parts["biases"].astype(mx.float32)
    if keep_quantized:
        return {
            "weight": parts["weight"],
            "scales": scales.astype(dtype),
            "biases": biases.astype(dtype),
        }
    bits = _bits_of(parts["weight"], scales)
    w = mx.dequantize(parts["weight"], scales, biases, group_size=GROUP_SIZE, bits=bits)
    return {"weight": w.astype(dtype)}


def _tensor_items(
    contents: GGUFContents, keep_quantized: bool
) -> Iterator[tuple[str, dict[str, mx.array]]]:
    """``(gguf_name, parts)`` for every tensor, from ``mx.load`` when it reads the file
    exactly, else dequantized to float32 by ``gguf.quants``.

    Raises:
        ConversionError: ``keep_quantized`` on a file with types MLX cannot keep packed.
    """
    if _is_native(contents):
        return _native_items(_load_native(contents), contents)
    if keep_quantized:
        odd = next(t for t in contents.tensors if t.type_name not in MLX_NATIVE_TYPES)
        raise ConversionError(
            f"--keep-quantized supports only Q4_0/Q4_1/Q8_0 tensors, but {odd.name!r} is "
            f"{odd.type_name}; drop --keep-quantized to dequantize"
        )
    return ((name, {"weight": arr}) for name, arr in _iter_numpy(contents))


def load_weights(
    contents: GGUFContents,
    config: dict[str, Any],
    dtype: mx.Dtype = mx.float32,
    keep_quantized: bool = False,
    progress: bool = True,
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """Read, convert and rename every tensor to mlx-lm parameters.

    Args:
        contents: The validated file (its architecture picks names, permutation, offsets).
        config: From the architecture's config builder (head counts for un-permuting q/k).
        dtype: Target dtype of float tensors (and of scales/biases kept quantized).
        keep_quantized: Keep Q4_0/Q4_1/Q8_0 tensors packed (only for files ``mx.load``
            reads natively).
        progress: Show a tqdm bar on stderr (on a terminal).

    Returns:
        ``(weights, bits)``: evaluated arrays keyed by mlx-lm names, and for each quantized
        module path (``model.layers.0.self_attn.q_proj``) its bit width.
    """
    arch = ARCHITECTURES[contents.architecture]
    items = _tensor_items(contents, keep_quantized)
    weights: dict[str, mx.array] = {}
    bits: dict[str, int] = {}
    bar = tqdm(
        items,
        total=len(contents.tensors),
        desc="converting",
        unit="tensor",
        disable=None if progress else True,
    )
    for gguf_name, parts in bar:
        target = mlx_name(gguf_name, arch)
        stem = target.rsplit(".", 1)[0]
        offset = arch.norm_offset if gguf_name.endswith("norm.weight") else 0.0
        converted = _convert_parts(parts, dtype, keep_quantized, offset)
        n_head = _heads_for(gguf_name, config) if arch.permute_qk else None
        if n_head is not None:
            converted = {k: unpermute_rows(v, n_head) for k, v in converted.items()}
        if "scales" in converted:
            bits[stem] = _bits_of(converted["weight"], converted["scales"])
        for suffix, arr in converted.items():
            name = target if suffix == "weight" else f"{stem}.{suffix}"
            mx.eval(arr)
            weights[name] = arr
    return weights, bits


def quantization_config(bits: dict[str, int]) -> dict[str, Any]:
    """mlx-lm ``quantization`` entry: the most common bit width, plus per-module overrides.

    Args:
        bits: Module path -> bits, e.g. ``{"model.embed_tokens": 8, "model.layers.0.mlp.up_proj": 4}``.
    """
    common = Counter(bits.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for path, b in sorted(bits.items()):
        if b != common:
            config[path] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return config


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_NAMES = ("default", "gpt2", "gpt-2", "phi-2", "olmo", "jais", "poro-chat", "viking")
_DIGIT_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def pre_tokenizer_for(pre: str) -> Any:
    """``tokenizers`` pre-tokenizer matching llama.cpp's regexes for ``tokenizer.ggml.pre``.

    Raises:
        ConversionError: a pre-tokenizer name without a known equivalent.
    """
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_NAMES:  # llama.cpp: "\p{N}" first, then the GPT-2 regex
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_NAMES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_NAMES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ConversionError(f"unsupported tokenizer pre-tokenizer {pre!r} (tokenizer.ggml.pre)")


def _token(tokens: list[str], metadata: dict[str, Any], key: str) -> str | None:
    """Token text for ``tokenizer.ggml.<key>`` (an id), or None when absent."""
    idx = metadata.get(f"tokenizer.ggml.{key}")
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def byte_level_bpe(metadata: dict[str, Any]) -> Any:
    """Byte-level BPE ``tokenizers.Tokenizer`` (``tokenizer.ggml.model == "gpt2"``).

    Control tokens (``token_type == 3``) become special added tokens, user-defined ones
    (``4``) plain added tokens.

    Raises:
        ConversionError: no tokens, malformed merges or an unknown pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConversionError("GGUF metadata has no tokenizer.ggml.tokens")
    merges = []
    for m in metadata.get("tokenizer.ggml.merges") or []:
        pair = m.split(" ")
        if len(pair) != 2:
            raise ConversionError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((pair[0], pair[1]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer_for(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    special = [t for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer


def _transformers_gguf_tokenizer() -> Callable[[str, dict[str, Any]], tuple[Any, dict]]:
    """transformers' ``convert_gguf_tokenizer`` (module moved between 4.x and 5.x)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        try:
            from transformers.integrations.ggml import convert_gguf_tokenizer
        except ImportError:
            raise ConversionError(
                "SentencePiece GGUF vocabularies need transformers>=4.45 (GGUF tokenizer support)"
            ) from None
    return convert_gguf_tokenizer


def sentencepiece(metadata: dict[str, Any]) -> Any:
    """SentencePiece-style ``tokenizers.Tokenizer`` (``tokenizer.ggml.model == "llama"``).

    Built by transformers' GGUF tokenizer converter, which knows the per-architecture
    details (Gemma's merge order and space tokens, Llama's prefix space).
    """
    convert = _transformers_gguf_tokenizer()
    keys = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "merges": "merges",
        "add_space_prefix": "add_prefix_space",
    }
    tokenizer_dict = {
        name: metadata[f"tokenizer.ggml.{key}"]
        for key, name in keys.items()
        if f"tokenizer.ggml.{key}" in metadata
    }
    arch = str(metadata.get("general.architecture", ""))
    try:
        tokenizer, _ = convert(arch, tokenizer_dict)
    except Exception as e:
        raise ConversionError(f"cannot build the SentencePiece tokenizer: {e}") from None
    return tokenizer


TOKENIZER_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "gpt2": byte_level_bpe,
    "llama": sentencepiece,
}


def build_tokenizer(metadata: dict[str, Any]) -> Any:
    """``tokenizers.Tokenizer`` for the vocabulary in GGUF metadata.

    A BOS is prepended to every encoding when ``tokenizer.ggml.add_bos_token`` is true.

    Raises:
        ConversionError: an unsupported ``tokenizer.ggml.model`` or malformed vocabulary.
    """
    from tokenizers import processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_BUILDERS:
        raise ConversionError(
            f"unsupported tokenizer model {kind!r} (tokenizer.ggml.model); "
            f"supported: {', '.join(TOKENIZER_BUILDERS)}"
        )
    tokenizer = TOKENIZER_BUILDERS[kind](metadata)
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    bos = _token(tokens, metadata, "bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def tokenizer_config(metadata: dict[str, Any], max_length: int | None = None) -> dict[str, Any]:
    """``tokenizer_config.json`` dict: special tokens, BOS/EOS flags and chat template."""
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        if (tok := _token(tokens, metadata, key)) is not None:
            config[name] = tok
    if max_length:
        config["model_max_length"] = int(max_length)
    if template := metadata.get("tokenizer.chat_template"):
        config["chat_template"] = str(template)
    return config


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    keep_quantized: bool = False,
    progress: bool = True,
) -> Path:
    """Import a llama GGUF as an mlx-lm model directory.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: Directory to write (created; existing files of the same names replaced).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: dtype of dequantized weights.
        keep_quantized: Keep Q4_0/Q4_1/Q8_0 tensors packed (group 32) and write mlx-lm's
            ``quantization`` config.
        progress: tqdm progress bar on stderr.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConversionError: missing/corrupt/truncated file, unsupported architecture,
            quantization type, tokenizer or dtype.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    contents = read_gguf(gguf_path)
    check_supported(contents)
    config = ARCHITECTURES[contents.architecture].config(contents)
    tokenizer = build_tokenizer(contents.metadata)
    tok_config = tokenizer_config(contents.metadata, config["max_position_embeddings"])
    weights, bits = load_weights(contents, config, DTYPES[dtype], keep_quantized, progress)
    if bits:
        config["quantization"] = quantization_config(bits)
    config["torch_dtype"] = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------
# Subcommand: python -m convert gguf FILE.gguf OUT_DIR
# --------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register the ``gguf`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "gguf",
        help="import a llama.cpp GGUF file as an mlx-lm model directory",
        description="Import a llama-family GGUF file as an mlx-lm model directory.",
    )
    p.add_argument("gguf_file", metavar="FILE.gguf", help="GGUF file to import")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype")
    p.add_argument(
        "--keep-quantized",
        action="store_true",
        help="keep Q4_0/Q4_1/Q8_0 tensors packed (mlx-lm quantized model, group size 32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: Any) -> int:
    """Run the ``gguf`` subcommand; returns 0 (errors raise ConversionError)."""
    import sys

    out = convert_gguf(
        args.gguf_file,
        args.out_dir,
        dtype=args.dtype,
        keep_quantized=args.keep_quantized,
        progress=not args.no_progress,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
