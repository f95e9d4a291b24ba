"""The training loop of ``python -m mlx_redrafter.train fit`` (:class:`Trainer`): a ReDrafter
head learns from the frozen target by self-distillation.

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
:func:`~mlx_redrafter.drafters.redrafter.load_drafter`), ``training.json``
(:meth:`Trainer.write_outputs`) and ``checkpoint/`` (:mod:`mlx_redrafter.train.checkpoint`).
Other head kinds subclass :class:`Trainer` (one trainer module per objective, e.g.
:mod:`mlx_redrafter.train.parallel_fit`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from mlx_redrafter.drafters.redrafter import (
    ReDrafterConfig,
    ReDrafterHead,
    embedding_dims,
    find_input_embedding,
    load_drafter,
    save_drafter,
)
from mlx_redrafter.train.batch_generate import split_model
from mlx_redrafter.train.checkpoint import (
    CHECKPOINT_DIR,
    HEAD_DIR,
    REPORT_FILE,
    TrainState,
    read_optimizer_state,
    read_state,
    write_checkpoint,
)
from mlx_redrafter.train.evaluate import EvalResult, ahead_rows, evaluate
from mlx_redrafter.train.features import (
    FeatureCache,
    FeatureSource,
    HiddenExtractor,
    StreamingFeatures,
    dense_features,
)
from mlx_redrafter.train.fit_data import (
    check_token_ids,
    choose_vocab,
    epoch_batches,
    prepare_data,
    rows_by_group,
    training_coverage,
)
from mlx_redrafter.train.fit_options import (
    ARCHITECTURE_OPTIONS,
    STREAMED_SHUFFLE_POOL,
    FitOptions,
    learning_rate_schedule,
)
from mlx_redrafter.train.objective import (
    PAD,
    Sequence,
    draft_labels,
    loss_sums,
    soft_loss_sums,
    teacher_projection,
)
from mlx_redrafter.train.vocab import DraftVocab


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
        saved = read_state(path, self.options, self.data_hash)
        if saved is None:
            return None
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
        self.optimizer.state = read_optimizer_state(self._checkpoint_dir())

    def save_checkpoint(self) -> Path:
        """Write head, optimizer state and :class:`TrainState` to ``out/checkpoint/``."""
        state = {
            "step": self.state.step,
            "history": self.state.history,
            "evals": self.state.evals,
            "coverage": self.coverage,
            "data": self.data_hash,
            "options": asdict(self.options),
        }
        return write_checkpoint(
            self._checkpoint_dir(), self._save_head, self.optimizer.state, state
        )

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
