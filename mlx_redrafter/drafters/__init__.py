"""Drafters: anything that proposes beams for the engine to verify (see ``base.py``)."""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn

from mlx_redrafter.drafters.base import Draft, DraftContext, Drafter
from mlx_redrafter.drafters.draft_model import DraftModelDrafter
from mlx_redrafter.drafters.prompt_lookup import PromptLookupDrafter
from mlx_redrafter.drafters.redrafter import ReDrafter
from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError


def load_drafter(path: str | Path, model: nn.Module, **kwargs) -> Drafter:
    """Open a drafter directory for target ``model``, checked against it.

    Today a drafter directory is a ReDrafter head (``model_type:
    recurrent_drafting_drafter``); ``kwargs`` go to :class:`ReDrafter`. (The head module
    itself is :func:`mlx_redrafter.drafters.redrafter.load_drafter`.)
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"drafter not found: {path}")
    return ReDrafter.from_model(model, path, **kwargs)


__all__ = [
    "Draft",
    "DraftContext",
    "DraftModelDrafter",
    "Drafter",
    "PromptLookupDrafter",
    "ReDrafter",
    "VocabularyMismatchError",
    "load_drafter",
]
