"""CI's second pass: the suite as a Mac sees it.

Every Python process started with this directory on ``PYTHONPATH`` sees the platform as
macOS (``platform.system() == "Darwin"``), so the library's Linux-only pieces stay off, as
on a Mac: its OpenBLAS loader, the glibc heap tuning and the native attention kernel. MLX
itself still runs on its CPU backend here.

On a Mac, MLX's CPU matrix products go to Accelerate. The stand-in here is the OpenBLAS the
Linux pass uses, loaded by this file (not by the library) before MLX: without it the
pass would run on MLX's reference BLAS, 30-60x slower, and take hours.
"""

import contextlib
import importlib.util
import os
import platform
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "_ci_blas", os.path.join(_ROOT, "mlx_redrafter", "_blas.py")
)
_blas = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _blas  # dataclasses look their module up there
_spec.loader.exec_module(_blas)
os.environ.setdefault(_blas.ENV_THREAD_TIMEOUT, _blas.THREAD_TIMEOUT)
_blas._try_providers()

# imported with the real answer: on "Darwin" it would load macOS's Security framework
with contextlib.suppress(ImportError):
    import truststore  # noqa: F401

platform.system = lambda: "Darwin"
