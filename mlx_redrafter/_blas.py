"""Route MLX's CPU matrix multiplies to OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (fp32 GEMM at a few GFLOP/s). Loading
an OpenBLAS with global symbols *before* ``mlx.core`` is imported makes the dynamic loader
resolve MLX's ``cblas_*`` calls to it (30-60x faster). ``import mlx_redrafter`` calls
:func:`ensure_openblas` first thing; nothing happens on macOS (MLX uses Accelerate/Metal).

Providers, in order of preference:

1. ``$MLX_REDRAFTER_OPENBLAS``: an explicit path to a ``libopenblas.so``.
2. ``cmeel-openblas`` (a PyPI dependency on Linux x86_64): the fastest build here, but
   compiled for AVX-512 only, so it is used only when the CPU has it. It needs a
   ``libgfortran.so.5`` it does not ship; the system one is used when present, otherwise
   the copy bundled in numpy's wheel, whose SONAME is rewritten in memory (``memfd``) so
   the loader accepts it as ``libgfortran.so.5``.
3. A system OpenBLAS (Debian: ``apt-get install libopenblas0-pthread``), which picks its
   kernels at run time and so works on every x86_64 CPU.

Idle OpenBLAS threads sleep at once (``OPENBLAS_THREAD_TIMEOUT=4`` unless set): MLX runs
its element-wise ops and the native decode-attention kernel between matrix products, and
a BLAS thread spinning for its next GEMM takes the core they need (one batched decode
step of SmolLM2 at batch 128: ~510 ms with the library's default spin, ~390 ms without;
single-stream decoding unchanged).

``MLX_REDRAFTER_NO_OPENBLAS=1`` turns all of this off. Failures never raise: they warn once
with the fix and MLX keeps its built-in BLAS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
import warnings
from dataclasses import dataclass

ENV_DISABLE = "MLX_REDRAFTER_NO_OPENBLAS"
ENV_PATH = "MLX_REDRAFTER_OPENBLAS"
FIX_HINT = (
    "install an OpenBLAS (`pip install cmeel-openblas` on AVX-512 CPUs, or "
    "`apt-get install libopenblas0-pthread`), or set MLX_REDRAFTER_OPENBLAS=/path/libopenblas.so"
)
ENV_THREAD_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT"
#: log2 of the cycles an idle OpenBLAS thread spins before it sleeps (4 is OpenBLAS's minimum).
THREAD_TIMEOUT = "4"
_SKYLAKEX_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


@dataclass(frozen=True)
class BlasInfo:
    """What :func:`ensure_openblas` did.

    Attributes:
        provider: ``"cmeel-openblas"``, ``"system"``, ``"env"``, or ``None`` when no
            OpenBLAS was loaded.
        path: Path of the loaded library (``None`` if none).
        config: ``openblas_get_config()`` of the loaded library.
        reason: Why nothing was loaded (disabled, not Linux, not found, ...).
    """

    provider: str | None
    path: str | None
    config: str | None
    reason: str | None = None


_STATE: dict[str, BlasInfo] = {}


def cpu_has_avx512() -> bool:
    """True when /proc/cpuinfo lists every AVX-512 subset the SKYLAKEX kernels use."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return all(flag in flags for flag in _SKYLAKEX_FLAGS)
    except OSError:
        pass
    return False


def _site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs.append(site.getusersitepackages())
    dirs.extend(p for p in sys.path if p.endswith("site-packages"))
    seen: list[str] = []
    for d in dirs:
        if d and os.path.isdir(d) and d not in seen:
            seen.append(d)
    return seen


def _cmeel_openblas_path() -> str | None:
    for d in _site_dirs():
        hits = sorted(glob.glob(os.path.join(d, "cmeel.prefix", "lib", "libopenblas.so*")))
        if hits:
            return hits[0]
    return None


def _load_global(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _patched_soname_copy(path: str, new_soname: bytes) -> str:
    """Return a path to an in-memory copy of ``path`` whose SONAME reads ``new_soname``.

    auditwheel renames bundled libraries (``libgfortran-<hash>.so.5.0.0``) and their
    SONAME with them; a library asking for ``libgfortran.so.5`` then does not find them.
    The SONAME string lives in ``.dynstr``; the new name is shorter, so it is written in
    place and padded with NULs. The copy lives in a ``memfd`` (no file on disk).
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    old = os.path.basename(path).encode() + b"\0"
    at = data.find(old)
    if at < 0 or len(new_soname) + 1 > len(old):
        raise OSError(f"cannot rewrite the SONAME of {path}")
    data[at : at + len(old)] = new_soname + b"\0" * (len(old) - len(new_soname))
    fd = os.memfd_create("libgfortran.so.5", 0)
    os.write(fd, bytes(data))
    return f"/proc/self/fd/{fd}"


def _ensure_libgfortran() -> None:
    """Make ``libgfortran.so.5`` resolvable by SONAME (system copy or numpy's bundled one)."""
    try:
        _load_global("libgfortran.so.5")
        return
    except OSError:
        pass
    for d in _site_dirs():
        for libs in ("numpy.libs", "scipy.libs"):
            gfortran = sorted(glob.glob(os.path.join(d, libs, "libgfortran-*.so.5*")))
            if not gfortran:
                continue
            for quadmath in sorted(glob.glob(os.path.join(d, libs, "libquadmath-*.so*"))):
                _load_global(quadmath)
            _load_global(_patched_soname_copy(gfortran[0], b"libgfortran.so.5"))
            return
    raise OSError("libgfortran.so.5 not found (system or numpy wheel)")


def _config(lib: ctypes.CDLL) -> str | None:
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        return lib.openblas_get_config().decode()
    except AttributeError:
        return None


def _try_providers() -> BlasInfo:
    errors: list[str] = []
    explicit = os.environ.get(ENV_PATH)
    if explicit:
        try:
            return BlasInfo("env", explicit, _config(_load_global(explicit)))
        except OSError as e:
            errors.append(f"{ENV_PATH}={explicit}: {e}")
    cmeel = _cmeel_openblas_path()
    if cmeel and cpu_has_avx512():
        try:
            _ensure_libgfortran()
            return BlasInfo("cmeel-openblas", cmeel, _config(_load_global(cmeel)))
        except OSError as e:
            errors.append(f"cmeel-openblas: {e}")
    elif cmeel:
        errors.append("cmeel-openblas: CPU lacks AVX-512 (it is built for SKYLAKEX only)")
    for name in ("libopenblas.so.0", ctypes.util.find_library("openblas")):
        if not name:
            continue
        try:
            return BlasInfo("system", name, _config(_load_global(name)))
        except OSError as e:
            errors.append(f"system {name}: {e}")
    return BlasInfo(None, None, None, "; ".join(errors) or "no OpenBLAS found")


def ensure_openblas() -> BlasInfo:
    """Load an OpenBLAS with global symbols before MLX binds its BLAS (idempotent).

    Returns:
        A :class:`BlasInfo` saying which provider (if any) is in use.
    """
    if "info" in _STATE:
        return _STATE["info"]
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        info = BlasInfo(None, None, None, f"disabled by {ENV_DISABLE}")
    elif platform.system() != "Linux":
        info = BlasInfo(None, None, None, "not Linux (MLX uses Accelerate/Metal)")
    else:
        if "mlx.core" in sys.modules:
            warnings.warn(
                "mlx.core was imported before mlx_redrafter; MLX may keep its slow reference "
                "BLAS. Import mlx_redrafter first.",
                RuntimeWarning,
                stacklevel=3,
            )
        os.environ.setdefault(ENV_THREAD_TIMEOUT, THREAD_TIMEOUT)
        info = _try_providers()
        if info.provider is None:
            warnings.warn(
                f"No usable OpenBLAS ({info.reason}); MLX CPU matmuls will be slow. Fix: {FIX_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
    _STATE["info"] = info
    return info


def blas_symbol_owner(symbol: str = "cblas_sgemm") -> str | None:
    """Path of the library that provides ``symbol`` in the process's global scope."""

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    try:
        libc = ctypes.CDLL(None)
        addr = ctypes.cast(getattr(libc, symbol), ctypes.c_void_p)
        dladdr = libc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
        out = DlInfo()
        if dladdr(addr, ctypes.byref(out)) and out.dli_fname:
            return out.dli_fname.decode()
    except (AttributeError, OSError):
        pass
    return None


def set_blas_threads(count: int) -> bool:
    """Use ``count`` OpenBLAS threads; ``True`` if the OpenBLAS that MLX uses took it.

    On a CPU shared with other jobs one thread is often several times faster than two
    (an idle BLAS thread spins while its partner is descheduled).
    """
    path = ensure_openblas().path  # what ``import mlx_redrafter`` loaded (idempotent)
    if count < 1 or path is None:
        return False
    ctypes.CDLL(path).openblas_set_num_threads(count)
    return True
