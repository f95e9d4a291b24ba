"""Pieces every held-out scorer shares (:mod:`mlx_redrafter.train.evaluate` for the ReDrafter
head, :mod:`mlx_redrafter.train.parallel_evaluate` for the parallel head): the accepted run
of a row of right/wrong drafts, and the embedding of padded draft windows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafters.beam_search import Embedder
from mlx_redrafter.train.objective import PAD


def leading_run(correct: np.ndarray) -> np.ndarray:
    """``(n,)`` number of leading ``True`` entries of each row of ``correct`` ``(n, D)``."""
    return np.cumprod(correct, axis=1).sum(axis=1)


def embed_ids(embedding: Embedder, ids: np.ndarray) -> mx.array:
    """Embeddings ``(..., d)`` of ``ids`` ``(...)`` (``PAD`` read as id 0)."""
    return embedding(mx.array(np.where(ids == PAD, 0, ids).astype(np.int32)))
