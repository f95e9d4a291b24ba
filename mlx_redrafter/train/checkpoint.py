"""``fit``'s checkpoints: ``OUT/checkpoint/`` holds the head (``head/``), the optimizer state
(``optimizer.safetensors``) and ``state.json`` (:class:`TrainState`, draft-vocabulary
coverage, data fingerprint, options). A checkpoint is written to ``checkpoint.tmp`` and
renamed, so an interrupted write leaves the previous one; a run resumes only with the same
data and the same :data:`~mlx_redrafter.train.fit_options.RESUME_KEYS` options."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_redrafter.train.fit_options import RESUME_KEYS, FitOptions

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
HEAD_DIR = "head"
#: The run's report in the output directory (options, data, history, evaluations).
REPORT_FILE = "training.json"


@dataclass
class TrainState:
    """Where training stands (saved in every checkpoint).

    Attributes:
        step: Optimizer steps done.
        history: One ``{"step", "loss", "lr", "positions"}`` entry per step.
        evals: Held-out results ``{"step", "epoch", ...}``.
    """

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def read_state(path: Path, options: FitOptions, data_hash: str) -> dict[str, Any] | None:
    """The ``state.json`` of checkpoint ``path`` (``None`` if there is none).

    Raises:
        ValueError: the checkpoint was written with other data or other
            :data:`~mlx_redrafter.train.fit_options.RESUME_KEYS` options (all named).
    """
    if not (path / STATE_FILE).is_file():
        return None
    saved = json.loads((path / STATE_FILE).read_text())
    mine = asdict(options)
    defaults = asdict(FitOptions(out=""))
    changed = [k for k in RESUME_KEYS if saved["options"].get(k, defaults[k]) != mine[k]]
    if saved.get("data") != data_hash:
        changed.append("data")
    if changed:
        raise ValueError(
            "cannot resume: options differ from the checkpoint's: "
            + ", ".join(f"{k} ({saved['options'].get(k)!r} -> {mine.get(k)!r})" for k in changed)
        )
    return saved


def read_optimizer_state(path: Path) -> Any:
    """The optimizer state saved in checkpoint ``path`` (a tree of arrays)."""
    weights = mx.load(str(path / OPTIMIZER_FILE))
    return tree_unflatten(list(weights.items()))


def write_checkpoint(
    final: Path, save_head: Callable[[Path], None], optimizer_state: Any, state: dict[str, Any]
) -> Path:
    """Write a checkpoint to ``final`` (through ``checkpoint.tmp``, then renamed).

    Args:
        final: The checkpoint directory (``OUT/checkpoint``).
        save_head: Writes the head into the directory it is given.
        optimizer_state: The optimizer's state tree.
        state: What ``state.json`` holds (JSON-serialisable).
    """
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_head(tmp / HEAD_DIR)
    mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer_state)))
    (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
