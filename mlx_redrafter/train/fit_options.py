"""The options of ``python -m mlx_redrafter.train fit`` (:class:`FitOptions`, checked as a
whole by :meth:`FitOptions.check`) and the learning-rate schedule they describe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.optimizers as optim

from mlx_redrafter.train.features import FEATURE_DTYPES
from mlx_redrafter.train.vocab import OOV_MODES

SCHEDULES = ("cosine", "linear", "constant")
#: Kinds of draft head ``fit`` trains (``--head``).
HEADS = ("redrafter", "parallel")
#: Shuffle window (extraction groups) of streamed features under ``--shuffle-pool 0``.
STREAMED_SHUFFLE_POOL = 8
#: Options that must match between a checkpoint and the run resuming it.
RESUME_KEYS = (
    "head",
    "context",
    "num_draft_layers",
    "rnn",
    "exit_dim",
    "draft_vocab",
    "draft_coverage",
    "oov",
    "soft_targets",
    "beam_length",
    "epochs",
    "lr",
    "batch_size",
    "grad_accum",
    "warmup",
    "schedule",
    "weight_decay",
    "dropout",
    "max_seq_len",
    "seed",
    "clip_grad",
    "shuffle_pool",
    "extract_tokens",
    "feature_dtype",
    "init_head",
)

#: Architecture options a ``--init-head`` checkpoint fixes: option name -> config field.
ARCHITECTURE_OPTIONS = {
    "num_draft_layers": "num_draft_layers",
    "rnn": "rnn",
    "exit_dim": "exit_dim",
}


@dataclass
class FitOptions:
    """Training options (the CLI flags; their meaning: :func:`mlx_redrafter.train.fit.add_parser`)."""

    out: str
    num_draft_layers: int = 2
    rnn: bool = True
    exit_dim: int | None = None
    draft_vocab: int | None = None
    draft_coverage: float | None = None
    oov: str = "mask"
    soft_targets: float = 0.0
    beam_length: int = 5
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 256
    grad_accum: int = 1
    warmup: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    dropout: float = 0.0
    clip_grad: float = 1.0
    max_seq_len: int = 2048
    seed: int = 0
    eval_every: int = 0
    eval_beams: list[int] = field(default_factory=list)
    eval_positions: int = 0
    checkpoint_every: int = 500
    resume: bool = False
    feature_cache: str | None = None
    feature_dtype: str = "float16"
    #: Groups shuffled together; 0 = all when features are stored, else 8.
    shuffle_pool: int = 0
    extract_tokens: int = 4096
    save_dtype: str = "float32"
    head: str = "redrafter"
    k: int | None = None
    context: int = 4
    init_head: str | None = None
    #: Hidden states stored by ``distill --save-features`` (set from ``--data``).
    distilled_features: str | None = None

    def __post_init__(self) -> None:
        if self.k is not None:
            self.beam_length = self.k + 1

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        if self.head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}")
        if self.k is not None and self.k < 1:
            raise ValueError("--k must be >= 1")
        if self.context < 1:
            raise ValueError("--context must be >= 1")
        if self.head == "parallel" and self.soft_targets > 0:
            raise ValueError("--soft-targets is implemented for --head redrafter only")
        positive = ("num_draft_layers", "epochs", "batch_size", "grad_accum", "max_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.beam_length < 2:
            raise ValueError("--beam-length must be >= 2")
        if self.shuffle_pool < 0:
            raise ValueError("--shuffle-pool must be >= 0 (0: all groups when stored)")
        if self.draft_vocab is not None and self.draft_coverage is not None:
            raise ValueError("give at most one of --draft-vocab and --draft-coverage")
        if self.init_head is not None and (
            self.draft_vocab is not None or self.draft_coverage is not None
        ):
            raise ValueError(
                "--init-head fixes the draft vocabulary: drop --draft-vocab / --draft-coverage"
            )
        if self.draft_coverage is not None and not 0.0 < self.draft_coverage <= 1.0:
            raise ValueError("--draft-coverage must be in (0, 1]")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError("--warmup must be in [0, 1)")
        if not 0.0 <= self.soft_targets <= 1.0:
            raise ValueError("--soft-targets must be in [0, 1]")
        if self.soft_targets > 0 and self.oov != "mask":
            raise ValueError("--soft-targets needs --oov mask (no catch-all slot)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("--dropout must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.oov not in OOV_MODES:
            raise ValueError(f"--oov must be one of {', '.join(OOV_MODES)}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}")


def learning_rate_schedule(options: FitOptions, total_steps: int) -> Any:
    """Linear warm-up over ``warmup * total_steps`` steps, then the decay ``schedule``."""
    warm = int(round(options.warmup * total_steps))
    rest = max(1, total_steps - warm)
    if options.schedule == "cosine":
        decay = optim.cosine_decay(options.lr, rest)
    elif options.schedule == "linear":
        decay = optim.linear_schedule(options.lr, 0.0, rest)
    else:
        decay = optim.linear_schedule(options.lr, options.lr, 1)
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, options.lr, warm), decay], [warm])
