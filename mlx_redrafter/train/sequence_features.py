"""Whole-sequence hidden states of a distillation directory, rebuilt from its token ids.

``python -m mlx_redrafter.train features --data DATA --out STORE`` runs the frozen target
over every sequence of ``DATA`` (prompt + response) and keeps the final-norm hidden state
of every position in a :class:`~mlx_redrafter.train.features.FeatureStore` (fp16 by
default, keyed by sequence content). The feature-level head (:mod:`.eagle_fit`) trains
from such a store; since only token ids are kept in the repository, this is how a new
machine gets the states back, at the target's prefill speed.

Sequences are taken in the data's order in blocks (:data:`BLOCK`), each block batched by
length, and every block is written as one chunk: a run stopped at any point keeps every
finished block and a later run extracts only what is missing, so a partial store holds a
prefix of the (shuffled) data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlx_redrafter.train import fast_ops
from mlx_redrafter.train.data import DistillDataset
from mlx_redrafter.train.features import (
    FeatureStore,
    HiddenExtractor,
    extraction_groups,
    extractor_width,
    sequence_key,
    store_meta,
)

#: Sequences per written chunk (the unit a stopped run keeps).
BLOCK = 256
#: Padded tokens per extraction forward.
MAX_TOKENS = 2048


def open_store(
    path: str | Path,
    extractor: HiddenExtractor,
    sequences: list[np.ndarray],
    dtype: str = "float16",
) -> FeatureStore:
    """The store at ``path`` for ``extractor``'s target (emptied if it holds another's)."""
    return FeatureStore(path, store_meta(extractor, extractor_width(extractor, sequences), dtype))


def build_store(
    store: FeatureStore,
    extractor: HiddenExtractor,
    sequences: list[np.ndarray],
    max_tokens: int = MAX_TOKENS,
    block: int = BLOCK,
    progress: bool = True,
) -> int:
    """Extract every sequence ``store`` lacks, in order, one chunk per block.

    Returns:
        The number of sequences extracted.
    """
    keys = [sequence_key(s) for s in sequences]
    todo = [i for i, k in enumerate(keys) if k not in store.index]
    bar = tqdm(
        total=int(sum(len(sequences[i]) for i in todo)),
        desc="hidden states",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    for lo in range(0, len(todo), block):
        members = todo[lo : lo + block]
        groups = extraction_groups([len(sequences[i]) for i in members], max_tokens)
        entries: dict[str, np.ndarray] = {}
        for group in groups:
            chosen = [members[j] for j in group.tolist()]
            for i, h in zip(chosen, extractor([sequences[i] for i in chosen]), strict=True):
                entries[keys[i]] = h
            bar.update(int(sum(len(sequences[i]) for i in chosen)))
        store.write_chunk([(keys[i], entries[keys[i]]) for i in members if keys[i] in entries])
    bar.close()
    return len(todo)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "features",
        help="rebuild the target's hidden states of a distillation directory",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--data", required=True, help="distillation data directory")
    p.add_argument("--out", required=True, help="feature store directory (created, resumed)")
    p.add_argument("--model", default=None, help="target model (default: the embedded one)")
    p.add_argument("--limit", type=int, default=None, help="first N sequences only")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="padded tokens per forward")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from mlx_redrafter.models import ModelLoadError, load

    if not Path(args.data).is_dir():
        print(f"error: data directory not found: {args.data}", file=sys.stderr)
        return 2
    try:
        model, _ = load(args.model, dtype="float32")
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = DistillDataset(args.data)
    sequences = [np.asarray(tokens) for tokens, _ in data]
    if args.limit is not None:
        sequences = sequences[: args.limit]
    extractor = HiddenExtractor(model)
    store = open_store(args.out, extractor, sequences, args.dtype)
    tic = time.perf_counter()
    # the training kernels (fused SwiGLU, prefill attention with the fast softmax)
    with fast_ops.installed(model, fast_ops.patchable(model), native=False):
        done = build_store(store, extractor, sequences, args.max_tokens)
    print(f"extracted {done} sequences in {time.perf_counter() - tic:.0f} s into {args.out}")
    return 0
