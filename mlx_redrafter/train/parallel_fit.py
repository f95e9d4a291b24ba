"""``fit --head parallel``: the :class:`~mlx_redrafter.train.trainer.Trainer` for a parallel head.

Same data, position table (``L = k + 1``), feature cache, optimiser, schedule, checkpoints
and report as ReDrafter's; only the head, its micro-batch inputs (context rows instead of
fed embeddings, see :mod:`mlx_redrafter.train.parallel_objective`), its loss and its
held-out metrics differ.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafters.parallel import ParallelConfig, ParallelHead, load_head, save_head
from mlx_redrafter.drafters.redrafter import embedding_dims
from mlx_redrafter.train.evaluate import EvalResult, evaluate
from mlx_redrafter.train.objective import PAD, draft_labels
from mlx_redrafter.train.parallel_objective import context_rows, parallel_loss_sums
from mlx_redrafter.train.trainer import Trainer
from mlx_redrafter.train.vocab import DraftVocab

#: Width of one attention head of the parallel layer (``d / 64`` heads, at least one).
HEAD_DIM = 64


def parallel_config(
    vocab_size: int, hidden_size: int, k: int, context: int, draft_vocab_size: int | None
) -> ParallelConfig:
    """The default layer shape for a target with ``(V, d)``: ``d / 64`` heads, MLP ``2d``."""
    heads = max(1, hidden_size // HEAD_DIM)
    while hidden_size % heads or (hidden_size // heads) % 2:
        heads -= 1
    return ParallelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_masks=k,
        context=context,
        num_heads=heads,
        draft_vocab_size=draft_vocab_size,
    )


class ParallelTrainer(Trainer):
    """Trains a :class:`ParallelHead` (``options.head == "parallel"``) on a frozen target."""

    head: ParallelHead
    head_type = ParallelHead

    def _new_head(self, vocab: DraftVocab | None) -> ParallelHead:
        v, d = embedding_dims(self.embedding)
        config = parallel_config(
            v,
            d,
            self.options.beam_length - 1,
            self.options.context,
            None if vocab is None else vocab.size,
        )
        mx.random.seed(self.options.seed)
        draft_vocab = None if vocab is None else mx.array(vocab.ids, dtype=mx.int32)
        head = ParallelHead(config, draft_vocab=draft_vocab)
        mx.eval(head.parameters())
        return head

    def _architecture(self, config: ParallelConfig) -> dict[str, int]:
        return {"k": config.num_masks, "context": config.context}

    def _load_head(self, path: Path) -> ParallelHead:
        return load_head(path, model=self.embedding, dtype=mx.float32)

    def _save_head(self, path: Path, dtype: mx.Dtype | None = None) -> None:
        save_head(self.head, path, dtype=dtype)

    def _loss(self, key: mx.array, *inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Loss of one micro-batch; ``inputs`` as :meth:`_micro_inputs` returns them."""
        return parallel_loss_sums(self.head, *inputs, self.options.dropout, key)

    def _micro_inputs(self, rows: np.ndarray) -> tuple[tuple[mx.array, ...], int] | None:
        """One micro-batch from table rows ``(B,)`` (``-1`` = padding), ``None`` if all padding.

        Returns:
            ``(inputs, positions)``: ``inputs`` is ``(hidden (B, C, d), valid (B, C),
            root_embedding (B, d), labels (B, k), mask (B, k))``.
        """
        real = rows >= 0
        if not real.any():
            return None
        safe = np.where(real, rows, rows[real][0])
        table = self.data.train_table
        windows, in_loss = table.windows[safe], table.in_loss[safe] & real[:, None]
        labels, mask = draft_labels(windows, in_loss, self.labels_map)
        index, valid = context_rows(table, safe, self.head.config.context)
        hidden = self.features.rows(index.reshape(-1)).reshape(*index.shape, -1)
        roots = np.where(windows[:, 0] == PAD, 0, windows[:, 0])
        root_embedding = self.embedding(mx.array(roots)).astype(mx.float32)
        inputs = (hidden, mx.array(valid), root_embedding, mx.array(labels), mx.array(mask))
        return inputs, int(mask.any(axis=1).sum())

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
