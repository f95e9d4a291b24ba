"""Command-line dispatcher: ``python -m convert {gguf,drafter,hf} ...``.

Each subcommand lives in a module exposing ``add_parser(subparsers)`` (registers its
``argparse`` sub-parser) and ``run(args) -> int | None``. Modules are imported lazily and
those not present are skipped, so one missing converter never breaks the others.

Library code raises :class:`convert.gguf.ConversionError` (a ``ValueError``); the dispatcher
prints it as one ``error: ...`` line on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

SUBCOMMAND_MODULES = ("convert.gguf", "convert.drafter", "convert.hf")
EXIT_USAGE = 2


def _load_module(name: str) -> ModuleType | None:
    """Import a subcommand module, or None when it does not exist (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def build_parser(module_names: Sequence[str] = SUBCOMMAND_MODULES) -> argparse.ArgumentParser:
    """Top-level parser with one sub-parser per available subcommand module.

    Each sub-parser gets ``run`` as its default ``func`` (``args.func(args)`` dispatches).
    """
    parser = argparse.ArgumentParser(
        prog="python -m convert", description="Convert models for mlx-redrafter."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in module_names:
        module = _load_module(name)
        if module is None:
            continue
        before = set(sub.choices)
        module.add_parser(sub)
        for added in set(sub.choices) - before:
            sub.choices[added].set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen subcommand and return the process exit code.

    ``ValueError`` (including ``ConversionError``) and ``OSError`` become ``error: ...`` on
    stderr with exit code 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
