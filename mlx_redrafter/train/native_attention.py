"""One-token attention over a batch of rows as a small native CPU kernel.

MLX's CPU backend runs the grouped one-token attention of batched decoding as ``B x Hkv``
separate small matrix products per layer (``(rep, D) @ (D, S)``), about 4 GFLOP/s: at
batch 128 and a 256-token context that is ~30 ms per layer, most of a SmolLM2 decode step.
The work itself is reading each row's keys and values once. ``csrc/decode_attention.c``
does exactly that, one OpenMP task per ``(row, kv-head)``, with MLX's ``exp`` polynomial.

Its OpenMP threads wait passively (``OMP_WAIT_POLICY=passive`` unless set): between
layers the cores belong to OpenBLAS. The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``~/.cache/mlx_redrafter/kernels`` (keyed by the source, the flags and the CPU), and loaded
with ctypes. :func:`available` is False when there is no compiler, on a non-Linux system,
or with ``MLX_REDRAFTER_NO_NATIVE=1``; callers then keep MLX's own ops.

:func:`decode_attention` evaluates its inputs (one host sync per layer) and reads the
MLX buffers in place through numpy views; the result is a new MLX array.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.device import on_cpu

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fopenmp",
    "-fPIC",
    "-shared",
)
_ABI = 1

_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$MLX_REDRAFTER_CACHE`` or ``~/.cache/mlx_redrafter``)."""
    root = os.environ.get("MLX_REDRAFTER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mlx_redrafter"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (if not already cached) and return the shared library's path.

    Raises:
        RuntimeError: No C compiler, or it failed (its output is in the message).
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc or gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode())
    out_dir = out_dir or cache_dir()
    target = out_dir / f"decode_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("MLX_REDRAFTER_NO_NATIVE") == "1" or platform.system() != "Linux":
        return None
    # Idle OpenMP threads must sleep, not spin: a spinning thread takes the core that
    # OpenBLAS needs for the next matmul (1.2-1.5x slower decode steps when it spins).
    # libgomp reads this once, when it is loaded with the kernel.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        lib = ctypes.CDLL(str(build()))
        if lib.decode_attention_abi() != _ABI:
            raise RuntimeError("stale kernel library (ABI mismatch)")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"native decode attention unavailable: {exc}", stacklevel=3)
        return None
    f = lib.decode_attention_f32
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    f.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr]
    f.argtypes += [i32] * 6 + [ctypes.c_float, i32]
    f.restype = ctypes.c_int
    _library = lib
    return lib


def available() -> bool:
    """True when the kernel is compiled and loaded (see the module docstring) and MLX
    computes on the CPU device."""
    return on_cpu() and _load() is not None


def threads() -> int:
    """OpenMP threads the kernel uses (``$MLX_REDRAFTER_NATIVE_THREADS``, else all cores)."""
    return max(1, int(os.environ.get("MLX_REDRAFTER_NATIVE_THREADS") or os.cpu_count() or 1))


def _strides(a: np.ndarray) -> list[int]:
    return [s // a.itemsize for s in a.strides]


def decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array | None
) -> mx.array:
    """Softmax attention of one query token per row (same contract as
    :func:`mlx_redrafter.train.fast_ops.decode_attention`).

    Args:
        queries: ``(B, Hq, 1, D)`` float32.
        keys: ``(B, Hkv, S, D)`` float32, any strides with a contiguous last axis.
        values: ``(B, Hkv, S, Dv)`` float32, likewise.
        scale: Multiplier of the scores.
        mask: None, or bool broadcastable to ``(B, 1, 1, S)`` (True = attend).

    Returns:
        ``(B, Hq, 1, Dv)`` float32.

    Raises:
        RuntimeError: The kernel is not available (check :func:`available` first).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("native decode attention is not available")
    b, hq, _, d = queries.shape
    _, hkv, s, dv = values.shape
    q = mx.contiguous(queries)
    m = None if mask is None else mx.broadcast_to(mask, (b, 1, 1, s))
    mx.eval(q, keys, values, *([] if m is None else [m]))
    qn, kn, vn = np.asarray(q), np.asarray(keys), np.asarray(values)
    if kn.strides[-1] != kn.itemsize or vn.strides[-1] != vn.itemsize:
        kn, vn = np.ascontiguousarray(kn), np.ascontiguousarray(vn)
    mn = None if m is None else np.asarray(m).view(np.uint8)
    n_threads = threads()
    out = np.empty((b, hq, 1, dv), dtype=np.float32)
    scratch = np.empty(n_threads * (hq // hkv) * s, dtype=np.float32)
    ks, vs = _strides(kn), _strides(vn)
    ms = [0, 0] if mn is None else [mn.strides[0], mn.strides[3]]
    code = lib.decode_attention_f32(
        qn.ctypes.data,
        kn.ctypes.data,
        ks[0],
        ks[1],
        ks[2],
        vn.ctypes.data,
        vs[0],
        vs[1],
        vs[2],
        None if mn is None else mn.ctypes.data,
        ms[0],
        ms[1],
        out.ctypes.data,
        scratch.ctypes.data,
        b,
        hq,
        hkv,
        s,
        d,
        dv,
        float(scale),
        n_threads,
    )
    if code != 0:
        raise RuntimeError(f"decode_attention_f32 rejected its arguments (code {code})")
    return mx.array(out)
