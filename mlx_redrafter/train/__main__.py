"""``python -m mlx_redrafter.train {distill,fit,evaluate} ...``: the draft-head training commands.

``distill`` (:mod:`mlx_redrafter.train.distill`) generates self-distillation data with the
target; ``fit`` (:mod:`mlx_redrafter.train.fit`) trains a head on it; ``evaluate``
(:mod:`mlx_redrafter.train.score`) scores a head on distilled evaluation prompts; ``pack`` and
``unpack`` (:mod:`mlx_redrafter.train.pack`) store a data directory without its prompt ids
and rebuild it from the prompts file. Each sub-command's
module is imported only when the parser is built, and a ``fit`` that cannot be imported
leaves ``distill`` working (``fit`` then reports why it is unavailable).
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import importlib
import sys
from functools import partial

EXIT_ERROR = 2
#: sub-command -> module of :mod:`mlx_redrafter.train` that implements it
COMMANDS = {
    "distill": "distill",
    "features": "sequence_features",
    "fit": "fit",
    "fit-eagle": "eagle_fit",
    "evaluate": "score",
    "pack": "pack",
    "unpack": "unpack",
}


def _unavailable(name: str, reason: str, args: argparse.Namespace) -> int:
    """Handler of a sub-command whose module failed to import: say why, exit 2."""
    print(f"error: '{name}' is unavailable: {reason}", file=sys.stderr)
    return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command that imports."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.train", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}"
    )
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"mlx_redrafter.train.{module_name}")
            module.add_parser(sub)
        except Exception as e:  # a broken or missing sub-command must not hide the others
            stub = sub.add_parser(name, help=f"(unavailable: {type(e).__name__})", add_help=False)
            reason = f"{type(e).__name__}: {e}"
            stub.set_defaults(handler=partial(_unavailable, name, reason), any_arguments=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
