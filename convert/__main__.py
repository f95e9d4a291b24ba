"""``python -m convert``: see :mod:`convert.cli`."""

import sys

import mlx_redrafter  # noqa: F401  (loads the fast BLAS before mlx.core)
from convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
