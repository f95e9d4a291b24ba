"""``python -m mlx_redrafter.doctor``: device, default dtype, tuned beam shape, BLAS in use
and a measured fp32 GEMM rate."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import mlx.core as mx  # noqa: E402  (after mlx_redrafter: the BLAS must load first)

from mlx_redrafter import BLAS, MALLOC_TUNED, device
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


def tuned_line() -> str:
    """Which beam shape ``generate`` uses for the default model and drafter (greedy) on this
    device in the default dtype: the ``bench --tune`` profile's, or the built-in one."""
    from mlx_redrafter.cli import DEFAULT_LOOKUP_BEAMS, DEFAULT_SHAPE
    from mlx_redrafter.profile import profile_path, setup_key, tuned_lookup_beams, tuned_shape

    setup = setup_key(None, None, dtype=device.default_dtype())
    shape = tuned_shape(setup)
    if shape is None:
        width, length = DEFAULT_SHAPE
        return (
            f"beam shape: W{width} L{length} + {DEFAULT_LOOKUP_BEAMS} lookup beam(s), built-in "
            "(no `bench --tune` profile for this device and dtype)"
        )
    lookup = tuned_lookup_beams(setup)
    beams = "" if lookup is None else f" + {lookup} lookup beam(s)"
    return f"beam shape: W{shape[0]} L{shape[1]}{beams}, tuned ({profile_path(setup)})"


def main() -> int:
    """Print the report."""
    print(f"platform: {platform.system()} {platform.machine()}, python {platform.python_version()}")
    print(f"mlx: {mx.__version__}, default device: {mx.default_device()}")
    print(f"metal available: {mx.metal.is_available()}")
    print(f"device: {device.description()}")
    print(f"default dtype: {device.default_dtype()}")
    print(tuned_line())
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
