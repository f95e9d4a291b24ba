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

Modules: :mod:`convert.gguf_reader` (header and validation), :mod:`convert.gguf_arch`
(config, tensor names, row permutation and norm offsets per architecture),
:mod:`convert.gguf_tokenizer` (tokenizer rebuild); this module loads and converts the
tensors and writes the directory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from convert.gguf_arch import ARCHITECTURES, check_supported, heads_for, mlx_name, unpermute_rows
from convert.gguf_reader import (
    MLX_NATIVE_TYPES,
    QUANT_BITS,
    ConversionError,
    GGUFContents,
    open_reader,
    read_gguf,
)
from convert.gguf_tokenizer import build_tokenizer, tokenizer_config

GROUP_SIZE = 32
DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
}


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

    reader = open_reader(contents.path)
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
        n_head = heads_for(gguf_name, config) if arch.permute_qk else None
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
