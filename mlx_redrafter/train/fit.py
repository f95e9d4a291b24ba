"""``python -m mlx_redrafter.train fit``: train a ReDrafter head by self-distillation.

The frozen target's teacher-forced hidden states over distilled sequences (prompt +
the target's own response) feed the head, which learns to predict the following tokens
(:mod:`mlx_redrafter.train.objective` has the exact alignment). Training uses AdamW with
linear warm-up and a cosine (or constant / linear) decay, gradient accumulation and
gradient clipping; checkpoints (head, optimizer state, data position, loss history) are
written every ``--checkpoint-every`` steps and ``--resume`` continues from the latest one
on exactly the same loss curve.

Batches are sets of ``--batch-size`` training positions (not sequences): every kept
position ``t`` of every sequence is one row with its hidden state ``(d,)`` and its window
of ``L`` tokens. One micro-batch is one compiled graph computing all ``L - 1`` depths of
all its positions at once (the recurrent states are an ``L - 1`` step recurrence over
``(B, d)`` arrays). The order of positions within an epoch is a function of ``--seed``
and the epoch only: extraction groups are shuffled, and positions are shuffled within
windows of ``--shuffle-pool`` groups. By default (``0``) the window is the whole training
set, an i.i.d. epoch, whenever the hidden states are stored (a feature cache or the states
``distill --save-features`` wrote); streamed features (extracted on the fly, no store) use
windows of :data:`STREAMED_SHUFFLE_POOL` groups, as only a window's features are in memory.
Windows cost accuracy: inside each one the loss falls as the head learns the window's few
dozen sequences, and jumps back at the next.

Output directory: the head (``config.json`` + ``model.safetensors``, loadable by
:func:`~mlx_redrafter.drafters.redrafter.load_drafter`), ``training.json`` (options, data
and vocabulary statistics, loss history, held-out metrics, throughput) and
``checkpoint/``.
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from mlx_redrafter._blas import set_blas_threads
from mlx_redrafter.drafters.redrafter import (
    ReDrafterConfig,
    ReDrafterHead,
    embedding_dims,
    find_input_embedding,
    load_drafter,
    save_drafter,
)
from mlx_redrafter.train.batch_generate import split_model
from mlx_redrafter.train.evaluate import EvalResult, ahead_rows, evaluate
from mlx_redrafter.train.features import (
    DISTILLED_DIR,
    FEATURE_DTYPES,
    FeatureCache,
    FeatureSource,
    HiddenExtractor,
    StreamingFeatures,
    data_fingerprint,
    dense_features,
    extraction_groups,
    sequence_row_starts,
)
from mlx_redrafter.train.objective import (
    PAD,
    PositionTable,
    Sequence,
    build_position_table,
    draft_labels,
    loss_sums,
    soft_loss_sums,
    teacher_projection,
)
from mlx_redrafter.train.vocab import (
    OOV_MODES,
    DraftVocab,
    build_draft_vocab,
    coverage_of,
    response_token_counts,
)

EXIT_ERROR = 2
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
HEAD_DIR = "head"
REPORT_FILE = "training.json"
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
    """Training options (the CLI flags; see :func:`add_parser` for their meaning)."""

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


# ----------------------------------------------------------------------------- schedule


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


def epoch_batches(
    group_rows: list[np.ndarray], batch_size: int, pool: int, seed: int, epoch: int
) -> np.ndarray:
    """``(n_micro, B)`` table rows of every micro-batch of one epoch (``-1`` = padding).

    Groups are shuffled, then the positions of each window of ``pool`` consecutive
    groups are shuffled; the stream is cut into micro-batches of ``batch_size`` rows.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(group_rows))
    stream = []
    for lo in range(0, len(order), pool):
        rows = np.concatenate([group_rows[g] for g in order[lo : lo + pool]])
        stream.append(rng.permutation(rows))
    flat = np.concatenate(stream) if stream else np.zeros(0, np.int64)
    n_micro = max(1, -(-flat.size // batch_size))
    padded = np.full(n_micro * batch_size, -1, dtype=np.int64)
    padded[: flat.size] = flat
    return padded.reshape(n_micro, batch_size)


def rows_by_group(table: PositionTable, groups: list[np.ndarray], num_sequences: int) -> list:
    """Table rows ``(n_g,)`` of each extraction group."""
    starts = sequence_row_starts(table, num_sequences)
    return [
        np.concatenate([np.arange(starts[s], starts[s + 1]) for s in g] or [np.zeros(0, int)])
        for g in groups
    ]


# --------------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """Sequences, position tables and extraction groups of the training and held-out sets."""

    train_tokens: list[np.ndarray]
    heldout_tokens: list[np.ndarray]
    train_table: PositionTable
    heldout_table: PositionTable
    train_groups: list[np.ndarray]
    heldout_groups: list[np.ndarray]
    truncated: int

    def fingerprint(self) -> str:
        """Hash of the training tokens and positions (a checkpoint resumes only on these)."""
        return data_fingerprint(self.train_tokens, self.train_table)


def limit_positions(sequences: list[Sequence], length: int, cap: int) -> list[Sequence]:
    """The first sequences of ``sequences`` holding about ``cap`` positions (all if ``cap`` is 0)."""
    if cap <= 0:
        return sequences
    kept, total = [], 0
    for tokens, start in sequences:
        if total >= cap:
            break
        kept.append((tokens, start))
        total += max(0, len(tokens) - 2 - max(0, start - length))
    return kept


def prepare_data(
    train: list[Sequence], heldout: list[Sequence], options: FitOptions
) -> PreparedData:
    """Truncate sequences to ``max_seq_len`` and build tables and extraction groups."""
    length, cap = options.beam_length, options.max_seq_len
    heldout = limit_positions(heldout, length, options.eval_positions)
    train_tokens = [np.asarray(t, dtype=np.int32)[:cap] for t, _ in train]
    heldout_tokens = [np.asarray(t, dtype=np.int32)[:cap] for t, _ in heldout]
    return PreparedData(
        train_tokens=train_tokens,
        heldout_tokens=heldout_tokens,
        train_table=build_position_table(train, length, cap),
        heldout_table=build_position_table(heldout, length, cap),
        train_groups=extraction_groups([len(t) for t in train_tokens], options.extract_tokens),
        heldout_groups=extraction_groups([len(t) for t in heldout_tokens], options.extract_tokens),
        truncated=sum(max(0, len(t) - cap) for t, _ in train),
    )


def check_token_ids(data: PreparedData, vocab_size: int) -> None:
    """Raise ``ValueError`` if any token id is outside ``[0, vocab_size)``."""
    for name, sequences in (("training", data.train_tokens), ("held-out", data.heldout_tokens)):
        for tokens in sequences:
            if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
                raise ValueError(
                    f"{name} data holds token ids outside the target's vocabulary [0, {vocab_size})"
                )


def training_counts(train: list[Sequence], vocab_size: int, options: FitOptions) -> np.ndarray:
    """``(V,)`` counts of the training response tokens, truncated at ``--max-seq-len``."""
    cap = options.max_seq_len
    return response_token_counts(((t[:cap], s) for t, s in train), vocab_size)


def choose_vocab(
    train: list[Sequence], vocab_size: int, options: FitOptions
) -> tuple[DraftVocab | None, float]:
    """The reduced draft vocabulary (``None`` for the full one) and its training coverage."""
    counts = training_counts(train, vocab_size, options)
    if options.draft_vocab is None and options.draft_coverage is None:
        return None, 1.0
    vocab = build_draft_vocab(
        counts, size=options.draft_vocab, coverage=options.draft_coverage, oov=options.oov
    )
    return vocab, coverage_of(vocab.ids, counts)


# ------------------------------------------------------------------------------ trainer


@dataclass
class TrainState:
    """Where training stands (saved in every checkpoint).

    Attributes:
        step: Optimizer steps done.
        history: One ``{"step", "loss", "lr", "positions"}`` entry per step.
        evals: Held-out results ``{"step", "epoch", ...}``.
    """

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        head: The trained head.
        state: Final :class:`TrainState`.
        final_eval: Held-out metrics at the end (``None`` without held-out data).
        throughput: Timings (positions per second, extraction tokens per second, ...).
        finished: ``False`` when stopped early by ``stop_at_step``.
    """

    head: ReDrafterHead
    state: TrainState
    final_eval: EvalResult | None
    throughput: dict[str, float]
    finished: bool


def build_head(
    config_dims: tuple[int, int], options: FitOptions, vocab: DraftVocab | None
) -> ReDrafterHead:
    """A freshly initialised head for a target with ``(V, d)`` (seeded by ``options.seed``)."""
    v, d = config_dims
    config = ReDrafterConfig(
        vocab_size=v,
        hidden_size=d,
        exit_dim=options.exit_dim or 2 * d,
        num_draft_layers=options.num_draft_layers,
        rnn=options.rnn,
        draft_vocab_size=None if vocab is None else vocab.size,
    )
    mx.random.seed(options.seed)
    draft_vocab = None if vocab is None else mx.array(vocab.ids, dtype=mx.int32)
    head = ReDrafterHead(config, draft_vocab=draft_vocab)
    mx.eval(head.parameters())
    return head


def training_coverage(vocab: DraftVocab, train: list[Sequence], options: FitOptions) -> float:
    """Share of the (truncated) training response tokens inside ``vocab``."""
    return coverage_of(vocab.ids, training_counts(train, vocab.vocab_size, options))


class Trainer:
    """Trains one head against one frozen target.

    A new head starts from random weights, or from ``options.init_head`` (a saved head of
    the same kind for the same target: architecture and draft vocabulary come from it).

    Args:
        model: The target mlx-lm model (frozen).
        train: Training sequences ``(tokens (T,), response_start)``.
        heldout: Held-out sequences (may be empty).
        options: The :class:`FitOptions`.
        progress: Show progress bars.
    """

    #: The head class this trainer trains (an ``--init-head`` must be one).
    head_type: type = ReDrafterHead

    def __init__(
        self,
        model: nn.Module,
        train: list[Sequence],
        heldout: list[Sequence],
        options: FitOptions,
        progress: bool = True,
    ):
        options.check()
        self.options = options
        self.progress = progress
        self.out = Path(options.out)
        self.embedding = find_input_embedding(model)
        self.extractor = HiddenExtractor(model)
        # Before the data: a starting head fixes architecture options (parallel: k).
        initial = None if options.init_head is None else self._initial_head(Path(options.init_head))
        self.data = prepare_data(train, heldout, options)
        check_token_ids(self.data, embedding_dims(self.embedding)[0])
        self.data_hash = self.data.fingerprint()
        if self.data.train_table.size == 0:
            raise ValueError("no training positions: every response is empty or truncated")
        self.state = TrainState()
        resumed = self._resume_head() if options.resume else None
        if resumed is None and initial is not None:
            self.head, vocab = initial
            self.coverage = 1.0 if vocab is None else training_coverage(vocab, train, options)
        elif resumed is None:
            vocab, self.coverage = choose_vocab(train, embedding_dims(self.embedding)[0], options)
            self.head = self._new_head(vocab)
        else:
            self.head, vocab, self.coverage = resumed
        self.vocab = vocab
        self.labels_map = None if vocab is None else vocab.target_to_draft()
        self.projection = self._teacher_projection(model) if options.soft_targets > 0 else None
        self.shuffle_pool = self._shuffle_pool()
        self.micro_per_epoch = epoch_batches(
            self._group_rows(), options.batch_size, self.shuffle_pool, options.seed, 0
        ).shape[0]
        self.steps_per_epoch = -(-self.micro_per_epoch // options.grad_accum)
        self.total_steps = self.steps_per_epoch * options.epochs
        self.optimizer = optim.AdamW(
            learning_rate=learning_rate_schedule(options, self.total_steps),
            weight_decay=options.weight_decay,
        )
        self.optimizer.init(self.head.trainable_parameters())
        if resumed is not None:
            self._resume_optimizer()
        # value_and_grad swaps traced parameters into the head: declare it as an output too.
        self._grad_step = mx.compile(
            self._micro_step, inputs=[self.head.state], outputs=[self.head.state]
        )
        self._apply = mx.compile(
            self._apply_step,
            inputs=[self.head.state, self.optimizer.state],
            outputs=[self.head.state, self.optimizer.state],
        )
        self.features: FeatureSource | None = None
        self.heldout_features: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.last_eval: EvalResult | None = None
        self._batches: np.ndarray | None = None

    # -- the head (overridden by other head kinds) --------------------------------------

    def _new_head(self, vocab: DraftVocab | None) -> ReDrafterHead:
        """A freshly initialised head (seeded by ``options.seed``)."""
        if self.options.head != "redrafter":
            raise ValueError(f"--head {self.options.head}: use trainer_class(options)")
        return build_head(embedding_dims(self.embedding), self.options, vocab)

    def _load_head(self, path: Path) -> ReDrafterHead:
        """The head saved in ``path`` (a checkpoint), in float32."""
        return load_drafter(path, model=self.embedding, dtype=mx.float32)

    def _architecture(self, config: Any) -> dict[str, Any]:
        """The options a saved head's ``config`` fixes (``{option: value}``)."""
        return {name: getattr(config, field) for name, field in ARCHITECTURE_OPTIONS.items()}

    def _initial_head(self, path: Path) -> tuple[ReDrafterHead, DraftVocab | None]:
        """Head and draft vocabulary of the ``--init-head`` checkpoint.

        The architecture options are set from the head's config, so ``training.json``
        records what was trained.

        Raises:
            ValueError: the head is of another kind, or an architecture option given on
                the command line contradicts it.
        """
        if not path.is_dir():
            raise ValueError(f"--init-head: {path} is not a head directory")
        try:
            head = self._load_head(path)
        except ValueError as e:
            raise ValueError(f"--init-head {path}: {e}") from e
        if not isinstance(head, self.head_type):
            raise ValueError(
                f"--init-head {path} holds a {type(head).__name__}, "
                f"not a {self.head_type.__name__} (--head {self.options.head})"
            )
        defaults = asdict(FitOptions(out=""))
        for name, value in self._architecture(head.config).items():
            given = getattr(self.options, name)
            if given not in (defaults[name], value):
                flag = name.replace("_", "-")
                raise ValueError(
                    f"--init-head {path} has {flag} {value}, but --{flag} {given} was given"
                )
            setattr(self.options, name, value)
        self.options.__post_init__()
        if head.draft_vocab is None:
            return head, None
        vocab = DraftVocab(
            ids=np.array(head.draft_vocab), oov=self.options.oov, vocab_size=head.config.vocab_size
        )
        return head, vocab

    def _save_head(self, path: Path, dtype: mx.Dtype | None = None) -> None:
        """Write the head to ``path`` (floating tensors in ``dtype``; default: as trained)."""
        save_drafter(self.head, path, dtype=dtype)

    # -- compiled pieces ---------------------------------------------------------------

    def _loss(self, key: mx.array, *inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Loss of one micro-batch; ``inputs`` as :meth:`_micro_inputs` returns them."""
        if self.projection is None:
            hidden, fed, labels, mask = inputs
            return loss_sums(self.head, hidden, fed, labels, mask, self.options.dropout, key)
        hidden, fed, labels, mask, teacher_hidden, soft_mask, projection = inputs
        return soft_loss_sums(
            self.head,
            hidden,
            fed,
            labels,
            mask,
            teacher_hidden,
            soft_mask,
            projection,
            self.options.soft_targets,
            self.options.dropout,
            key,
        )

    def _micro_step(self, key: mx.array, *inputs: mx.array) -> tuple[mx.array, mx.array, dict]:
        """``(summed loss (), per-depth sums (L-1,), gradients of the summed loss)``."""
        (total, per_depth), grads = nn.value_and_grad(self.head, self._loss)(key, *inputs)
        return total, per_depth, grads

    def _apply_step(self, grads: dict, scale: mx.array) -> mx.array:
        """Scale, clip and apply accumulated gradients; returns the gradient norm."""
        grads = tree_map(lambda g: g * scale, grads)
        if self.options.clip_grad > 0:
            grads, norm = optim.clip_grad_norm(grads, self.options.clip_grad)
        else:
            norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
        self.optimizer.update(self.head, grads)
        return norm

    # -- data --------------------------------------------------------------------------

    def _shuffle_pool(self) -> int:
        """Groups per shuffle window: ``--shuffle-pool``, or what ``0`` resolves to."""
        options = self.options
        if options.shuffle_pool > 0:
            return options.shuffle_pool
        if self._feature_store() is not None:
            return max(1, len(self.data.train_groups))
        return STREAMED_SHUFFLE_POOL

    def _feature_store(self) -> Path | None:
        """Where the training features are stored, or ``None`` when they are streamed."""
        if self.options.feature_cache:
            return Path(self.options.feature_cache) / "train"
        if self.options.distilled_features:  # what distill did not store goes next to the head
            return self.out / "features" / "train"
        return None

    def _group_rows(self) -> list[np.ndarray]:
        return rows_by_group(
            self.data.train_table, self.data.train_groups, len(self.data.train_tokens)
        )

    def _teacher_projection(self, model: nn.Module) -> mx.array:
        """``(d, K)`` the target's LM head on the draft vocabulary (for soft targets)."""
        parts = split_model(model)
        if not parts.head_split:
            raise ValueError("--soft-targets: the target's LM head cannot be split off")
        ids = None if self.vocab is None else mx.array(self.vocab.ids, dtype=mx.int32)
        projection = teacher_projection(parts.head, embedding_dims(self.embedding)[1], ids)
        mx.eval(projection)
        return projection

    def _teacher_inputs(self, safe: np.ndarray, in_loss: np.ndarray) -> tuple[mx.array, ...]:
        """``(teacher_hidden (B, L-1, d), soft_mask (B, L-1), projection (d, K))``.

        Depth ``k`` of row ``i`` reads row ``i + k``: position ``t + k`` of the same
        sequence (a sequence's rows are contiguous and in position order).
        """
        ahead, same = ahead_rows(self.data.train_table, safe)
        teacher = self.features.rows(ahead.reshape(-1)).reshape(*ahead.shape, -1)
        return teacher, mx.array(same & in_loss), self.projection

    def _micro_inputs(self, rows: np.ndarray) -> tuple[tuple[mx.array, ...], int] | None:
        """One micro-batch from table rows ``(B,)`` (``-1`` = padding), ``None`` if all padding.

        Returns:
            ``(inputs, positions)``: ``inputs`` is ``(hidden (B, d), fed (B, L-1, d),
            labels (B, L-1), mask (B, L-1))``, followed with soft targets by
            :meth:`_teacher_inputs`' three arrays.
        """
        real = rows >= 0
        if not real.any():
            return None
        safe = np.where(real, rows, rows[real][0])
        table = self.data.train_table
        windows, in_loss = table.windows[safe], table.in_loss[safe] & real[:, None]
        labels, mask = draft_labels(windows, in_loss, self.labels_map)
        fed_ids = np.where(windows[:, :-1] == PAD, 0, windows[:, :-1])
        fed = self.embedding(mx.array(fed_ids)).astype(mx.float32)
        hidden = self.features.rows(safe)
        inputs = (hidden, fed, mx.array(labels), mx.array(mask))
        if self.projection is not None:
            inputs += self._teacher_inputs(safe, mask)
        return inputs, int(mask.any(axis=1).sum())

    def _setup_features(self) -> None:
        """Open (or build) the feature cache, or set up streaming; held-out features (once)."""
        if self.features is not None:
            return
        options, data = self.options, self.data
        start = time.perf_counter()
        readonly = [options.distilled_features] if options.distilled_features else []
        store = self._feature_store()
        if store is not None:
            cache = FeatureCache(
                store,
                self.extractor,
                data.train_tokens,
                data.train_table,
                data.train_groups,
                options.feature_dtype,
                self.progress,
                readonly=readonly,
            )
            self.features = cache
            self.timings["distilled_feature_sequences"] = cache.reused
            if cache.built:
                self.timings["cache_build_s"] = time.perf_counter() - start
        else:
            self.features = StreamingFeatures(
                self.extractor,
                data.train_tokens,
                data.train_table,
                data.train_groups,
                options.feature_dtype,
                keep=2 * self.shuffle_pool,
            )
        if data.heldout_table.size:
            self.heldout_features = dense_features(
                self.extractor,
                data.heldout_tokens,
                data.heldout_table,
                data.heldout_groups,
                options.feature_dtype,
            )

    # -- checkpoints -------------------------------------------------------------------

    def _checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def _resume_head(self) -> tuple[ReDrafterHead, DraftVocab | None, float] | None:
        """Head, vocabulary and coverage from the checkpoint (``None`` if there is none)."""
        path = self._checkpoint_dir()
        if not (path / STATE_FILE).is_file():
            return None
        saved = json.loads((path / STATE_FILE).read_text())
        mine = asdict(self.options)
        defaults = asdict(FitOptions(out=""))
        changed = [k for k in RESUME_KEYS if saved["options"].get(k, defaults[k]) != mine[k]]
        if saved.get("data") != self.data_hash:
            changed.append("data")
        if changed:
            raise ValueError(
                "cannot resume: options differ from the checkpoint's: "
                + ", ".join(
                    f"{k} ({saved['options'].get(k)!r} -> {mine.get(k)!r})" for k in changed
                )
            )
        head = self._load_head(path / HEAD_DIR)
        vocab = None
        if head.draft_vocab is not None:
            vocab = DraftVocab(
                ids=np.array(head.draft_vocab),
                oov=self.options.oov,
                vocab_size=head.config.vocab_size,
            )
        self.state = TrainState(step=saved["step"], history=saved["history"], evals=saved["evals"])
        return head, vocab, saved["coverage"]

    def _resume_optimizer(self) -> None:
        weights = mx.load(str(self._checkpoint_dir() / OPTIMIZER_FILE))
        self.optimizer.state = tree_unflatten(list(weights.items()))

    def save_checkpoint(self) -> Path:
        """Write head, optimizer state and :class:`TrainState` to ``out/checkpoint/``."""
        final = self._checkpoint_dir()
        tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._save_head(tmp / HEAD_DIR)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))
        state = {
            "step": self.state.step,
            "history": self.state.history,
            "evals": self.state.evals,
            "coverage": self.coverage,
            "data": self.data_hash,
            "options": asdict(self.options),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    # -- loop --------------------------------------------------------------------------

    def evaluate(self) -> EvalResult | None:
        """Held-out metrics of the current head (``None`` without held-out data)."""
        if self.heldout_features is None:
            return None
        return evaluate(
            self.head,
            self.embedding,
            self.data.heldout_table,
            self.heldout_features,
            self.labels_map,
            batch_size=self.options.batch_size,
            beam_widths=tuple(self.options.eval_beams),
        )

    def _record_eval(self, epoch: int) -> EvalResult | None:
        result = self.evaluate()
        if result is not None:
            self.state.evals.append({"step": self.state.step, "epoch": epoch, **result.to_dict()})
            if self.progress:
                tqdm.write(f"[eval] step {self.state.step} epoch {epoch}: {result.summary()}")
        return result

    def _optimizer_step(self, batches: np.ndarray, epoch: int, step_in_epoch: int) -> dict:
        """Run the micro-batches of one optimizer step; returns its history entry."""
        options = self.options
        grads, loss, positions = None, mx.array(0.0), 0
        for m, rows in enumerate(batches):
            inputs = self._micro_inputs(rows)
            if inputs is None:
                continue
            arrays, count = inputs
            key = mx.random.key(
                (options.seed * 1_000_003 + epoch * 10_007 + step_in_epoch * 101 + m) % (2**31)
            )
            total, _, micro_grads = self._grad_step(key, *arrays)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss = loss + total
            positions += count
            mx.eval(grads, loss)
        entry = {"step": self.state.step + 1, "loss": 0.0, "positions": positions}
        if grads is not None and positions > 0:
            norm = self._apply(grads, mx.array(1.0 / positions))
            mx.eval(self.head.parameters(), self.optimizer.state, norm)
            entry["loss"] = loss.item() / positions
            entry["grad_norm"] = norm.item()
        entry["lr"] = float(self.optimizer.learning_rate.item())
        self.state.step += 1
        return entry

    def _after_step(self, epoch: int, step_in_epoch: int) -> None:
        """Evaluate (every ``eval_every`` steps and at the end of each epoch), then checkpoint."""
        options, step = self.options, self.state.step
        end_of_epoch = step_in_epoch == self.steps_per_epoch - 1
        if end_of_epoch or (options.eval_every and step % options.eval_every == 0):
            self.last_eval = self._record_eval(epoch)
        if options.checkpoint_every and step % options.checkpoint_every == 0:
            self.save_checkpoint()

    def fit(self, stop_at_step: int | None = None) -> FitResult:
        """Train to the end (or until ``stop_at_step`` steps are done; for tests)."""
        options = self.options
        self._setup_features()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="fit",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        group_rows = self._group_rows()
        train_time, train_positions, smooth = 0.0, 0, None
        while self.state.step < self.total_steps:
            if stop_at_step is not None and self.state.step >= stop_at_step:
                break
            epoch, s = divmod(self.state.step, self.steps_per_epoch)
            if s == 0 or self._batches is None:
                self._batches = epoch_batches(
                    group_rows, options.batch_size, self.shuffle_pool, options.seed, epoch
                )
            lo = s * options.grad_accum
            tic = time.perf_counter()
            entry = self._optimizer_step(self._batches[lo : lo + options.grad_accum], epoch, s)
            train_time += time.perf_counter() - tic
            train_positions += entry["positions"]
            self.state.history.append(entry)
            smooth = entry["loss"] if smooth is None else 0.95 * smooth + 0.05 * entry["loss"]
            bar.update(1)
            bar.set_postfix(
                loss=f"{smooth:.3f}",
                lr=f"{entry['lr']:.2e}",
                pos_s=f"{train_positions / max(train_time, 1e-9):.0f}",
            )
            self._after_step(epoch, s)
        bar.close()
        self.timings["train_s"] = train_time
        self.timings["train_positions"] = train_positions
        self.timings["positions_per_s"] = train_positions / max(train_time, 1e-9)
        if isinstance(self.features, StreamingFeatures):
            self.timings["streamed_group_forwards"] = self.features.forwards
        finished = self.state.step >= self.total_steps
        final = self.last_eval if finished else None
        return FitResult(self.head, self.state, final, dict(self.timings), finished)

    def write_outputs(self, result: FitResult) -> Path:
        """Save the head and ``training.json`` into the output directory."""
        self._save_head(self.out, getattr(mx, self.options.save_dtype))
        report = {
            "options": asdict(self.options),
            "data": {
                "train_sequences": len(self.data.train_tokens),
                "heldout_sequences": len(self.data.heldout_tokens),
                "train_positions": self.data.train_table.size,
                "heldout_positions": self.data.heldout_table.size,
                "truncated_tokens": self.data.truncated,
                "groups": len(self.data.train_groups),
                "shuffle_pool_groups": self.shuffle_pool,
            },
            "draft_vocab": {
                "size": self.head.config.output_size,
                "train_coverage": self.coverage,
                "oov": self.options.oov if self.vocab is not None else None,
            },
            "steps": self.state.step,
            "history": self.state.history,
            "evals": self.state.evals,
            "final_eval": None if result.final_eval is None else result.final_eval.to_dict(),
            "throughput": result.throughput,
        }
        (self.out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        return self.out


# ---------------------------------------------------------------------------------- CLI


@dataclass
class DistilledData:
    """Sequences of a distilled data directory, split by prompt.

    Attributes:
        train: Training sequences ``(tokens (T,), response_start)``.
        heldout: Sequences of held-out prompts.
        model: The target recorded by ``distill`` (``None`` for the default model).
    """

    train: list[Sequence]
    heldout: list[Sequence]
    model: str | None


def read_distilled(path: str | Path, heldout_fraction: float = 0.02) -> DistilledData:
    """Read a ``distill`` data directory (see :mod:`mlx_redrafter.train.data`).

    Raises:
        ValueError: the directory holds no sequences.
    """
    from mlx_redrafter.train.data import DistillDataset

    if not Path(path).is_dir():
        raise ValueError(f"--data: {path} is not a directory")
    dataset = DistillDataset(path, heldout_fraction=heldout_fraction)
    if len(dataset) == 0:
        raise ValueError(f"--data: no distilled sequences in {path}")
    model = dataset.meta.get("model")
    return DistilledData(
        train=list(dataset.train()),
        heldout=list(dataset.heldout()),
        model=None if model in (None, "default") else str(model),
    )


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
        from mlx_redrafter.train.parallel_fit import ParallelTrainer

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
