"""How a parallel head is scored (:class:`ParallelScorer`, used by
:func:`mlx_redrafter.train.evaluate.evaluate`), in the same :class:`EvalResult` as ReDrafter's.

Teacher-forced over held-out rows (alignment in :mod:`mlx_redrafter.train.parallel_objective`):
top-``m`` accuracy by depth, and simulated tokens per step. The parallel head's drafts do
not depend on the drafted prefix, so for ``W = 1`` the accepted length at a row is the
number of leading depths whose top-1 token is right, exactly what a greedy target that
reproduces the sequence accepts; for ``W > 1`` the drafts are the drafter's own tree
(:func:`~mlx_redrafter.drafters.factorized_tree.factorized_tree`, no budget) and the
longest right run over its beams counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter.drafters.beam_search import Embedder
from mlx_redrafter.drafters.factorized_tree import factorized_tree
from mlx_redrafter.drafters.parallel import ParallelHead
from mlx_redrafter.train.objective import PositionTable
from mlx_redrafter.train.parallel_objective import context_rows
from mlx_redrafter.train.scoring_ops import embed_ids, leading_run


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
    root = embed_ids(embedding, table.windows[rows, 0]).astype(mx.float32)
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


@dataclass
class ParallelScorer:
    """A parallel head over a table's rows (a :class:`~mlx_redrafter.train.evaluate.HeadScorer`):
    one pass per row, and the drafter's own tree for ``W > 1``."""

    head: ParallelHead
    embedding: Embedder
    table: PositionTable
    #: ``(N, d)`` hidden states of the table's rows.
    features: np.ndarray

    def logits(self, rows: np.ndarray) -> mx.array:
        """``(n, k, K)`` logits of one pass at each row."""
        return batch_logits(self.head, self.embedding, self.table, self.features, rows)

    def to_target_ids(self, ids: mx.array) -> mx.array:
        """Target ids of draft ids."""
        return self.head.to_target_ids(ids)

    def tree_accepted(self, rows: np.ndarray, logits: mx.array, width: int) -> np.ndarray:
        """Accepted drafts of the ``width``-beam tree built from ``logits``."""
        windows, in_loss = self.table.windows[rows], self.table.in_loss[rows]
        return tree_accepted(self.head, logits, windows, in_loss, width)
