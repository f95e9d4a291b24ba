"""Conversion CLI: ``python -m convert gguf|drafter|hf`` (see ``convert/cli.py``)."""

import mlx_redrafter  # noqa: F401  (first: loads OpenBLAS before mlx.core on Linux)
