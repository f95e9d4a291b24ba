"""Held-out metrics of a parallel head, in the same :class:`EvalResult` as ReDrafter's.

Teacher-forced over held-out rows (alignment in :mod:`mlx_redrafter.train.parallel_objective`):
top-``m`` accuracy by depth, and simulated tokens per step. The parallel head's drafts do
not depend on the drafted prefix, so for ``W = 1`` the accepted length at a row is the
number of leading depths whose top-1 token is right, exactly what a greedy target that
reproduces the sequence accepts; for ``W > 1`` the drafts are the drafter's own tree
(:func:`~mlx_redrafter.drafters.factorized_tree.factorized_tree`, no budget) and the
longest right run over its beams counts.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter.drafters.beam_search import Embedder
from mlx_redrafter.drafters.factorized_tree import factorized_tree
from mlx_redrafter.drafters.parallel import ParallelHead
from mlx_redrafter.train.evaluate import (
    TOP_M,
    EvalResult,
    _embed,
    _top_ids,
    decode_tokens_per_step,
    leading_run,
)
from mlx_redrafter.train.objective import PositionTable, draft_labels, masked_cross_entropy
from mlx_redrafter.train.parallel_objective import context_rows


def batch_logits(
    head: ParallelHead,
    embedding: Embedder,
    table: PositionTable,
    features: np.ndarray,
    rows: np.ndarray,
) -> mx.array:
    """Draft logits ``(B, k, K)`` of table ``rows`` ``(B,)`` from features ``(N, d)``."""
    index, valid = context_rows(table, rows, head.config.context)
    hidden = mx.array(features[index]).astype(mx.float32)
    root = _embed(embedding, table.windows[rows, 0]).astype(mx.float32)
    return head.logits(hidden, mx.array(valid), root)


def tree_accepted(
    head: ParallelHead, logits: mx.array, windows: np.ndarray, in_loss: np.ndarray, width: int
) -> np.ndarray:
    """``(B,)`` longest right run over the ``width`` beams of each row's tree."""
    logprobs = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    paths, _, keep = mx.vmap(partial(factorized_tree, width=width, budget=None))(logprobs)
    drafts = np.array(head.to_target_ids(paths))
    correct = (drafts == windows[:, None, 1:]) & in_loss[:, None, :] & np.array(keep)
    depth = windows.shape[1] - 1
    return leading_run(correct.reshape(-1, depth)).reshape(-1, width).max(axis=1)


def evaluate_parallel(
    head: ParallelHead,
    embedding: Embedder,
    table: PositionTable,
    features: np.ndarray,
    target_to_draft: np.ndarray | None,
    batch_size: int = 256,
    beam_widths: tuple[int, ...] = (),
) -> EvalResult:
    """Held-out metrics of ``head`` over every row of ``table`` (``L = k + 1``).

    Args:
        head: The parallel head.
        embedding: The target's input embedding.
        table: Held-out positions.
        features: ``(N, d)`` hidden states of the table's rows.
        target_to_draft: Training labels ``(V,)`` (for the loss), ``None`` = full vocabulary.
        batch_size: Rows per forward.
        beam_widths: Beam widths ``W > 1`` to simulate as well.
    """
    depths = table.length - 1
    hits = np.zeros((depths, TOP_M))
    counts = np.zeros(depths, dtype=np.int64)
    widths = [1, *sorted({w for w in beam_widths if w > 1})]
    accepted = {w: np.zeros(table.size, dtype=np.int64) for w in widths}
    loss_total, loss_positions = 0.0, 0
    for lo in range(0, table.size, batch_size):
        rows = np.arange(lo, min(lo + batch_size, table.size))
        windows, in_loss = table.windows[rows], table.in_loss[rows]
        logits = batch_logits(head, embedding, table, features, rows)[:, :depths]
        labels, mask = draft_labels(windows, in_loss, target_to_draft)
        loss_total += masked_cross_entropy(logits, mx.array(labels), mx.array(mask)).sum().item()
        loss_positions += int(in_loss.any(axis=1).sum())
        ranked = _top_ids(logits, head, TOP_M)
        found = ranked == windows[:, 1:, None]
        within = np.cumsum(found, axis=-1) > 0
        if within.shape[-1] < TOP_M:
            pad = np.repeat(within[..., -1:], TOP_M - within.shape[-1], axis=-1)
            within = np.concatenate([within, pad], axis=-1)
        hits += (within & in_loss[..., None]).sum(axis=0)
        counts += in_loss.sum(axis=0)
        accepted[1][rows] = leading_run(found[..., 0] & in_loss)
        for width in widths[1:]:
            accepted[width][rows] = tree_accepted(head, logits, windows, in_loss, width)
    chain_rows = table.at_inference
    return EvalResult(
        topk=hits / np.maximum(counts, 1)[:, None],
        counts=counts,
        loss=loss_total / max(1, loss_positions),
        positions=int(chain_rows.sum()),
        tokens_per_step={
            w: float(1.0 + a[chain_rows].mean()) if chain_rows.any() else float("nan")
            for w, a in accepted.items()
        },
        decode_tokens_per_step={w: decode_tokens_per_step(table, a) for w, a in accepted.items()},
    )
