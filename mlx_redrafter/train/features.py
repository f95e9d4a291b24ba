"""Teacher-forced hidden states of the frozen target, computed on demand or cached on disk.

:class:`HiddenExtractor` runs the target over whole distilled sequences (prompt + response)
and returns the final hidden state ``h_t`` ``(T, d)`` of every position. Sequences are
processed in fixed *extraction groups* (:func:`extraction_groups`: sorted by length, right-
padded to a multiple of :data:`PAD_MULTIPLE`, at most ``max_tokens`` padded tokens per
forward). The groups do not depend on the epoch, so a sequence's features come out of the
same forward whether they are cached or recomputed, and training is identical either way.

Two sources serve the rows of a :class:`~mlx_redrafter.train.objective.PositionTable`:

* :class:`FeatureCache`: the states of every position of every sequence, in memory-mapped
  ``.npy`` chunks on disk (fp16 by default) keyed by sequence content; later runs with the
  same target reuse them and extract only sequences they have not seen.
* :class:`StreamingFeatures`: features are computed group by group when a batch first
  needs them and forgotten a few groups later (no disk, one target forward per epoch).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from mlx_redrafter.target import Target
from mlx_redrafter.train.batch_generate import split_model
from mlx_redrafter.train.objective import PositionTable

#: Extraction forwards pad sequences to a multiple of this length (fewer compiled shapes).
PAD_MULTIPLE = 32
#: Token id used to right-pad sequences (never attended to by real positions).
PAD_ID = 0
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
META_FILE = "meta.json"
#: Subdirectory of a distillation data directory holding ``distill --save-features``'s store.
DISTILLED_DIR = "features"
DATA_FILE = "features.npy"


class HiddenExtractor:
    """Final hidden states of a frozen target over whole sequences.

    Uses the model's backbone (without its LM head, see
    :func:`~mlx_redrafter.train.batch_generate.split_model`) on right-padded batches when
    the model splits; otherwise one :class:`~mlx_redrafter.target.Target` forward per
    sequence.

    Args:
        model: The target mlx-lm model (frozen, not modified).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        parts = split_model(model)
        self.backbone = parts.backbone if parts.head_split else None
        self.target = None if parts.head_split else Target(model)

    def __call__(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """Hidden states ``[(T_i, d) float32]`` of ``sequences`` ``[(T_i,) int]``, one forward."""
        if self.target is not None:
            return [self._single(s) for s in sequences]
        lengths = [len(s) for s in sequences]
        width = padded_length(max(lengths))
        batch = np.full((len(sequences), width), PAD_ID, dtype=np.int32)
        for row, tokens in enumerate(sequences):
            batch[row, : len(tokens)] = tokens
        hidden = self.backbone(mx.array(batch), None).astype(mx.float32)
        host = np.array(hidden)
        return [host[row, :n] for row, n in enumerate(lengths)]

    def _single(self, tokens: np.ndarray) -> np.ndarray:
        """``(T, d)`` hidden states of one sequence through :class:`Target`."""
        _, hidden = self.target.forward(mx.array(tokens, dtype=mx.int32), self.target.make_cache())
        return np.array(hidden.astype(mx.float32))

    def fingerprint(self) -> str:
        """Hash of the hidden states of a fixed probe sequence (identifies the target)."""
        probe = (np.arange(16) * 5 % 8 + 1).astype(np.int32)
        h = self([probe])[0]
        return hashlib.sha256(np.ascontiguousarray(h, dtype=np.float32).tobytes()).hexdigest()


def padded_length(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`PAD_MULTIPLE`."""
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def extraction_groups(lengths: list[int], max_tokens: int) -> list[np.ndarray]:
    """Sequence indices grouped for batched forwards, shortest sequences first.

    A group's padded size (``count * padded_length(longest)``) stays within
    ``max_tokens``; a longer single sequence forms a group of its own.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups: list[np.ndarray] = []
    current: list[int] = []
    for index in order:
        width = padded_length(lengths[index])
        if current and (len(current) + 1) * width > max_tokens:
            groups.append(np.asarray(current, dtype=np.int64))
            current = []
        current.append(int(index))
    if current:
        groups.append(np.asarray(current, dtype=np.int64))
    return groups


def sequence_row_starts(table: PositionTable, num_sequences: int) -> np.ndarray:
    """``(S + 1,)`` first table row of each sequence (rows of a sequence are contiguous)."""
    return np.searchsorted(table.sequence, np.arange(num_sequences + 1), side="left")


def group_rows(
    extractor: HiddenExtractor,
    sequences: list[np.ndarray],
    table: PositionTable,
    starts: np.ndarray,
    group: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of the table rows of one extraction group.

    Returns:
        ``(rows (n,) int64 ascending, hidden (n, d) float32)``.
    """
    hidden = extractor([sequences[i] for i in group])
    rows, values = [], []
    for seq, h in zip(group, hidden, strict=True):
        lo, hi = starts[seq], starts[seq + 1]
        rows.append(np.arange(lo, hi))
        values.append(h[table.position[lo:hi]])
    rows_all = np.concatenate(rows)
    order = np.argsort(rows_all)
    return rows_all[order], np.concatenate(values)[order]


class FeatureSource(Protocol):
    """Anything that serves ``h_t`` for rows of a position table."""

    def rows(self, index: np.ndarray) -> mx.array:
        """``(n, d)`` float32 features of table rows ``index`` ``(n,)``."""
        ...


def data_fingerprint(sequences: Iterable[np.ndarray], table: PositionTable) -> str:
    """Hash of the token sequences and the table's positions."""
    digest = hashlib.sha256()
    for tokens in sequences:
        digest.update(np.asarray(tokens, dtype=np.int32).tobytes())
        digest.update(b"|")
    digest.update(table.sequence.tobytes())
    digest.update(table.position.tobytes())
    return digest.hexdigest()


def sequence_key(tokens: np.ndarray) -> str:
    """Content key of one (truncated) token sequence: the hex SHA-1 of its int32 ids."""
    return hashlib.sha1(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def store_meta(extractor: HiddenExtractor, width: int, dtype: str) -> dict:
    """The ``meta.json`` of a feature store for ``extractor``'s target (see :class:`FeatureStore`)."""
    return {
        "format": FeatureStore.FORMAT,
        "version": FeatureStore.VERSION,
        "target": extractor.fingerprint(),
        "dtype": dtype,
        "width": width,
    }


class FeatureStore:
    """Hidden states of whole sequences in a directory, keyed by content.

    The directory holds ``meta.json`` (format, target fingerprint, dtype, width ``d``) and
    *chunks*: ``chunk-NNNNN.npy`` ``(n_tokens, d)`` with the states of every position of
    some sequences, and ``chunk-NNNNN.keys.json`` naming each sequence's key
    (:func:`sequence_key`), first row and length. A chunk counts once its keys file exists
    (written last), so an interrupted writer keeps every finished chunk.

    Opening a directory whose ``meta.json`` differs from ``meta`` (another target or dtype)
    empties it. ``distill --save-features`` writes one; :class:`FeatureCache` reads and
    grows one, and reads others (:meth:`add_readonly`) without touching them.

    Args:
        path: Store directory (created if needed).
        meta: What the store must hold (:func:`store_meta`).
    """

    FORMAT = "mlx-redrafter-features"
    VERSION = 2

    def __init__(self, path: str | Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.dtype = FEATURE_DTYPES[meta["dtype"]]
        self.chunk_files: list[Path] = []
        self.index: dict[str, tuple[int, int, int]] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / META_FILE
        stored = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if stored != meta:
            for old in [*self.path.glob("chunk-*"), self.path / DATA_FILE]:
                old.unlink(missing_ok=True)
            meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        self._read_chunks(self.path)

    def _read_chunks(self, path: Path) -> int:
        """Index the finished chunks of ``path``; returns the number of new sequences."""
        added = 0
        for keys_file in sorted(path.glob("chunk-*.keys.json")):
            data_file = keys_file.with_name(keys_file.name.replace(".keys.json", ".npy"))
            if not data_file.is_file():
                continue
            chunk = len(self.chunk_files)
            self.chunk_files.append(data_file)
            for key, first, length in json.loads(keys_file.read_text()):
                if key not in self.index:
                    self.index[key] = (chunk, int(first), int(length))
                    added += 1
        return added

    def add_readonly(self, path: str | Path) -> int:
        """Also serve the chunks of the store at ``path`` when its meta equals this one's.

        Returns the number of sequences it adds (0 for a missing or different store).
        """
        meta_file = Path(path) / META_FILE
        if Path(path).resolve() == self.path.resolve() or not meta_file.is_file():
            return 0
        if json.loads(meta_file.read_text()) != self.meta:
            return 0
        return self._read_chunks(Path(path))

    def write_chunk(self, entries: list[tuple[str, np.ndarray]]) -> None:
        """Append one chunk: ``entries`` of ``(key, states (T, d))``."""
        number = len(list(self.path.glob("chunk-*.keys.json")))
        while (self.path / f"chunk-{number:05d}.keys.json").exists():
            number += 1
        data_file = self.path / f"chunk-{number:05d}.npy"
        tmp = data_file.with_suffix(".tmp.npy")
        stacked = np.concatenate([h for _, h in entries]).astype(self.dtype)
        np.save(tmp, stacked)
        tmp.replace(data_file)
        records, first = [], 0
        for key, h in entries:
            records.append([key, first, int(h.shape[0])])
            first += int(h.shape[0])
        keys_file = self.path / f"chunk-{number:05d}.keys.json"
        keys_file.with_suffix(".tmp").write_text(json.dumps(records))
        keys_file.with_suffix(".tmp").replace(keys_file)
        chunk = len(self.chunk_files)
        self.chunk_files.append(data_file)
        for key, first, length in records:
            self.index[key] = (chunk, first, length)


class FeatureCache:
    """Features of a position table from a :class:`FeatureStore`, extracting what is missing.

    Later runs with the same target reuse the store and extract only sequences it does not
    hold, so adding data to a distillation directory extracts only the new sequences; a
    different target (or dtype) starts a fresh store. Missing sequences are extracted in
    the given extraction groups (restricted to the missing members), so a store built in
    one go holds exactly what :class:`StreamingFeatures` computes.

    Args:
        path: Store directory.
        extractor: The target's :class:`HiddenExtractor`.
        sequences: The (truncated) token sequences the table was built from.
        table: The position table.
        groups: Extraction groups (:func:`extraction_groups`).
        dtype: ``"float16"`` or ``"float32"`` on disk.
        progress: Show a progress bar while extracting.
        chunk_tokens: Tokens per chunk file.
        readonly: Other stores (e.g. the one ``distill --save-features`` wrote) whose
            sequences are read from there when their meta matches.
    """

    def __init__(
        self,
        path: str | Path,
        extractor: HiddenExtractor,
        sequences: list[np.ndarray],
        table: PositionTable,
        groups: list[np.ndarray],
        dtype: str = "float16",
        progress: bool = True,
        chunk_tokens: int = 1 << 18,
        readonly: Iterable[str | Path] = (),
    ):
        self.dtype = dtype
        self.chunk_tokens = chunk_tokens
        self.store = FeatureStore(
            path, store_meta(extractor, extractor_width(extractor, sequences), dtype)
        )
        self.meta = self.store.meta
        self.reused = sum(self.store.add_readonly(other) for other in readonly)
        keys = [sequence_key(tokens) for tokens in sequences]
        missing = np.array([k not in self.store.index for k in keys], dtype=bool)
        self.built = bool(missing.any())
        if self.built:
            todo = [g[missing[g]] for g in groups]
            self._extract(extractor, sequences, keys, [g for g in todo if g.size], progress)
        self.arrays = [np.load(f, mmap_mode="r") for f in self.store.chunk_files]
        self._locate(keys, table)

    def _extract(
        self,
        extractor: HiddenExtractor,
        sequences: list[np.ndarray],
        keys: list[str],
        groups: list[np.ndarray],
        progress: bool,
    ) -> None:
        """Run ``groups`` through the target, writing a chunk every ``chunk_tokens`` tokens."""
        pending: list[tuple[str, np.ndarray]] = []
        size = 0
        bar = tqdm(
            total=sum(len(sequences[i]) for g in groups for i in g),
            desc="hidden states",
            unit="tok",
            unit_scale=True,
            disable=not progress,
        )
        for group in groups:
            hidden = extractor([sequences[i] for i in group])
            for i, h in zip(group.tolist(), hidden, strict=True):
                if keys[i] not in self.store.index and all(k != keys[i] for k, _ in pending):
                    pending.append((keys[i], h))
                    size += h.shape[0]
            bar.update(sum(h.shape[0] for h in hidden))
            if size >= self.chunk_tokens:
                self.store.write_chunk(pending)
                pending, size = [], 0
        if pending:
            self.store.write_chunk(pending)
        bar.close()

    def _locate(self, keys: list[str], table: PositionTable) -> None:
        """Chunk and chunk row of every table row."""
        chunk_of = np.empty(len(keys), dtype=np.int32)
        first_of = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            chunk_of[i], first_of[i], _ = self.store.index[key]
        self.row_chunk = chunk_of[table.sequence]
        self.row_offset = first_of[table.sequence] + table.position

    def rows(self, index: np.ndarray) -> mx.array:
        """``(n, d)`` float32 features of table rows ``index`` ``(n,)``."""
        out = np.empty((index.size, self.meta["width"]), dtype=FEATURE_DTYPES[self.dtype])
        chunks = self.row_chunk[index]
        for chunk in np.unique(chunks):
            mine = np.flatnonzero(chunks == chunk)
            offsets = self.row_offset[index[mine]]
            order = np.argsort(offsets)
            out[mine[order]] = self.arrays[int(chunk)][offsets[order]]
        return mx.array(out).astype(mx.float32)


def extractor_width(extractor: HiddenExtractor, sequences: list[np.ndarray]) -> int:
    """``d``: width of the extractor's hidden states (from a one-token forward)."""
    first = next((s for s in sequences if len(s)), np.zeros(1, np.int32))
    return int(extractor([np.asarray(first[:1])])[0].shape[-1])


class StreamingFeatures:
    """Features computed group by group when first needed; the last ``keep`` groups kept.

    Values are rounded through ``dtype`` exactly as :class:`FeatureCache` stores them.

    Args:
        extractor: The target's :class:`HiddenExtractor`.
        sequences: The (truncated) token sequences.
        table: The position table.
        groups: Extraction groups (:func:`extraction_groups`).
        dtype: ``"float16"`` or ``"float32"``.
        keep: Number of groups kept in memory.
    """

    def __init__(
        self,
        extractor: HiddenExtractor,
        sequences: list[np.ndarray],
        table: PositionTable,
        groups: list[np.ndarray],
        dtype: str = "float16",
        keep: int = 16,
    ):
        self.extractor = extractor
        self.sequences = sequences
        self.table = table
        self.groups = groups
        self.dtype = FEATURE_DTYPES[dtype]
        self.keep = keep
        self.starts = sequence_row_starts(table, len(sequences))
        self.group_of = np.zeros(len(sequences), dtype=np.int64)
        for g, members in enumerate(groups):
            self.group_of[members] = g
        self.row_group = self.group_of[table.sequence]
        self.loaded: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.forwards = 0

    def _load(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        if g in self.loaded:
            self.loaded.move_to_end(g)
            return self.loaded[g]
        rows, values = group_rows(
            self.extractor, self.sequences, self.table, self.starts, self.groups[g]
        )
        self.forwards += 1
        self.loaded[g] = (rows, values.astype(self.dtype))
        while len(self.loaded) > self.keep:
            self.loaded.popitem(last=False)
        return self.loaded[g]

    def rows(self, index: np.ndarray) -> mx.array:
        """``(n, d)`` float32 features of rows ``index``."""
        out: np.ndarray | None = None
        for g in np.unique(self.row_group[index]):
            rows, values = self._load(int(g))
            if out is None:
                out = np.empty((index.size, values.shape[1]), dtype=self.dtype)
            mine = np.flatnonzero(self.row_group[index] == g)
            out[mine] = values[np.searchsorted(rows, index[mine])]
        return mx.array(out).astype(mx.float32)


def dense_features(
    extractor: HiddenExtractor,
    sequences: list[np.ndarray],
    table: PositionTable,
    groups: list[np.ndarray],
    dtype: str = "float16",
) -> np.ndarray:
    """All ``(N, d)`` features of a (small) table in memory, e.g. the held-out set."""
    starts = sequence_row_starts(table, len(sequences))
    out: np.ndarray | None = None
    for group in groups:
        rows, values = group_rows(extractor, sequences, table, starts, group)
        if out is None:
            out = np.zeros((table.size, values.shape[1]), dtype=FEATURE_DTYPES[dtype])
        out[rows] = values
    if out is None:
        out = np.zeros((0, extractor_width(extractor, sequences)), FEATURE_DTYPES[dtype])
    return out
