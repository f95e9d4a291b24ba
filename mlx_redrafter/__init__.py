"""mlx-redrafter: lossless speculative decoding for mlx-lm models.

Importing this package first routes MLX's CPU BLAS to OpenBLAS on Linux (see
:mod:`mlx_redrafter._blas`); import it before ``mlx.core`` for fast CPU matmuls.

Public API (imported lazily, so ``import mlx_redrafter`` stays cheap)::

    load, generate, stream_generate, GenerationResponse, StepStats, SamplingParams,
    load_drafter, ReDrafter, DEFAULT_HEAD
"""

from __future__ import annotations

import importlib
from typing import Any

from mlx_redrafter._blas import ensure_openblas

BLAS = ensure_openblas()

__version__ = "0.1.0"

_LAZY = {
    "load": "mlx_redrafter.models",
    "ModelLoadError": "mlx_redrafter.models",
    "generate": "mlx_redrafter.generate",
    "stream_generate": "mlx_redrafter.generate",
    "GenerationResponse": "mlx_redrafter.generate",
    "StepStats": "mlx_redrafter.generate",
    "SamplingParams": "mlx_redrafter.sampling",
    "load_drafter": "mlx_redrafter.drafters",
    "ReDrafter": "mlx_redrafter.drafters.redrafter",
    "DEFAULT_HEAD": "mlx_redrafter.cli",
}

__all__ = ["BLAS", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlx_redrafter' has no attribute {name!r}")
