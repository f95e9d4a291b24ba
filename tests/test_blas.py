"""The OpenBLAS loader: correct results, really OpenBLAS, and clean fallbacks."""

import os
import platform
import subprocess
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter import BLAS, _blas

# platform.system(), not sys.platform: CI's second pass fakes macOS through it.
linux_only = pytest.mark.skipif(
    platform.system() != "Linux", reason="OpenBLAS preload is Linux-only"
)


@linux_only
def test_gemm_runs_on_openblas_and_matches_numpy():
    assert BLAS.provider is not None, f"no OpenBLAS loaded: {BLAS.reason}"
    owner = _blas.blas_symbol_owner("cblas_sgemm")
    assert owner is not None and "openblas" in owner.lower()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    b = rng.standard_normal((1024, 1024), dtype=np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    want = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=full_env
    )


@linux_only
def test_env_var_turns_it_off():
    out = _run(
        "import mlx_redrafter as m; print(m.BLAS.provider, '|', m.BLAS.reason)",
        MLX_REDRAFTER_NO_OPENBLAS="1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("None |") and "disabled" in out.stdout


@linux_only
def test_warns_when_mlx_was_imported_first():
    out = _run("import mlx.core; import mlx_redrafter")
    assert out.returncode == 0, out.stderr
    assert "imported before mlx_redrafter" in out.stderr


def test_missing_provider_warns_once_and_never_raises(monkeypatch):
    monkeypatch.setattr(_blas, "_STATE", {})
    monkeypatch.setattr(_blas.platform, "system", lambda: "Linux")
    monkeypatch.setattr(_blas, "_cmeel_openblas_path", lambda: None)
    monkeypatch.setattr(_blas, "_load_global", _refuse)
    monkeypatch.delenv(_blas.ENV_DISABLE, raising=False)
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # pretend mlx is not loaded yet
    monkeypatch.delitem(sys.modules, "mlx.core")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = _blas.ensure_openblas()
        again = _blas.ensure_openblas()
    assert info.provider is None and again is info
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "apt-get install libopenblas0-pthread" in messages[0]


def _refuse(path: str):
    raise OSError(f"{path}: cannot open shared object file")


def test_non_avx512_cpu_skips_cmeel(monkeypatch):
    monkeypatch.setattr(_blas, "cpu_has_avx512", lambda: False)
    monkeypatch.setattr(_blas, "_cmeel_openblas_path", lambda: "/x/libopenblas.so.0")
    loaded = []
    monkeypatch.setattr(_blas, "_load_global", lambda p: loaded.append(p) or _refuse(p))
    monkeypatch.delenv(_blas.ENV_PATH, raising=False)
    info = _blas._try_providers()
    assert "/x/libopenblas.so.0" not in loaded
    assert info.provider is None and "AVX-512" in info.reason


@linux_only
def test_idle_blas_threads_sleep_unless_the_user_chose_otherwise():
    code = "import os, mlx_redrafter; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _blas.THREAD_TIMEOUT
    assert _run(code, OPENBLAS_THREAD_TIMEOUT="20").stdout.strip() == "20"


_MMAPPED_BYTES = """
import ctypes
import mlx_redrafter
import mlx.core as mx

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
a = mx.zeros((1 << 24,))
mx.eval(a)
print(mlx_redrafter.MALLOC_TUNED, mallinfo2().hblkhd >= a.nbytes)
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)
def test_large_mlx_buffers_come_from_the_heap_not_fresh_mmaps():
    tuned = _run(_MMAPPED_BYTES)
    assert tuned.returncode == 0, tuned.stderr
    assert tuned.stdout.split() == ["True", "False"]
    plain = _run(_MMAPPED_BYTES, MLX_REDRAFTER_NO_MALLOC_TUNING="1")
    assert plain.stdout.split() == ["False", "True"]  # the check sees mmapped buffers


def test_nothing_is_loaded_or_tuned_on_macos(monkeypatch):
    """On a Mac (MLX uses Accelerate / Metal) the loader and the heap tuning do nothing."""
    from mlx_redrafter import _malloc

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(_blas, "_STATE", {})
    monkeypatch.setattr(_blas, "_try_providers", lambda: pytest.fail("a provider was tried"))
    info = _blas.ensure_openblas()
    assert info.provider is None and "not Linux" in info.reason
    assert _malloc.tune_malloc() is False
