"""``python -m convert hf``: a Hugging Face model (Hub repo or local directory) to MLX.

A thin front end to ``mlx_lm.convert``: the conversion, dtype casting and quantization are
mlx-lm's. What this adds is a one-line error when the Hub cannot be reached (or the repo
does not exist) instead of a traceback.
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import sys
from pathlib import Path

from mlx_redrafter.hub import HUB_ERRORS, hub_error_message

#: Exit code for bad input (as :mod:`convert.cli` uses).
EXIT_ERROR = 2
DTYPE_CHOICES = ("float16", "bfloat16", "float32")


def convert_hf(
    repo_or_dir: str,
    out_dir: str | Path,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
) -> Path:
    """Convert ``repo_or_dir`` to an MLX model directory ``out_dir`` with ``mlx_lm.convert``.

    Args:
        repo_or_dir: Hub repo id or local Hugging Face model directory.
        out_dir: Output directory (must not exist; mlx-lm refuses to overwrite).
        quantize: Quantize the weights (``q_bits`` bits, groups of ``q_group_size``).
        q_bits: Bits per quantized weight.
        q_group_size: Quantization group size.
        dtype: ``float16`` / ``bfloat16`` / ``float32`` (default: the checkpoint's).
    """
    from mlx_lm.convert import convert

    convert(
        hf_path=repo_or_dir,
        mlx_path=str(out_dir),
        quantize=quantize,
        q_group_size=q_group_size,
        q_bits=q_bits,
        dtype=dtype,
    )
    return Path(out_dir)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``hf`` sub-command (its handler is ``run``, also set as ``handler``)."""
    parser = subparsers.add_parser(
        "hf",
        help="convert a Hugging Face model to MLX (via mlx_lm.convert)",
        description="Convert a Hugging Face model (Hub repo or local directory) to MLX with mlx_lm.convert.",
    )
    parser.add_argument("repo_or_dir", help="Hub repo id or local model directory")
    parser.add_argument("out_dir", help="output directory (must not exist)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, default=4, help="bits per weight (default 4)")
    parser.add_argument(
        "--q-group-size", type=int, default=64, help="quantization group size (default 64)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="dtype (default: the checkpoint's)"
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the ``hf`` sub-command; one ``error:`` line on stderr and 2 on failure
    (the exit code of :mod:`convert.cli` for bad input)."""
    try:
        out = convert_hf(
            args.repo_or_dir,
            args.out_dir,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            dtype=args.dtype,
        )
    except HUB_ERRORS as e:
        print(f"error: {hub_error_message(args.repo_or_dir, e)}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote MLX model to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m convert.hf ...``)."""
    parser = argparse.ArgumentParser(prog="python -m convert.hf")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["hf", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
