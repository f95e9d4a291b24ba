"""``python -m mlx_redrafter.train fit``: train a draft head by self-distillation.

The command line: :func:`add_parser` registers the flags, :func:`options_from_args` turns
them into :class:`~mlx_redrafter.train.fit_options.FitOptions`, :func:`run` reads the
distilled data (:mod:`mlx_redrafter.train.fit_data`), loads the target and runs the
trainer of ``--head`` (:func:`trainer_class`: :class:`~mlx_redrafter.train.trainer.Trainer`
for ReDrafter, :class:`~mlx_redrafter.train.parallel_fit.ParallelTrainer` for a parallel
head). Bad input is one ``error:`` line on stderr and exit code 2.

Output directory: the head (``config.json`` + ``model.safetensors``, loadable by
:func:`~mlx_redrafter.drafters.redrafter.load_drafter`), ``training.json`` (options, data
and vocabulary statistics, loss history, held-out metrics, throughput) and
``checkpoint/`` (:mod:`mlx_redrafter.train.checkpoint`).
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import sys
from pathlib import Path

from mlx_redrafter._blas import set_blas_threads
from mlx_redrafter.train.features import DISTILLED_DIR, FEATURE_DTYPES
from mlx_redrafter.train.fit_data import read_distilled
from mlx_redrafter.train.fit_options import (
    HEADS,
    SCHEDULES,
    STREAMED_SHUFFLE_POOL,
    FitOptions,
)
from mlx_redrafter.train.parallel_fit import ParallelTrainer
from mlx_redrafter.train.trainer import Trainer
from mlx_redrafter.train.vocab import OOV_MODES

EXIT_ERROR = 2


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``fit`` sub-command (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "fit",
        help="train a ReDrafter head on distilled data",
        description="Train a ReDrafter draft head on a frozen target by self-distillation.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="target model (default: the one recorded in DATA_DIR, else the embedded model)",
    )
    p.add_argument("--dtype", default=None, help="target dtype (default: as loaded)")
    p.add_argument("--data", required=True, help="distilled data directory (from `distill`)")
    p.add_argument("--heldout-fraction", type=float, default=0.02, help="share of prompts held out")
    p.add_argument("--out", required=True, help="output head directory")
    head = p.add_argument_group("head")
    head.add_argument(
        "--head",
        choices=HEADS,
        default="redrafter",
        help="recurrent ReDrafter head, or a parallel (ParallelSpec) head drafting k tokens "
        "in one pass",
    )
    head.add_argument("--k", type=int, default=None, help="tokens drafted (sets --beam-length K+1)")
    head.add_argument(
        "--context", type=int, default=4, help="parallel head: hidden states read (C)"
    )
    head.add_argument(
        "--init-head",
        default=None,
        metavar="DIR",
        help="start from this saved head (same kind and target): fine-tune it on new data; "
        "its architecture and draft vocabulary are kept",
    )
    head.add_argument("--num-draft-layers", type=int, default=2)
    head.add_argument("--rnn", action=argparse.BooleanOptionalAction, default=True)
    head.add_argument("--exit-dim", type=int, default=None, help="default: 2 * hidden size")
    vocab = head.add_mutually_exclusive_group()
    vocab.add_argument("--draft-vocab", type=int, default=None, metavar="K")
    vocab.add_argument("--draft-coverage", type=float, default=None, metavar="SHARE")
    head.add_argument(
        "--soft-targets",
        type=float,
        default=0.0,
        metavar="A",
        help="weight of the target's own distribution next to its token (0: tokens only)",
    )
    head.add_argument(
        "--oov",
        choices=OOV_MODES,
        default="mask",
        help="targets outside the draft vocabulary: leave out of the loss, or a catch-all slot",
    )
    head.add_argument("--beam-length", type=int, default=5, help="L: g0 + L-1 drafted tokens")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--batch-size", type=int, default=256, help="positions per micro-batch")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--warmup", type=float, default=0.1, help="share of steps")
    opt.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--dropout", type=float, default=0.0)
    opt.add_argument("--clip-grad", type=float, default=1.0, help="0 = no clipping")
    opt.add_argument("--max-seq-len", type=int, default=2048)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument(
        "--shuffle-pool",
        type=int,
        default=0,
        help="extraction groups shuffled together (0: all when the features are stored, "
        f"i.e. an i.i.d. epoch; {STREAMED_SHUFFLE_POOL} when streamed)",
    )
    run_group = p.add_argument_group("run")
    run_group.add_argument("--eval-every", type=int, default=0, help="steps (0: each epoch)")
    run_group.add_argument("--eval-beams", type=_int_list, default=[], help="e.g. 2,4")
    run_group.add_argument("--eval-positions", type=int, default=0, help="cap (0: all)")
    run_group.add_argument("--checkpoint-every", type=int, default=500)
    run_group.add_argument("--resume", action="store_true")
    cache = run_group.add_mutually_exclusive_group()
    cache.add_argument(
        "--feature-cache",
        default=None,
        metavar="DIR",
        help="cache hidden states on disk, reused across epochs and runs "
        "(default: OUT/features when --epochs > 1)",
    )
    cache.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="recompute hidden states every epoch",
    )
    run_group.add_argument("--feature-dtype", choices=list(FEATURE_DTYPES), default="float16")
    run_group.add_argument("--extract-tokens", type=int, default=4096)
    run_group.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"])
    run_group.add_argument(
        "--blas-threads", type=int, default=0, help="OpenBLAS threads (0: library default)"
    )
    run_group.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run, save_dtype="float32")
    return p


def options_from_args(args: argparse.Namespace) -> FitOptions:
    """:class:`FitOptions` from parsed arguments."""
    names = FitOptions.__dataclass_fields__
    options = FitOptions(**{k: v for k, v in vars(args).items() if k in names})
    if args.no_feature_cache:
        options.feature_cache = None
    elif options.feature_cache is None and options.epochs > 1:
        options.feature_cache = str(Path(options.out) / "features")
    return options


def trainer_class(options: FitOptions) -> type[Trainer]:
    """The trainer of ``options.head``."""
    if options.head == "parallel":
        return ParallelTrainer
    return Trainer


def run(args: argparse.Namespace) -> int:
    """Run ``fit``; one ``error:`` line on stderr and exit code 2 on bad input."""
    from mlx_redrafter.models import ModelLoadError, load

    try:
        options = options_from_args(args)
        options.check()
        set_blas_threads(args.blas_threads)
        data = read_distilled(args.data, args.heldout_fraction)
        stored = Path(args.data) / DISTILLED_DIR
        if (stored / "meta.json").is_file():
            options.distilled_features = str(stored)
        model, _ = load(args.model or data.model, dtype=args.dtype)
        model.freeze()
        trainer = trainer_class(options)(
            model, data.train, data.heldout, options, progress=not args.quiet
        )
    except (ValueError, OSError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    result = trainer.fit()
    out = trainer.write_outputs(result)
    if result.final_eval is not None:
        print(f"held-out: {result.final_eval.summary()}")
    print(
        f"trained {trainer.state.step} steps at {result.throughput['positions_per_s']:.0f} "
        f"positions/s; wrote head to {out}"
    )
    return 0
