"""Drafters: anything that proposes beams for the engine to verify (see ``base.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.nn as nn

from mlx_redrafter.drafters.base import Draft, DraftContext, Drafter
from mlx_redrafter.drafters.combined import CombinedDrafter
from mlx_redrafter.drafters.draft_model import DraftModelDrafter
from mlx_redrafter.drafters.eagle import EagleDrafter
from mlx_redrafter.drafters.eagle_head import is_eagle_dir
from mlx_redrafter.drafters.medusa import MedusaDrafter
from mlx_redrafter.drafters.parallel import MODEL_TYPE as PARALLEL_MODEL_TYPE
from mlx_redrafter.drafters.parallel import ParallelDrafter
from mlx_redrafter.drafters.prompt_lookup import PromptLookupDrafter
from mlx_redrafter.drafters.published import (
    is_eagle3_dir,
    load_published_eagle,
    load_published_eagle3,
    published_kind,
    resolve_head,
    target_dims,
)
from mlx_redrafter.drafters.redrafter import WEIGHTS_FILE as REDRAFTER_WEIGHTS
from mlx_redrafter.drafters.redrafter import ReDrafter
from mlx_redrafter.drafters.slem import SlemDrafter
from mlx_redrafter.drafters.slrs import SlrsDrafter
from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError
from mlx_redrafter.target import Target

#: How a draft model proposes (``--draft-method``): one tokenizer, token-level
#: intersection of two tokenizers, string-level exact match, or string-level rejection
#: sampling.
DRAFT_METHODS = ("same", "tli", "slem", "slrs")


def head_kind(path: str | Path) -> str:
    """``"eagle"`` / ``"parallel"`` for a feature-level / parallel head directory, else
    ``"redrafter"`` (by ``draft_kind`` / ``model_type``)."""
    if is_eagle_dir(path):
        return "eagle"
    file = Path(path) / "config.json"
    if file.is_file():
        try:
            model_type = json.loads(file.read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
        if model_type == PARALLEL_MODEL_TYPE:
            return "parallel"
    return "redrafter"


def load_drafter(path: str | Path, model: nn.Module, **kwargs) -> Drafter:
    """Open a drafter directory (or Hub repo id) for target ``model``, checked against it.

    The directory's ``config.json`` names the head: a ReDrafter head (``model_type:
    recurrent_drafting_drafter``, :class:`ReDrafter`), a parallel head (``model_type:
    parallel_spec_drafter``, :class:`ParallelDrafter`), a feature-level head
    (``draft_kind: eagle``, :class:`EagleDrafter`) or a published EAGLE-1/2 head
    (SafeAILab's layout, see :mod:`~mlx_redrafter.drafters.published`, also an
    :class:`EagleDrafter`), a published or converted EAGLE-3 head (an :class:`EagleDrafter`
    reading three target layers) or a published Medusa-1 head (:class:`MedusaDrafter`,
    ``medusa_choices`` for a Medusa tree); ``kwargs`` go to the drafter (``top_k``: Apple's logit warp
    of ReDrafter beam search, see :mod:`~mlx_redrafter.drafters.logit_warp`).
    (The head modules' own loaders are :func:`mlx_redrafter.drafters.redrafter.load_drafter`
    and :func:`mlx_redrafter.drafters.parallel.load_head`.)

    Raises:
        FileNotFoundError: no such directory (and not a repo id).
        ValueError: the head does not fit ``model`` or its files are malformed or
            unreadable (one line naming the file or key).
    """
    path = resolve_head(path)
    top_k = kwargs.pop("top_k", None)
    if top_k is not None and (top_k < 1 or published_kind(path) or head_kind(path) != "redrafter"):
        raise ValueError(f"the top-{top_k} warp applies to ReDrafter heads only, with k >= 1")
    published = published_kind(path)
    choices = kwargs.pop("medusa_choices", None)
    if choices is not None and published != "medusa":
        raise ValueError(f"medusa_choices apply to Medusa heads only; {path} is not one")
    if published == "eagle":
        head = load_published_eagle(path, target_dims(model))
        return EagleDrafter.for_target(model, head, None, kwargs.get("tree_nodes"), path)
    if is_eagle3_dir(path):
        shape = (*target_dims(model), len(model.layers))
        head, ids = load_published_eagle3(path, shape)
        return EagleDrafter.for_target(model, head, ids, kwargs.get("tree_nodes"), path)
    if published == "medusa":
        return MedusaDrafter.from_model(model, path, choices=choices)
    if head_kind(path) == "eagle":
        return EagleDrafter.from_model(model, path, tree_nodes=kwargs.get("tree_nodes"))
    kwargs.pop("tree_nodes", None)
    try:
        if head_kind(path) == "parallel":
            return ParallelDrafter.from_model(model, path, **kwargs)
        return ReDrafter.from_model(model, path, top_k=top_k, **kwargs)
    except RuntimeError as e:  # MLX's error for a truncated or corrupt safetensors file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        file = path / REDRAFTER_WEIGHTS
        raise ValueError(
            f"cannot read weights file {file} (truncated or corrupt?): {reason}"
        ) from e


def draft_model_drafter(
    target: nn.Module,
    draft: nn.Module,
    target_tokenizer: Any = None,
    draft_tokenizer: Any = None,
    method: str = "same",
) -> DraftModelDrafter | SlemDrafter | SlrsDrafter:
    """A drafter for ``target`` from a draft model, by ``method`` (:data:`DRAFT_METHODS`).

    ``"same"`` and ``"tli"``: :meth:`DraftModelDrafter.from_models`; ``"slem"``:
    :class:`SlemDrafter`; ``"slrs"``: :class:`SlrsDrafter` (both need both tokenizers).
    """
    if method in ("slem", "slrs"):
        if target_tokenizer is None or draft_tokenizer is None:
            raise ValueError(f"the {method} method needs both tokenizers")
        if method == "slrs":
            size = Target(target).vocab_size
            return SlrsDrafter(draft, target_tokenizer, draft_tokenizer, size)
        return SlemDrafter(draft, target_tokenizer, draft_tokenizer)
    return DraftModelDrafter.from_models(
        target, draft, target_tokenizer, draft_tokenizer, method=method
    )


__all__ = [
    "CombinedDrafter",
    "Draft",
    "DraftContext",
    "DraftModelDrafter",
    "EagleDrafter",
    "MedusaDrafter",
    "DRAFT_METHODS",
    "Drafter",
    "ParallelDrafter",
    "PromptLookupDrafter",
    "ReDrafter",
    "SlemDrafter",
    "SlrsDrafter",
    "VocabularyMismatchError",
    "draft_model_drafter",
    "head_kind",
    "load_drafter",
]
