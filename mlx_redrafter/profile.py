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


def read_profile() -> dict | None:
    """This device's saved profile, or ``None`` (missing or unreadable)."""
    path = profile_path()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def tuned_shape() -> tuple[int, int] | None:
    """``(W, L)`` saved by ``--tune`` for this device, or ``None``."""
    data = read_profile()
    try:
        return int(data["beam_width"]), int(data["beam_length"])
    except (KeyError, TypeError, ValueError):
        return None


def tuned_lookup_beams() -> int | None:
    """Prompt-lookup beams saved by ``--tune`` for this device, or ``None``."""
    data = read_profile()
    try:
        return int(data["lookup_beams"])
    except (KeyError, TypeError, ValueError):
        return None


def save_profile(
    beam_width: int, beam_length: int, lookup_beams: int | None = None, **measurements: object
) -> Path:
    """Save the tuned shape, lookup beams (and what was measured) for this device."""
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {"beam_width": beam_width, "beam_length": beam_length}
    if lookup_beams is not None:
        data["lookup_beams"] = lookup_beams
    data.update(measurements)
    path.write_text(json.dumps(data, indent=2))
    return path
