"""``python -m mlx_redrafter.train unpack``: rebuild a data directory from a packed one.

The format and the work are in :mod:`mlx_redrafter.train.pack`; this module only registers
the sub-command.
"""

from __future__ import annotations

from mlx_redrafter.train.pack import add_unpack_parser as add_parser
from mlx_redrafter.train.pack import run_unpack

__all__ = ["add_parser", "run_unpack"]
