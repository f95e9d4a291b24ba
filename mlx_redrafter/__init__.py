"""mlx-redrafter: lossless speculative decoding for mlx-lm models.

Importing this package first routes MLX's CPU BLAS to OpenBLAS on Linux (see
:mod:`mlx_redrafter._blas`); import it before ``mlx.core`` for fast CPU matmuls.
"""

from mlx_redrafter._blas import ensure_openblas

BLAS = ensure_openblas()

__version__ = "0.1.0"
__all__ = ["BLAS", "__version__"]
