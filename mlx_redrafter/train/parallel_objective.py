"""Training objective of the parallel head: which rows it reads and which tokens it predicts.

Alignment
---------
The position table is ReDrafter's (:mod:`mlx_redrafter.train.objective`) with ``L = k + 1``:
row ``t`` of a sequence ``x_0 .. x_{T-1}`` (response from ``r``) holds the window
``w_t = x_{t+1} .. x_{t+k+1}`` and the in-loss flags of its ``k`` depths. As at inference,
the anchor ``t`` is the last accepted position and ``g0 = x_{t+1}`` is given. The head reads

* context slot ``i = 0 .. C-1``: ``h_{t-C+1+i}`` (hidden states of positions
  ``t-C+1 .. t``, oldest first), taken from the feature rows of the same sequence;
  a slot whose position is not a row of the table (before the first kept position, or
  before the start of the sequence) is padding that no mask reads, like the front of the
  engine's window early in a sequence;
* the root ``e(g0) = e(w_t[0])``;

and mask ``j = 1 .. k`` predicts ``w_t[j] = x_{t+1+j}`` (depth ``j``), in the loss iff
ReDrafter's depth ``j`` is: ``r <= t + 1 + j < T``.

For ``T = 8, C = 3, k = 3, r = 3`` (``-`` = padding / not in the loss)::

    t   context slots       g0    mask 1   mask 2   mask 3
    0   -    -    h_0       x_1   -        x_3      x_4
    1   -    h_0  h_1       x_2   x_3      x_4      x_5
    2   h_0  h_1  h_2       x_3   x_4      x_5      x_6
    3   h_1  h_2  h_3       x_4   x_5      x_6      x_7
    4   h_2  h_3  h_4       x_5   x_6      x_7      -
    5   h_3  h_4  h_5       x_6   x_7      -        -

Each row is one example ``[C hidden, g0, k masks]`` under the group-wise visibility of
:mod:`mlx_redrafter.drafters.group_mask` (one group per example), which is exactly the
layout the drafter builds at inference, so training and inference compute the same
function. Packing several anchors of one sequence into one sequence with that mask gives
the same mask outputs (rotary positions make them depend on relative positions only).

Loss
----
Per kept row, the sum over its in-loss depths of the cross-entropy of the draft id of
``x_{t+1+j}`` (:func:`~mlx_redrafter.train.objective.draft_labels`), averaged over kept
rows of the optimizer step (as for ReDrafter).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafters.parallel import ParallelHead
from mlx_redrafter.train.objective import PositionTable, masked_cross_entropy


def context_rows(
    table: PositionTable, rows: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Table rows of the context slots of ``rows`` and which slots are real.

    Args:
        table: The position table (a sequence's rows are contiguous, in position order).
        rows: ``(B,)`` table rows (anchors ``t``).
        context: ``C``.

    Returns:
        ``(index (B, C) int64, valid (B, C) bool)``: slot ``i`` of row ``rows[b]`` reads
        table row ``index[b, i]``, the row of position ``t - C + 1 + i`` of the same
        sequence when ``valid[b, i]``; invalid slots point at the anchor's own row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    back = np.arange(context - 1, -1, -1, dtype=np.int64)
    index = rows[:, None] - back[None, :]
    inside = index >= 0
    safe = np.where(inside, index, rows[:, None])
    want = table.position[rows][:, None].astype(np.int64) - back[None, :]
    valid = (
        inside
        & (table.sequence[safe] == table.sequence[rows][:, None])
        & (table.position[safe] == want)
    )
    return np.where(valid, safe, rows[:, None]), valid


def dropout(x: mx.array, rate: float, key: mx.array) -> mx.array:
    """Inverted dropout of ``x`` with an explicit PRNG ``key``."""
    keep = mx.random.bernoulli(1.0 - rate, x.shape, key=key)
    return mx.where(keep, x / (1.0 - rate), mx.zeros_like(x))


def parallel_loss_sums(
    head: ParallelHead,
    hidden: mx.array,
    valid: mx.array,
    root_embedding: mx.array,
    labels: mx.array,
    mask: mx.array,
    rate: float = 0.0,
    key: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropies of one micro-batch.

    Args:
        head: The parallel head.
        hidden: ``(B, C, d)`` context hidden states.
        valid: ``(B, C)`` bool real context slots.
        root_embedding: ``(B, d)`` embeddings of ``g0``.
        labels: ``(B, k)`` int32 draft ids.
        mask: ``(B, k)`` bool entries in the loss.
        rate: Dropout on the head's inputs (training only).
        key: PRNG key of the dropout masks.

    Returns:
        ``(total ()`` differentiated, ``per_depth (k,))`` sums for logging.
    """
    if rate > 0.0:
        k_h, k_e = mx.random.split(key)
        hidden, root_embedding = dropout(hidden, rate, k_h), dropout(root_embedding, rate, k_e)
    per_depth = masked_cross_entropy(head.logits(hidden, valid, root_embedding), labels, mask)
    return per_depth.sum(), per_depth
