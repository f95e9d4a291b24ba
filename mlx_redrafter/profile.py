"""Beam-shape profiles written by ``python -m mlx_redrafter.bench --tune``.

A profile belongs to one device *and* one setup (target model in its dtype + drafter,
greedy or sampling): the best beam shape depends on the device's verification cost (a
GPU's, named with its memory, or a CPU model's; a float16 model's or a float32 one's) and
on the drafter's acceptance, so a shape tuned for one model, device or dtype (or for greedy
decoding) is never applied to another (or to sampling).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mlx_redrafter import device


def home() -> Path:
    """The library's cache directory (``$MLX_REDRAFTER_HOME`` or ``~/.cache/mlx_redrafter``)."""
    return Path(os.environ.get("MLX_REDRAFTER_HOME", Path.home() / ".cache" / "mlx_redrafter"))


def device_key() -> str:
    """A key naming the device computations run on (:func:`mlx_redrafter.device.key`: the
    GPU's name and memory on a Mac, the CPU model and core count here)."""
    return device.key()


def _name(spec: str | None) -> str:
    if spec is None or spec == "default":
        return "default"
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def setup_key(
    model: str | None, drafter: str | None, sampling: bool = False, dtype: str | None = None
) -> str:
    """The setup a profile is for: ``--model`` and ``--drafter`` (resolved paths), whether
    decoding samples (``temp > 0``: sampled text is accepted less, so its best shape is
    tuned apart) and the model's dtype (:func:`mlx_redrafter.models.weights_dtype`: a
    tree forward costs differently in float16, 4-bit or float32)."""
    key = f"model={_name(model)} drafter={_name(drafter)}"
    if dtype is not None:
        key += f" dtype={dtype}"
    return f"{key} mode=sampling" if sampling else key


def profile_path(setup: str) -> Path:
    """Where this device's profile for ``setup`` (:func:`setup_key`) lives."""
    digest = hashlib.sha1(setup.encode()).hexdigest()[:12]
    return home() / "profiles" / f"{device_key()}-{digest}.json"


def read_profile(setup: str) -> dict | None:
    """This device's saved profile for ``setup``, or ``None`` (missing or unreadable)."""
    path = profile_path(setup)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("setup") == setup else None


def tuned_shape(setup: str) -> tuple[int, int] | None:
    """``(W, L)`` saved by ``--tune`` for ``setup`` on this device, or ``None``."""
    data = read_profile(setup)
    try:
        return int(data["beam_width"]), int(data["beam_length"])
    except (KeyError, TypeError, ValueError):
        return None


def tuned_lookup_beams(setup: str) -> int | None:
    """Prompt-lookup beams saved by ``--tune`` for ``setup`` on this device, or ``None``."""
    data = read_profile(setup)
    try:
        return int(data["lookup_beams"])
    except (KeyError, TypeError, ValueError):
        return None


def save_profile(
    setup: str,
    beam_width: int,
    beam_length: int,
    lookup_beams: int | None = None,
    **measurements: object,
) -> Path:
    """Save the tuned shape, lookup beams (and what was measured) for ``setup``."""
    path = profile_path(setup)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {"setup": setup, "beam_width": beam_width, "beam_length": beam_length}
    if lookup_beams is not None:
        data["lookup_beams"] = lookup_beams
    data.update(measurements)
    path.write_text(json.dumps(data, indent=2))
    return path
