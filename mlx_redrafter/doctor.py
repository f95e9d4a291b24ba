"""``python -m mlx_redrafter.doctor``: backend, BLAS in use and a measured fp32 GEMM rate."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import mlx.core as mx  # noqa: E402  (after mlx_redrafter: the BLAS must load first)

from mlx_redrafter import BLAS, MALLOC_TUNED
from mlx_redrafter._blas import ENV_THREAD_TIMEOUT, blas_symbol_owner


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Median fp32 GEMM rate of ``(size, size) @ (size, size)`` in GFLOP/s."""
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return 2 * size**3 / statistics.median(times) / 1e9


def main() -> int:
    """Print the report."""
    print(f"platform: {platform.system()} {platform.machine()}, python {platform.python_version()}")
    print(f"mlx: {mx.__version__}, default device: {mx.default_device()}")
    print(f"metal available: {mx.metal.is_available()}")
    if BLAS.provider:
        print(f"BLAS: OpenBLAS via {BLAS.provider} ({BLAS.path})")
        print(f"OpenBLAS config: {BLAS.config}")
    else:
        print(f"BLAS: MLX built-in ({BLAS.reason})")
    owner = blas_symbol_owner()
    if owner:
        print(f"cblas_sgemm resolves to: {owner}")
    timeout = os.environ.get(ENV_THREAD_TIMEOUT, "")
    print(f"OpenBLAS thread timeout: {timeout or 'library default'}")
    tuned = "large buffers kept in the heap" if MALLOC_TUNED else "not tuned"
    print(f"malloc: {tuned}")
    print(f"fp32 GEMM 2048^3: {gemm_gflops():.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
