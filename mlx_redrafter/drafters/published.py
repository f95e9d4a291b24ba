"""Published draft heads: SafeAILab/EAGLE's EAGLE-1/2 checkpoints read as an
:class:`~.eagle_head.EagleHead`, and Hub repo ids resolved to local directories.

A published EAGLE-1/2 head directory holds ``config.json`` (a Llama config with
``num_hidden_layers: 1``, ``"bias"`` for the fc bias, true when absent, ``rope_theta`` when
present) and ``model.safetensors`` or ``pytorch_model.bin`` (read only when torch is
installed) with keys without prefix: ``embed_tokens.weight`` ``(V, d)`` (a frozen copy of
the target's), ``fc.weight`` ``(d, 2d)`` [+ ``fc.bias``],
``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``
and ``layers.0.post_attention_layernorm.weight``. Those are :class:`EagleHead`'s names and
its math (``fc([e(x_{t+1}); f_t])``, layer 0 without input norm, logits from the target's
LM head, no final norm), so the head runs as one; the embedding copy is checked against
the target's shape and dropped (the drafter embeds with the target's own table). EAGLE-2
is the same checkpoint drafting dynamic trees (``--tree-nodes``).

An EAGLE-3 directory (``draft_vocab_size`` in the config; ``target_hidden_size``
optional, the target's width when absent) holds ``model.safetensors`` or
``pytorch_model.bin`` with ``fc.weight`` ``(d, 3 d_t)``, ``midlayer.{hidden_norm,
input_layernorm,post_attention_layernorm}.weight``, ``midlayer.self_attn.{q,k,v}_proj``
reading ``2d``, ``midlayer.self_attn.o_proj``, ``midlayer.mlp.*``, ``norm.weight``,
``lm_head.weight`` ``(K, d)``, ``d2t`` ``(K,)`` (target id = draft id + ``d2t``), ``t2d``
``(V,)`` bool and optionally ``embed_tokens.weight`` ``(V, d)`` (absent: the target's
embedding). It is read as an :class:`~.eagle3_head.Eagle3Head` by
:func:`load_published_eagle3`; a converted MLX directory is the same files with
``"draft_kind": "eagle3"`` in its config. Medusa directories (``medusa_num_heads``) are
read by :mod:`~mlx_redrafter.drafters.medusa`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter.checkpoint_files import load_exact_weights, load_weights_file
from mlx_redrafter.drafters.eagle3_head import DRAFT_KIND as EAGLE3_KIND
from mlx_redrafter.drafters.eagle3_head import Eagle3Config, Eagle3Head, tap_layers
from mlx_redrafter.drafters.eagle_head import EagleConfig, EagleHead, head_from_weights
from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError

CONFIG_FILE = "config.json"
#: Weight files of a published EAGLE-1/2 head, in the order they are looked for.
EAGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EMBED_KEY = "embed_tokens.weight"
#: ``model_type`` of this project's own head directories (never a published head).
OWN_MODEL_TYPES = ("recurrent_drafting_drafter", "parallel_spec_drafter")
#: Files fetched from the Hub for a head repo id.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.pt"]


def _config(path: Path) -> dict | None:
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def published_kind(path: str | Path) -> str | None:
    """``"eagle"`` (EAGLE-1/2), ``"eagle3"`` or ``"medusa"`` for a published head directory,
    ``None`` for anything else (this project's own heads included)."""
    path = Path(path)
    raw = _config(path)
    if raw is None or "draft_kind" in raw or raw.get("model_type") in OWN_MODEL_TYPES:
        return None
    if "medusa_num_heads" in raw:
        return "medusa"
    archs = " ".join(str(a) for a in raw.get("architectures") or [])
    if "draft_vocab_size" in raw or "eagle3" in archs.lower():
        return "eagle3"
    if raw.get("num_hidden_layers") == 1 and any(
        (path / name).is_file() for name in EAGLE_WEIGHT_FILES
    ):
        return "eagle"
    return None


def is_eagle3_dir(path: str | Path) -> bool:
    """A published EAGLE-3 directory or one converted to MLX (``draft_kind: eagle3``)."""
    raw = _config(Path(path))
    return raw is not None and (
        raw.get("draft_kind") == EAGLE3_KIND or published_kind(path) == EAGLE3_KIND
    )


def target_dims(model: nn.Module) -> tuple[int, int]:
    """``(vocab_size, hidden_size)`` of an mlx-lm model (0 when unknown)."""
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or 0), int(getattr(args, "hidden_size", 0) or 0)


def eagle_config(raw: dict, source: str) -> EagleConfig:
    """The head's shape from a published ``config.json`` dict.

    Raises:
        ValueError: a field the head does not implement (``rope_scaling``, ``qkv_bias``).
    """
    if raw.get("rope_scaling"):
        raise ValueError(
            f"{source}: rope_scaling {raw['rope_scaling']} is not supported for EAGLE heads"
        )
    if raw.get("qkv_bias"):
        raise ValueError(f"{source}: qkv_bias is not supported for EAGLE heads")
    return EagleConfig.from_json(raw)


def read_eagle_weights(path: Path) -> tuple[Path, dict[str, mx.array]]:
    """``(file, tensors)`` of the first weight file of :data:`EAGLE_WEIGHT_FILES` present."""
    for name in EAGLE_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name, load_weights_file(path / name)
    raise ValueError(f"no EAGLE weights in {path}: expected {' or '.join(EAGLE_WEIGHT_FILES)}")


def load_published_eagle(path: str | Path, target: tuple[int, int] | None = None) -> EagleHead:
    """Read a published EAGLE-1/2 head directory, checked against ``target``.

    Args:
        path: The directory.
        target: ``(vocab_size, hidden_size)`` of the target, or ``None`` (no check).

    Raises:
        ValueError: a missing or misshapen weight, an unsupported config field, or an
            unreadable weight file (each named).
        VocabularyMismatchError: the head (or its embedding copy) was made for another
            hidden size or vocabulary (both shapes named).
        MissingTorchError: ``pytorch_model.bin`` without torch installed.
    """
    path = Path(path)
    source = f"EAGLE head {path}"
    raw = _config(path)
    if raw is None:
        raise ValueError(f"{source}: no readable {CONFIG_FILE}")
    config = eagle_config(raw, source)
    file, weights = read_eagle_weights(path)
    embed = weights.pop(EMBED_KEY, None)
    own = (config.vocab_size, config.hidden_size)
    if embed is not None and tuple(embed.shape) != own:
        raise ValueError(
            f"{source}: {file.name} has {EMBED_KEY} of shape {tuple(embed.shape)}, but the "
            f"config says vocabulary {own[0]} and hidden size {own[1]}"
        )
    if target is not None and own != tuple(target):
        raise VocabularyMismatchError(
            f"{source} was made for vocabulary {own[0]} and hidden size {own[1]} "
            f"(embed_tokens / config); the target has vocabulary {target[0]} and hidden "
            f"size {target[1]}"
        )
    head, _ = head_from_weights(config, weights, source=f"{source} ({file.name})")
    return head


def looks_like_repo_id(spec: str) -> bool:
    """``owner/name`` (no leading ``.``, ``/`` or ``~``, one slash)."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def resolve_head(spec: str | Path) -> Path:
    """A head directory: ``spec`` itself when it exists, else the Hub repo ``spec``
    downloaded (config and weight files only) through huggingface-hub.

    Raises:
        FileNotFoundError: ``spec`` is neither a directory nor a repo id.
        ValueError: the Hub could not serve the repo (one line saying why).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(str(spec)):
        raise FileNotFoundError(f"drafter not found: {path}")
    from huggingface_hub import snapshot_download

    from mlx_redrafter.hub import HUB_ERRORS, hub_error_message

    try:
        return Path(snapshot_download(str(spec), allow_patterns=HUB_PATTERNS))
    except HUB_ERRORS as e:
        raise ValueError(hub_error_message(str(spec), e)) from e


D2T_KEY, T2D_KEY = "d2t", "t2d"


def _eagle3_config(raw: dict, source: str, has_embedding: bool) -> Eagle3Config:
    if raw.get("draft_vocab_size") is None:
        raise ValueError(f"{source}: config.json has no draft_vocab_size")
    base = eagle_config(raw, source)
    fields = {k: v for k, v in vars(base).items() if k not in ("own_head", "bias")}
    return Eagle3Config(
        **fields,
        target_hidden_size=int(raw.get("target_hidden_size") or base.hidden_size),
        has_embedding=has_embedding,
    )


def draft_to_target(d2t: np.ndarray, t2d: np.ndarray, source: str) -> np.ndarray:
    """``(K,)`` int32 target ids of the draft ids (``id + d2t[id]``), checked against the
    ``(V,)`` bool ``t2d`` (exactly those ids marked, each once).

    Raises:
        ValueError: the two maps disagree (names how).
    """
    ids = np.arange(d2t.shape[0], dtype=np.int64) + d2t.astype(np.int64)
    size = t2d.shape[0]
    if ids.min() < 0 or ids.max() >= size:
        raise ValueError(f"{source}: d2t maps draft ids outside the vocabulary of {size}")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{source}: d2t maps two draft ids to one target id")
    marked = t2d.astype(bool)
    if not marked[ids].all() or int(marked.sum()) != ids.size:
        raise ValueError(
            f"{source}: t2d marks {int(marked.sum())} target ids, not the {ids.size} d2t maps to"
        )
    return ids.astype(np.int32)


def load_published_eagle3(
    path: str | Path, target: tuple[int, int, int] | None = None
) -> tuple[Eagle3Head, np.ndarray]:
    """Read an EAGLE-3 head directory (published or converted), checked against ``target``.

    Args:
        path: The directory.
        target: ``(vocab_size, hidden_size, num_layers)`` of the target, or ``None``.

    Returns:
        ``(head, draft vocabulary (K,) int32 target ids)``.

    Raises:
        ValueError: a missing or misshapen weight, maps that disagree, an unsupported
            config field, too few target layers, or an unreadable weight file (named).
        VocabularyMismatchError: the head was made for another hidden size or vocabulary.
    """
    path = Path(path)
    source = f"EAGLE-3 head {path}"
    raw = _config(path)
    if raw is None:
        raise ValueError(f"{source}: no readable {CONFIG_FILE}")
    file, weights = read_eagle_weights(path)
    where = f"{source} ({file.name})"
    config = _eagle3_config(raw, source, EMBED_KEY in weights)
    maps = {}
    for key in (D2T_KEY, T2D_KEY):
        if key not in weights:
            raise ValueError(f"{where}: missing {key}")
        maps[key] = np.array(weights.pop(key))
    k, v = config.draft_size, config.vocab_size
    if maps[D2T_KEY].shape != (k,) or maps[T2D_KEY].shape != (v,):
        raise ValueError(
            f"{where}: d2t has shape {maps[D2T_KEY].shape} and t2d {maps[T2D_KEY].shape}; "
            f"the config says draft vocabulary {k} and vocabulary {v}"
        )
    ids = draft_to_target(maps[D2T_KEY], maps[T2D_KEY], where)
    if target is not None:
        tv, td, layers = target
        if (v, config.target_hidden_size) != (tv, td):
            raise VocabularyMismatchError(
                f"{source} was made for vocabulary {v} and target hidden size "
                f"{config.target_hidden_size}; the target has vocabulary {tv} and hidden size {td}"
            )
        if not config.has_embedding and config.hidden_size != td:
            raise VocabularyMismatchError(
                f"{source} has width {config.hidden_size} and no embed_tokens; the target's "
                f"embedding has width {td}"
            )
        tap_layers(layers)
    head = Eagle3Head(config)
    load_exact_weights(head, weights, where)
    return head, ids
