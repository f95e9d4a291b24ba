"""Shared fixtures. ``mlx_redrafter`` is imported first so MLX binds OpenBLAS."""

import sys
from pathlib import Path

import pytest

import mlx_redrafter  # noqa: F401  (must precede mlx.core)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny llama + byte-level tokenizer saved as an mlx-lm model directory."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1)
