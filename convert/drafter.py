"""``python -m convert drafter``: trained ReDrafter heads between Apple / TensorRT-LLM and MLX,
and published EAGLE-1/2 heads (SafeAILab's layout, a local directory or a Hub repo id) to
MLX feature-level head directories (:mod:`mlx_redrafter.drafters.published`).

Reads a drafter directory in Apple's PyTorch layout (``config.json`` with
``model_type: "recurrent_drafting_drafter"`` plus ``model.safetensors``, or ``model.pt`` /
``pytorch_model.bin`` through torch), TensorRT-LLM's key variants (``lm_heads.*``,
``input_projs.*``, or keys prefixed with ``0.``) or an MLX drafter directory; validates the
tensors against the config (and the target model with ``--model``) and writes an MLX
drafter directory, or with ``--to apple`` the Apple layout (same config keys and weight
names, ``model.safetensors`` with ``format: pt`` metadata).
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.checkpoint_files import (  # noqa: F401  (re-exported)
    TORCH_HINT,
    MissingTorchError,
    load_safetensors,
    load_torch_tensors,
)
from mlx_redrafter.drafters.eagle_head import save_head
from mlx_redrafter.drafters.medusa import load_medusa
from mlx_redrafter.drafters.published import (
    is_eagle3_dir,
    load_published_eagle,
    load_published_eagle3,
    looks_like_repo_id,
    published_kind,
    resolve_head,
)
from mlx_redrafter.drafters.redrafter import (
    CONFIG_FILE,
    DTYPES,
    WEIGHTS_FILE,
    check_dims,
    head_from_weights,
    read_config,
    save_drafter,
)

#: Exit code for bad input (as :mod:`convert.cli` uses).
EXIT_ERROR = 2
TORCH_FILES = ("model.pt", "pytorch_model.bin")
#: TensorRT-LLM spellings of Apple's module names.
KEY_ALIASES = {"lm_heads.": "lm_head.", "input_projs.": "input_proj."}


def read_checkpoint_tensors(path: Path) -> dict[str, mx.array]:
    """All tensors of a drafter directory: ``*.safetensors`` (merged), else a torch file."""
    files = [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else []
    files = files or sorted(path.glob("*.safetensors"))
    if files:
        tensors: dict[str, mx.array] = {}
        for file in files:
            tensors.update(load_safetensors(file))
        return tensors
    for name in TORCH_FILES:
        if (path / name).is_file():
            return load_torch_tensors(path / name)
    raise ValueError(
        f"no drafter weights in {path}: expected {WEIGHTS_FILE} or one of {', '.join(TORCH_FILES)}"
    )


def normalize_key(key: str) -> str:
    """Apple's name for a checkpoint key written by Apple, TensorRT-LLM or with a ``0.`` prefix.

    ``lm_heads.*`` -> ``lm_head.*``, ``input_projs.*`` -> ``input_proj.*``; a leading
    ``0.`` is dropped, and ``0.{i}.*`` (the head's ``Sequential`` saved on its own) becomes
    ``lm_head.{i}.*``.
    """
    if key.startswith("0."):
        rest = key[2:]
        key = f"lm_head.{rest}" if rest[:1].isdigit() else rest
    for alias, name in KEY_ALIASES.items():
        if key.startswith(alias):
            return name + key[len(alias) :]
    return key


def normalize_keys(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """:func:`normalize_key` on every key; two keys mapping to one name is an error."""
    out: dict[str, mx.array] = {}
    for key, value in tensors.items():
        name = normalize_key(key)
        if name in out:
            raise ValueError(f"drafter weights: '{key}' and another key both map to '{name}'")
        out[name] = value
    return out


def target_dims(model_dir: Path, layers: bool = False) -> tuple[int, ...]:
    """``(vocab_size, hidden_size)`` of a target model directory, from its ``config.json``
    (and ``num_hidden_layers`` third when ``layers``)."""
    file = Path(model_dir) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"--model: no {CONFIG_FILE} in {model_dir}")
    raw = json.loads(file.read_text())
    text = raw.get("text_config", {})
    dims = []
    keys = ("vocab_size", "hidden_size", "num_hidden_layers")[: 3 if layers else 2]
    for key in keys:
        value = raw.get(key, text.get(key))
        if not isinstance(value, int):
            raise ValueError(f"--model: {file} has no integer '{key}'")
        dims.append(value)
    return tuple(dims)


def convert_drafter(
    in_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    model_dir: str | Path | None = None,
    to: str = "mlx",
) -> Path:
    """Convert one drafter directory.

    Args:
        in_dir: Apple / TensorRT-LLM / MLX drafter directory.
        out_dir: Output directory.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the output (default: as stored).
        model_dir: Target model directory to check ``vocab_size`` and ``hidden_size`` against.
        to: ``"mlx"`` or ``"apple"``.

    Raises:
        ValueError: naming the key or dimension that is missing or does not fit.
        MissingTorchError: a torch checkpoint without torch installed.
    """
    if not Path(in_dir).is_dir() and looks_like_repo_id(str(in_dir)):
        in_dir = resolve_head(str(in_dir))
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise ValueError(f"drafter directory {in_dir} does not exist")
    if to not in ("mlx", "apple"):
        raise ValueError(f"--to must be 'mlx' or 'apple', got {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    published = published_kind(in_dir)
    if published == "eagle":
        if to != "mlx":
            raise ValueError("an EAGLE head converts to the MLX layout only (--to mlx)")
        target = None if model_dir is None else target_dims(Path(model_dir))
        head = load_published_eagle(in_dir, target)
        save_head(out_dir, head, dtype=None if dtype is None else DTYPES[dtype])
        return Path(out_dir)
    if published == "eagle3" or is_eagle3_dir(in_dir):
        if to != "mlx":
            raise ValueError("an EAGLE-3 head converts to the MLX layout only (--to mlx)")
        target = None if model_dir is None else target_dims(Path(model_dir), layers=True)
        return save_eagle3(in_dir, out_dir, dtype, target)
    if published == "medusa":
        if to != "mlx":
            raise ValueError("a Medusa head converts to the MLX layout only (--to mlx)")
        target = None if model_dir is None else target_dims(Path(model_dir))
        return save_medusa(load_medusa(in_dir, target), in_dir, out_dir, dtype)
    config = read_config(in_dir)
    head = head_from_weights(config, normalize_keys(read_checkpoint_tensors(in_dir)))
    if model_dir is not None:
        check_dims(config, *target_dims(Path(model_dir)))
    if to == "apple" and config.draft_vocab_size is not None:
        raise ValueError(
            f"the Apple layout has no reduced draft vocabulary (draft_vocab_size "
            f"{config.draft_vocab_size}); its last layer must have vocab_size rows"
        )
    if dtype is not None and "torch_dtype" in config.extra:
        config.extra["torch_dtype"] = dtype
    return save_drafter(
        head,
        out_dir,
        dtype=None if dtype is None else DTYPES[dtype],
        metadata_format="pt" if to == "apple" else "mlx",
    )


def save_eagle3(
    in_dir: Path, out_dir: str | Path, dtype: str | None, target: tuple[int, ...] | None
) -> Path:
    """Check an EAGLE-3 head (against ``target`` ``(V, d, L)`` when given) and write it as
    ``config.json`` (the source's plus ``"draft_kind": "eagle3"``) + ``model.safetensors``
    (the published names, ``d2t`` / ``t2d`` kept; floats cast to ``dtype`` when given)."""
    from mlx.utils import tree_flatten

    from mlx_redrafter.drafters.eagle3_head import DRAFT_KIND
    from mlx_redrafter.drafters.published import D2T_KEY, T2D_KEY

    head, ids = load_published_eagle3(in_dir, target)  # every check, d2t against t2d too
    weights = dict(tree_flatten(head.parameters()))
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    # the maps, rebuilt from the checked ids: d2t = id - draft id, t2d marks the ids
    weights[D2T_KEY] = mx.array(ids.astype(np.int64) - np.arange(ids.size, dtype=np.int64))
    t2d = np.zeros(head.config.vocab_size, dtype=bool)
    t2d[ids] = True
    weights[T2D_KEY] = mx.array(t2d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / WEIGHTS_FILE), weights, {"format": "mlx"})
    config = json.loads((in_dir / CONFIG_FILE).read_text()) | {"draft_kind": DRAFT_KIND}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_medusa(heads, in_dir: Path, out_dir: str | Path, dtype: str | None) -> Path:
    """Write Medusa heads as ``config.json`` (the source's) + ``medusa_lm_head.safetensors``
    (the published names; from a ``.pt`` file too), cast to ``dtype`` when given."""
    from mlx.utils import tree_flatten

    from mlx_redrafter.drafters.medusa import file_key

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = heads.config.num_layers
    weights = {file_key(k).format(n=n): v for k, v in tree_flatten(heads.parameters())}
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    mx.save_safetensors(str(out / "medusa_lm_head.safetensors"), weights, {"format": "pt"})
    (out / CONFIG_FILE).write_text((in_dir / CONFIG_FILE).read_text())
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``drafter`` sub-command (its handler is ``run``, also set as ``handler``)."""
    parser = subparsers.add_parser(
        "drafter",
        help="convert a trained ReDrafter head (Apple / TensorRT-LLM <-> MLX) or a published "
        "EAGLE-1/2 / EAGLE-3 head to MLX",
        description=(
            "Convert a trained ReDrafter head: Apple / TensorRT-LLM checkpoints to an MLX "
            "drafter directory, or (--to apple) back to Apple's layout; or a published "
            "EAGLE-1/2 or EAGLE-3 head (SafeAILab layout) to an MLX feature-level head directory."
        ),
    )
    parser.add_argument(
        "in_dir", help="drafter directory (config.json + weights) or Hugging Face repo id"
    )
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="output dtype (default: as stored)"
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="TARGET_DIR",
        help="target model directory; check vocab_size and hidden_size against it",
    )
    parser.add_argument(
        "--to",
        choices=["mlx", "apple"],
        default="mlx",
        help="output layout: MLX drafter (default) or Apple's PyTorch layout",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the ``drafter`` sub-command; one ``error:`` line on stderr and 2 on failure
    (the exit code of :mod:`convert.cli` for bad input)."""
    try:
        out = convert_drafter(
            args.in_dir, args.out_dir, dtype=args.dtype, model_dir=args.model, to=args.to
        )
    except (ValueError, OSError, MissingTorchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {args.to} drafter to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m convert.drafter ...``)."""
    parser = argparse.ArgumentParser(prog="python -m convert.drafter")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["drafter", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
