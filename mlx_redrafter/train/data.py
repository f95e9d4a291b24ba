"""On-disk format of self-distillation data, its writer and its reader.

A data directory holds::

    DATA_DIR/
      meta.json           what was generated, how, and how far it got
      shard-00000.npz     finished sequences, in completion order
      shard-00001.npz
      ...

Each shard is an uncompressed numpy ``.npz`` with ``n`` sequences:

==================  =========  ==========================================================
array               dtype      meaning
==================  =========  ==========================================================
``tokens``          int32      ``(sum of lengths,)`` every sequence's ids, concatenated
``offsets``         int64      ``(n + 1,)`` sequence ``i`` is ``tokens[offsets[i]:offsets[i+1]]``
``response_start``  int32      ``(n,)`` index in the sequence of the first response id
                               (= prompt length, chat template included)
``prompt_index``    int64      ``(n,)`` 0-based position of the prompt in the prompts file
                               (non-empty lines)
``sample_index``    int32      ``(n,)`` ``0 .. samples_per_prompt - 1``
``finish_reason``   uint8      ``(n,)`` 0 = ended with an EOS id (kept as the last id),
                               1 = cut at ``max_new_tokens``
==================  =========  ==========================================================

A sequence is identified by ``(prompt_index, sample_index)`` and appears in exactly one
shard. Shards are written to a hidden temporary file, fsynced and renamed into place, so a
shard either exists whole or not at all; ``meta.json`` is replaced the same way. The set of
finished sequences is read from the shards themselves (``meta.json`` only summarises), so
a run killed at any moment resumes without duplicates or holes.

``meta.json`` fields: ``format`` (``"mlx-redrafter-distill"``), ``version`` (1), ``model``
(the ``--model`` given, or ``"default"``; what ``fit`` and ``evaluate`` load when not told),
``model_name``, ``model_sha256`` and ``model_dtype`` (the model independently of the
machine: a hash of its weights, see :func:`mlx_redrafter.train.distill.weights_sha256`),
``prompts`` (the path it was made from, informational) and ``prompts_sha256`` (of the
file's bytes), ``params`` (``max_new_tokens``, ``temperature``, ``seed``,
``samples_per_prompt``, ``chat_template``), ``eos_token_ids``, ``vocab_size``, ``progress``
(``sequences``, ``generated_tokens``, ``prompt_tokens``, ``shards``, ``requested``,
``skipped_prompts``, ``complete``) and ``updated`` (UTC time). Resuming compares the hashes,
never paths. Files written before the weights hash existed have ``model_path`` instead of
the three ``model_*`` fields; they read as before.

:mod:`mlx_redrafter.train.pack` stores a data directory without its prompt ids (response
ids, prompt indices and checksums, compressed) and rebuilds it from the prompts file.

Reading: :class:`DistillDataset` loads every shard and orders sequences by
``(prompt_index, sample_index)``; its :meth:`~DistillDataset.train` and
:meth:`~DistillDataset.heldout` halves are decided by a hash of the prompt index (all
samples of a prompt fall on the same side, and the split does not depend on which other
prompts are present).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "mlx-redrafter-distill"
VERSION = 1
META_NAME = "meta.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.npz$")
FINISH_CODES = {"eos": 0, "length": 1}
SHARD_ARRAYS = (
    "tokens",
    "offsets",
    "response_start",
    "prompt_index",
    "sample_index",
    "finish_reason",
)


class DataFormatError(ValueError):
    """A data directory or shard does not follow the format."""


# --------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Any, mode: str = "wb") -> None:
    """Create ``path`` whole or not at all: ``write(file)`` into a temp file, then rename.

    Args:
        path: Final file path.
        write: Called with the open temporary file.
        mode: ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(data_dir: Path) -> int:
    """Delete leftover temporary files of interrupted writes; return how many."""
    removed = 0
    for p in Path(data_dir).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


# --------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------


def read_meta(data_dir: Path) -> dict | None:
    """``meta.json`` of ``data_dir`` as a dict, or None when there is none."""
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataFormatError(f"{path} is not a {FORMAT} file")
    return meta


def write_meta(data_dir: Path, meta: dict) -> None:
    """Replace ``meta.json`` atomically (stamps ``format``, ``version`` and ``updated``)."""
    meta = {
        **meta,
        "format": FORMAT,
        "version": VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_atomic(Path(data_dir) / META_NAME, lambda f: f.write(text), mode="w")


# --------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------


def shard_paths(data_dir: Path) -> list[Path]:
    """The shard files of ``data_dir``, in shard-number order."""
    found = []
    for p in Path(data_dir).iterdir() if Path(data_dir).is_dir() else []:
        m = SHARD_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """Load and validate one shard.

    Raises:
        DataFormatError: Missing arrays or inconsistent sizes.
    """
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in SHARD_ARRAYS if k not in z.files]
        if missing:
            raise DataFormatError(f"{path}: missing arrays {missing}")
        shard = {k: z[k] for k in SHARD_ARRAYS}
    n = shard["response_start"].shape[0]
    offsets = shard["offsets"]
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != shard["tokens"].shape[0]:
        raise DataFormatError(f"{path}: offsets do not match tokens")
    for k in ("prompt_index", "sample_index", "finish_reason"):
        if shard[k].shape != (n,):
            raise DataFormatError(f"{path}: {k} has shape {shard[k].shape}, expected ({n},)")
    return shard


@dataclass
class StoredTotals:
    """What the shards of a data directory hold.

    Attributes:
        keys: ``(prompt_index, sample_index)`` of every stored sequence.
        prompt_tokens: Sum of prompt lengths.
        generated_tokens: Sum of response lengths.
        shards: Number of shard files.
    """

    keys: set[tuple[int, int]]
    prompt_tokens: int = 0
    generated_tokens: int = 0
    shards: int = 0


def stored_totals(data_dir: Path) -> StoredTotals:
    """Read every shard of ``data_dir`` and count what is stored."""
    totals = StoredTotals(keys=set())
    for path in shard_paths(data_dir):
        shard = read_shard(path)
        pairs = zip(shard["prompt_index"].tolist(), shard["sample_index"].tolist(), strict=True)
        totals.keys.update(pairs)
        prompt = int(shard["response_start"].sum(dtype=np.int64))
        totals.prompt_tokens += prompt
        totals.generated_tokens += int(shard["tokens"].shape[0]) - prompt
        totals.shards += 1
    return totals


def completed_keys(data_dir: Path) -> set[tuple[int, int]]:
    """``(prompt_index, sample_index)`` of every sequence already in a shard."""
    return stored_totals(data_dir).keys


@dataclass(frozen=True)
class Sequence:
    """One stored sequence.

    Attributes:
        tokens: ``(L,)`` int32 prompt + response ids.
        response_start: Index of the first response id (the prompt length).
        prompt_index: Prompt position in the prompts file.
        sample_index: Sample number for that prompt.
        finish_reason: ``"eos"`` or ``"length"``.
    """

    tokens: np.ndarray
    response_start: int
    prompt_index: int
    sample_index: int
    finish_reason: str


class ShardWriter:
    """Buffers finished sequences and writes them as numbered shards, atomically.

    Args:
        data_dir: Output directory (created if needed).
        shard_size: Flush after this many sequences.
        flush_seconds: Also flush when the oldest buffered sequence is this old.
    """

    def __init__(self, data_dir: Path, shard_size: int = 256, flush_seconds: float = 300.0):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = max(1, shard_size)
        self.flush_seconds = flush_seconds
        existing = shard_paths(self.data_dir)
        self.next_shard = (
            int(SHARD_PATTERN.match(existing[-1].name).group(1)) + 1 if existing else 0
        )
        self._buffer: list[Sequence] = []
        self._oldest = 0.0

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, seq: Sequence) -> Path | None:
        """Buffer ``seq``; write a shard when one is due. Returns the shard written, if any."""
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(seq)
        due = len(self._buffer) >= self.shard_size
        due = due or time.monotonic() - self._oldest >= self.flush_seconds
        return self.flush() if due else None

    def flush(self) -> Path | None:
        """Write every buffered sequence as one shard (nothing if the buffer is empty)."""
        if not self._buffer:
            return None
        seqs, self._buffer = self._buffer, []
        lengths = np.array([s.tokens.shape[0] for s in seqs], dtype=np.int64)
        arrays = {
            "tokens": np.concatenate([s.tokens.astype(np.int32) for s in seqs]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "response_start": np.array([s.response_start for s in seqs], dtype=np.int32),
            "prompt_index": np.array([s.prompt_index for s in seqs], dtype=np.int64),
            "sample_index": np.array([s.sample_index for s in seqs], dtype=np.int32),
            "finish_reason": np.array(
                [FINISH_CODES[s.finish_reason] for s in seqs], dtype=np.uint8
            ),
        }
        path = self.data_dir / f"shard-{self.next_shard:05d}.npz"
        write_atomic(path, lambda f: np.savez(f, **arrays))
        self.next_shard += 1
        return path


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_mask(prompt_index: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Which prompts are held out: a fixed hash of ``(seed, prompt index)`` below ``fraction``.

    Args:
        prompt_index: ``(n,)`` ints.
        fraction: Expected held-out share in ``[0, 1]``.
        seed: Changes the split.

    Returns:
        ``(n,)`` bool.
    """
    with np.errstate(over="ignore"):
        keys = np.asarray(prompt_index, dtype=np.int64).astype(np.uint64)
        h = _splitmix64(keys ^ _splitmix64(np.full_like(keys, seed & (2**63 - 1))))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


class DistillDataset:
    """Sequences of a distillation data directory, ordered by ``(prompt, sample)``.

    Args:
        path: The data directory.
        heldout_fraction: Share of prompts :meth:`heldout` keeps (see :func:`heldout_mask`).
        split_seed: Seed of the split hash.

    Iterating yields ``(tokens, response_start)`` pairs: ``tokens`` is an ``(L,)`` int32
    view (prompt + response ids), ``response_start`` the index of its first response id.
    ``dataset[i]`` returns the full :class:`Sequence`. :meth:`train` and :meth:`heldout`
    return the two sides of the split as datasets of the same kind.
    """

    def __init__(self, path: str | Path, heldout_fraction: float = 0.02, split_seed: int = 0):
        self.path = Path(path)
        self.heldout_fraction = heldout_fraction
        self.split_seed = split_seed
        self.meta = read_meta(self.path) or {}
        shards = [read_shard(p) for p in shard_paths(self.path)] or [_empty_shard()]
        self._tokens, columns = _concatenate(shards)
        order = np.lexsort((columns["sample_index"], columns["prompt_index"]))
        keys = np.stack([columns["prompt_index"][order], columns["sample_index"][order]], axis=1)
        first = np.ones(order.shape[0], dtype=bool)
        first[1:] = np.any(keys[1:] != keys[:-1], axis=1)
        self._columns = {k: v[order[first]] for k, v in columns.items()}

    def _subset(self, keep: np.ndarray) -> DistillDataset:
        """A dataset sharing this one's tokens with only the rows where ``keep`` is True."""
        sub = object.__new__(DistillDataset)
        sub.path, sub.meta, sub._tokens = self.path, self.meta, self._tokens
        sub.heldout_fraction, sub.split_seed = self.heldout_fraction, self.split_seed
        sub._columns = {k: v[keep] for k, v in self._columns.items()}
        return sub

    def is_heldout(self) -> np.ndarray:
        """``(n,)`` bool: which sequences belong to held-out prompts."""
        return heldout_mask(self.prompt_index, self.heldout_fraction, self.split_seed)

    def train(self) -> DistillDataset:
        """The sequences of prompts not held out."""
        return self._subset(~self.is_heldout())

    def heldout(self) -> DistillDataset:
        """The sequences of held-out prompts."""
        return self._subset(self.is_heldout())

    def __len__(self) -> int:
        return int(self._columns["start"].shape[0])

    def __getitem__(self, i: int) -> Sequence:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        c = self._columns
        return Sequence(
            tokens=self._tokens[c["start"][i] : c["end"][i]],
            response_start=int(c["response_start"][i]),
            prompt_index=int(c["prompt_index"][i]),
            sample_index=int(c["sample_index"][i]),
            finish_reason="eos" if c["finish_reason"][i] == FINISH_CODES["eos"] else "length",
        )

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        c = self._columns
        for s, e, r in zip(
            c["start"].tolist(), c["end"].tolist(), c["response_start"].tolist(), strict=True
        ):
            yield self._tokens[s:e], r

    @property
    def prompt_index(self) -> np.ndarray:
        """``(n,)`` prompt index of each sequence, in dataset order."""
        return self._columns["prompt_index"]

    @property
    def lengths(self) -> np.ndarray:
        """``(n,)`` total length (prompt + response) of each sequence."""
        return self._columns["end"] - self._columns["start"]

    @property
    def num_response_tokens(self) -> int:
        """Total number of response ids."""
        return int((self.lengths - self._columns["response_start"]).sum())


def _empty_shard() -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros(0, np.int32),
        "offsets": np.zeros(1, np.int64),
        "response_start": np.zeros(0, np.int32),
        "prompt_index": np.zeros(0, np.int64),
        "sample_index": np.zeros(0, np.int32),
        "finish_reason": np.zeros(0, np.uint8),
    }


def _concatenate(shards: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All shards' tokens as one array, plus per-sequence columns with absolute offsets."""
    base = np.cumsum([0] + [s["tokens"].shape[0] for s in shards[:-1]])
    tokens = np.concatenate([s["tokens"] for s in shards]).astype(np.int32, copy=False)
    columns = {
        "start": np.concatenate([s["offsets"][:-1] + b for s, b in zip(shards, base, strict=True)]),
        "end": np.concatenate([s["offsets"][1:] + b for s, b in zip(shards, base, strict=True)]),
    }
    for k in ("response_start", "prompt_index", "sample_index", "finish_reason"):
        columns[k] = np.concatenate([s[k] for s in shards])
    return tokens, columns
