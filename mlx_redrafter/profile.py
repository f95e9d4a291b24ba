"""Per-device beam-shape profile written by ``python -m mlx_redrafter.bench --tune``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def home() -> Path:
    """The library's cache directory (``$MLX_REDRAFTER_HOME`` or ``~/.cache/mlx_redrafter``)."""
    return Path(os.environ.get("MLX_REDRAFTER_HOME", Path.home() / ".cache" / "mlx_redrafter"))


def device_key() -> str:
    """A key naming this device: OS, machine and CPU count."""
    return f"{platform.system()}-{platform.machine()}-{os.cpu_count()}"


def profile_path() -> Path:
    """Where this device's profile lives."""
    return home() / "profiles" / f"{device_key()}.json"


def tuned_shape() -> tuple[int, int] | None:
    """``(W, L)`` saved by ``--tune`` for this device, or ``None``."""
    path = profile_path()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return int(data["beam_width"]), int(data["beam_length"])
    except (ValueError, KeyError, TypeError):
        return None


def save_profile(beam_width: int, beam_length: int, **measurements: object) -> Path:
    """Save the tuned shape (and what was measured) for this device."""
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"beam_width": beam_width, "beam_length": beam_length, **measurements}
    path.write_text(json.dumps(data, indent=2))
    return path
