"""``python -m mlx_redrafter.generate``: generate text (speculative by default).

The functions users call from Python are re-exported here with mlx-lm's names
(:func:`generate`, :func:`stream_generate`); the loop itself lives in
:mod:`mlx_redrafter.engine`.

Importing this module rebinds the package attribute ``mlx_redrafter.generate`` from the
function to the module (Python's import system does that for every submodule), so the
module is made callable as :func:`mlx_redrafter.engine.generate`: ``from mlx_redrafter
import generate; generate(model, tokenizer, prompt)`` works whichever was imported first.
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any

from mlx_redrafter.cli import add_drafter_kind_arguments, add_medusa_choices_argument
from mlx_redrafter.engine import GenerationResponse, StepStats, generate, stream_generate

__all__ = [
    "GenerationResponse",
    "StepStats",
    "add_decoding_arguments",
    "build_parser",
    "generate",
    "main",
    "stream_generate",
]


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """Model, sampling, drafter and beam-shape flags (shared with ``chat`` and ``server``)."""
    p.add_argument(
        "--model",
        default=None,
        help="mlx-lm model dir, .gguf file or hub repo (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument(
        "--drafter",
        default=None,
        help="draft head dir, 'default' (shipped head for the default model) or 'none' (AR)",
    )
    add_drafter_kind_arguments(p)
    p.add_argument("--beam-width", type=int, default=None)
    p.add_argument("--beam-length", type=int, default=None)
    p.add_argument(
        "--tree-nodes",
        type=int,
        default=None,
        help="EAGLE heads: draft a dynamic tree of N nodes, --beam-width children per node",
    )
    p.add_argument(
        "--draft-top-k",
        type=int,
        default=None,
        metavar="K",
        help="ReDrafter heads: beam search renormalises the head's logits over their top K "
        "(Apple's warp_logits; 50 reproduces Apple's beams for a converted Apple head). "
        "Default: off (full log-softmax)",
    )
    add_medusa_choices_argument(p)
    p.add_argument("--acceptance", choices=["exact", "redrafter"], default="exact")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mlx_redrafter.generate`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.generate",
        description="Generate text with lossless speculative decoding (ReDrafter).",
    )
    add_decoding_arguments(p)
    p.add_argument(
        "--prompt", default="What is the capital of France?", help="prompt text, or - for stdin"
    )
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--verbose", action="store_true", help="also print the per-token stream details")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    from mlx_redrafter.cli import run_generate

    return run_generate(args)


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`mlx_redrafter.engine.generate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
