"""The ``python -m mlx_redrafter.generate`` command: argument handling and output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

SHIPPED_HEADS = Path(__file__).parent / "heads"
DEFAULT_HEAD = SHIPPED_HEADS / "smollm2-135m-instruct"
DEFAULT_SHAPE = (1, 4)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def read_prompt(prompt: str) -> str:
    """``-`` reads the prompt from standard input."""
    return sys.stdin.read() if prompt == "-" else prompt


def format_prompt(tokenizer, prompt: str, ignore_chat_template: bool) -> list[int] | str:
    """Apply the chat template (when the tokenizer has one) unless told not to."""
    if ignore_chat_template or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def resolve_drafter(spec: str, model_arg: str | None, model, acceptance: str = "exact"):
    """Load the drafter named by ``--drafter`` (``none``, ``default`` or a directory)."""
    if spec == "none":
        return None
    if spec == "default":
        if model_arg is not None or not DEFAULT_HEAD.is_dir():
            if model_arg is not None:
                print(
                    "note: no draft head given for this model; decoding autoregressively "
                    "(pass --drafter DIR)",
                    file=sys.stderr,
                )
            return None
        spec = str(DEFAULT_HEAD)
    from mlx_redrafter.drafters import load_drafter

    path = Path(spec).expanduser()
    if not path.exists():
        raise CLIError(f"drafter not found: {path}")
    return load_drafter(path, model, keep_logprobs=acceptance != "exact")


def beam_shape(args: argparse.Namespace) -> tuple[int, int]:
    """``(W, L)`` from the flags, else the device profile, else the built-in default."""
    from mlx_redrafter.profile import tuned_shape

    width, length = tuned_shape() or DEFAULT_SHAPE
    return args.beam_width or width, args.beam_length or length


def run_generate(args: argparse.Namespace) -> int:
    """Run the generate CLI; returns the process exit status."""
    from mlx_redrafter.engine import print_stats, stream_generate
    from mlx_redrafter.models import ModelLoadError, load

    try:
        if args.seed is not None:
            mx.random.seed(args.seed)
        model, tokenizer = load(args.model, dtype=args.dtype)
        drafter = resolve_drafter(args.drafter, args.model, model, args.acceptance)
        width, length = beam_shape(args)
        prompt = format_prompt(tokenizer, read_prompt(args.prompt), args.ignore_chat_template)
        response = None
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            drafter=drafter,
            beam_width=width,
            beam_length=length,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            acceptance=args.acceptance,
        ):
            print(response.text, end="", flush=True)
        print()
        if response is not None:
            print_stats(response, speculative=drafter is not None)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
