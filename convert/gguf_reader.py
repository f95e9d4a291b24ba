"""Read and validate a llama.cpp GGUF file's header (:func:`read_gguf`): metadata, tensor
directory, and the checks that catch missing, corrupt and truncated files. Every failure is
a :class:`ConversionError` with a one-line message."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def open_reader(path: Path) -> Any:
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
    reader = open_reader(path)
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


def numpy_dequantizable(qtype: Any) -> bool:
    """True when ``gguf.quants.dequantize`` implements ``qtype`` (probed on one zero block)."""
    import gguf.quants

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True
