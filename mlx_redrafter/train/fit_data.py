"""``fit``'s data: distilled sequences read and split by prompt, truncated, turned into
position tables and extraction groups; the draft vocabulary chosen on them; the order of
training positions in each epoch (:func:`epoch_batches`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_redrafter.train.features import (
    data_fingerprint,
    extraction_groups,
    sequence_row_starts,
)
from mlx_redrafter.train.fit_options import FitOptions
from mlx_redrafter.train.objective import PositionTable, Sequence, build_position_table
from mlx_redrafter.train.vocab import (
    DraftVocab,
    build_draft_vocab,
    coverage_of,
    response_token_counts,
)


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


def training_coverage(vocab: DraftVocab, train: list[Sequence], options: FitOptions) -> float:
    """Share of the (truncated) training response tokens inside ``vocab``."""
    return coverage_of(vocab.ids, training_counts(train, vocab.vocab_size, options))


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
