"""Reading the weight files of draft-head checkpoints.

``*.safetensors`` files are read with MLX; a truncated or corrupt one is a ``ValueError``
naming the file (MLX's own error is a ``RuntimeError`` about data offsets). PyTorch pickles
(``pytorch_model.bin``, ``model.pt``, ``*.pt``) are read only when torch is installed (the
``torch`` extra); without it the error names the extra.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

TORCH_HINT = "pip install 'mlx-redrafter[torch]'"


class MissingTorchError(RuntimeError, ValueError):
    """A PyTorch checkpoint was given but torch is not installed (bad input: a
    ``ValueError`` too, so CLIs print it as one line)."""


def load_safetensors(file: str | Path) -> dict[str, mx.array]:
    """All tensors of one safetensors file.

    Raises:
        ValueError: the file is missing, truncated or not a safetensors file (names it).
    """
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"weights file {file} does not exist")
    try:
        return dict(mx.load(str(file), format="safetensors"))
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot read weights file {file} (truncated or corrupt?): {reason}"
        ) from e


def _from_torch(tensor: object) -> mx.array:
    """A CPU torch tensor as an MLX array of the same dtype (bfloat16 through float32)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.numpy())


def load_torch_tensors(file: Path) -> dict[str, mx.array]:
    """Tensors of a ``torch.save``-d state dict (``{"state_dict": ...}`` accepted too).

    Raises:
        MissingTorchError: torch is not installed (names the ``torch`` extra).
        ValueError: the file is not a readable state dict (names it).
    """
    file = Path(file)
    try:
        import torch
    except ImportError as e:
        raise MissingTorchError(
            f"{file.name} is a PyTorch checkpoint and reading it needs torch: {TORCH_HINT} "
            "(or save the weights as model.safetensors)"
        ) from e
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged pickle
        raise ValueError(f"cannot read PyTorch checkpoint {file}: {type(e).__name__}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{file.name} does not hold a state dict")
    return {str(k): _from_torch(v) for k, v in state.items()}


def load_weights_file(file: str | Path) -> dict[str, mx.array]:
    """Tensors of a safetensors file or (``.bin`` / ``.pt``) a PyTorch state dict."""
    file = Path(file)
    if file.suffix == ".safetensors":
        return load_safetensors(file)
    return load_torch_tensors(file)


def load_exact_weights(module: nn.Module, weights: dict[str, mx.array], where: str) -> None:
    """Load ``weights`` into ``module`` when their names and shapes are exactly the
    module's parameters; else one ``ValueError`` naming ``where`` and the mismatch."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ValueError(f"{where}: missing weights {missing}, unexpected {unknown}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{where}: {key} has shape {value.shape}, expected {expected[key].shape}"
            )
    module.load_weights(list(weights.items()))
    module.eval()
