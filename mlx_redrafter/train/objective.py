"""ReDrafter's training objective: which positions predict which tokens, and the loss.

Alignment
---------
A distilled sequence is ``x_0 .. x_{T-1}`` (prompt then response); the response starts at
``r`` (``x_r`` is the first response token). ``h_t`` is the target's final hidden state at
position ``t``: the state from which the target predicts ``x_{t+1}``.

At inference the engine calls the head with ``h = h_t`` at the last accepted position
``t`` and ``g0 = x_{t+1}``, the target's own next token there. Beam step ``k = 1 .. L-1``
updates the recurrent state with the embedding of the previous token and predicts the next:

* ``s_0 = 0``, ``s_k = rnn(s_{k-1}, e(x_{t+k}))`` (so ``s_1 = rnn(0, e(g0))``);
* depth ``k`` predicts ``x_{t+1+k}`` from ``(h_t, s_k)``.

Training pairs every position ``t`` with the window ``w_t = x_{t+1} .. x_{t+L}`` (``L``
tokens, :data:`PAD` past the end): the head reads ``w_t[0 .. L-2]`` (``g0`` and the drafts
fed back) and is scored on ``w_t[1 .. L-1]``. Depth ``k`` at position ``t`` counts in the
loss iff its target lies in the response span: ``r <= t + 1 + k < T``. Only positions with
at least one such target are kept: ``max(0, r - L) <= t <= T - 3``.

For ``T = 8, L = 4, r = 3`` (``x_3 .. x_7`` is the response; ``-`` = not in the loss)::

    t   h    fed (g0, then drafts)   depth 1   depth 2   depth 3
    0   h_0  x_1 x_2 x_3             -  (x_2)  x_3       x_4
    1   h_1  x_2 x_3 x_4             x_3       x_4       x_5
    2   h_2  x_3 x_4 x_5             x_4       x_5       x_6
    3   h_3  x_4 x_5 x_6             x_5       x_6       x_7
    4   h_4  x_5 x_6 x_7             x_6       x_7       -  (past the end)
    5   h_5  x_6 x_7 PAD             x_7       -         -
    (t = 6, 7: no target left, dropped)

Positions that occur at inference (``g0`` is a response token, ``t >= r - 1``: rows 2..5
above) are the ones the held-out "tokens per step" metric averages over.

Loss
----
Per kept position, the sum over its in-loss depths of the cross-entropy of the target's
draft id (see :mod:`mlx_redrafter.train.vocab`; out-of-vocabulary targets are left out or
mapped to a catch-all slot), averaged over kept positions of the optimizer step.

Soft targets (``soft_weight = a > 0``): the distilled token ``x_{t+1+k}`` is the argmax of
the target's own distribution at position ``t + k``, ``p = softmax(head_T(h_{t+k}))``, whose
hidden state the feature source already holds (row ``t + k`` of the same sequence). Depth
``k`` then costs ``(1 - a) * CE(x_{t+1+k}) + a * H(p_K, q)``, with ``p_K`` the target's
distribution restricted to the draft vocabulary and renormalised, ``q`` the head's. Where
``h_{t+k}`` is not a kept row (``t + k = T - 2``) the hard term keeps the full weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter.drafters.redrafter import ReDrafterHead

#: ``(tokens (T,) int, response_start)``: one distilled sequence.
Sequence = tuple[np.ndarray, int]
#: Window entry past the end of a sequence.
PAD = -1


@dataclass(frozen=True)
class PositionTable:
    """Every kept training position of a set of sequences (see the module docstring).

    Attributes:
        sequence: ``(N,)`` int32 index of the sequence each position belongs to.
        position: ``(N,)`` int32 ``t`` within its sequence.
        windows: ``(N, L)`` int32 ``x_{t+1} .. x_{t+L}`` (:data:`PAD` past the end).
        in_loss: ``(N, L-1)`` bool, depth ``k`` (column ``k-1``) has its target in the
            response span.
        at_inference: ``(N,)`` bool, ``t >= r - 1`` (``g0`` is a response token).
    """

    sequence: np.ndarray
    position: np.ndarray
    windows: np.ndarray
    in_loss: np.ndarray
    at_inference: np.ndarray

    @property
    def size(self) -> int:
        """``N``, the number of kept positions."""
        return int(self.position.size)

    @property
    def length(self) -> int:
        """``L``, tokens per window (``g0`` + ``L - 1`` drafts)."""
        return int(self.windows.shape[1])

    def rows_of(self, sequence: int) -> np.ndarray:
        """``(n,)`` row indices of ``sequence``'s positions, in position order."""
        return np.flatnonzero(self.sequence == sequence)


def sequence_positions(
    tokens: np.ndarray, response_start: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept positions of one sequence and their windows.

    Args:
        tokens: ``(T,)`` token ids.
        response_start: ``r``, index of the first response token.
        length: ``L`` (``>= 2``).

    Returns:
        ``(positions (n,) int32, windows (n, L) int32, in_loss (n, L-1) bool)``.
    """
    if length < 2:
        raise ValueError(f"beam length must be at least 2, got {length}")
    x = np.asarray(tokens, dtype=np.int32)
    t_len = x.size
    first, last = max(0, response_start - length), t_len - 3
    if last < first:
        return (
            np.zeros(0, np.int32),
            np.zeros((0, length), np.int32),
            np.zeros((0, length - 1), bool),
        )
    positions = np.arange(first, last + 1, dtype=np.int32)
    index = positions[:, None] + 1 + np.arange(length, dtype=np.int32)[None, :]
    padded = np.concatenate([x, np.full(length + 1, PAD, np.int32)])
    windows = padded[index]
    target_index = index[:, 1:]
    in_loss = (target_index >= response_start) & (target_index < t_len)
    return positions, windows, in_loss


def build_position_table(
    sequences: list[Sequence], length: int, max_seq_len: int | None = None
) -> PositionTable:
    """The :class:`PositionTable` of ``sequences`` (each truncated to ``max_seq_len``)."""
    parts: list[tuple[np.ndarray, ...]] = []
    for i, (tokens, start) in enumerate(sequences):
        tokens = np.asarray(tokens)[:max_seq_len]
        positions, windows, in_loss = sequence_positions(tokens, start, length)
        keep = in_loss.any(axis=1)
        positions, windows, in_loss = positions[keep], windows[keep], in_loss[keep]
        parts.append(
            (
                np.full(positions.size, i, np.int32),
                positions,
                windows,
                in_loss,
                positions >= start - 1,
            )
        )
    if not parts:
        parts.append(
            (
                np.zeros(0, np.int32),
                np.zeros(0, np.int32),
                np.zeros((0, length), np.int32),
                np.zeros((0, length - 1), bool),
                np.zeros(0, bool),
            )
        )
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
    return PositionTable(*columns)


def draft_labels(
    windows: np.ndarray, in_loss: np.ndarray, target_to_draft: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Draft-vocabulary labels of the depth targets and the loss mask.

    Args:
        windows: ``(n, L)`` int32 windows.
        in_loss: ``(n, L-1)`` bool.
        target_to_draft: ``(V,)`` int32 label of each target id (``-1`` = excluded), or
            ``None`` for the full vocabulary.

    Returns:
        ``(labels (n, L-1) int32 in [0, K), mask (n, L-1) bool)``; masked labels are 0.
    """
    targets = windows[:, 1:]
    safe = np.where(targets == PAD, 0, targets)
    labels = safe if target_to_draft is None else target_to_draft[safe]
    mask = in_loss & (targets != PAD) & (labels >= 0)
    return np.where(mask, labels, 0).astype(np.int32), mask


def recurrent_states(head: ReDrafterHead, fed: mx.array) -> mx.array:
    """States ``s_1 .. s_{L-1}`` ``(n, L-1, d)`` from the fed embeddings ``(n, L-1, d)``.

    ``s_k = rnn(s_{k-1}, fed[:, k-1])``, ``s_0 = 0``: one ``(n, d)`` step per depth, every
    position at once.
    """
    state = head.initial_state((fed.shape[0],)).astype(fed.dtype)
    states = []
    for k in range(fed.shape[1]):
        state = head.rnn_step(state, fed[:, k])
        states.append(state)
    return mx.stack(states, axis=1)


def _dropout(x: mx.array, rate: float, key: mx.array) -> mx.array:
    """Inverted dropout of ``x`` with an explicit PRNG ``key``."""
    keep = mx.random.bernoulli(1.0 - rate, x.shape, key=key)
    return mx.where(keep, x / (1.0 - rate), mx.zeros_like(x))


def depth_logits(
    head: ReDrafterHead,
    hidden: mx.array,
    fed: mx.array,
    dropout: float = 0.0,
    key: mx.array | None = None,
) -> mx.array:
    """Head logits ``(n, L-1, K)`` for every position and depth.

    Args:
        head: The head.
        hidden: ``(n, d)`` target hidden states ``h_t``.
        fed: ``(n, L-1, d)`` embeddings of ``x_{t+1} .. x_{t+L-1}``.
        dropout: Dropout rate on the head's input ``concat(h, s_k)`` (training only).
        key: PRNG key for the dropout masks.
    """
    states = recurrent_states(head, fed)
    h = mx.broadcast_to(hidden[:, None, :], states.shape)
    if dropout > 0.0:
        k_h, k_s = mx.random.split(key)
        h, states = _dropout(h, dropout, k_h), _dropout(states, dropout, k_s)
    return head.logits(h, states)


def loss_sums(
    head: ReDrafterHead,
    hidden: mx.array,
    fed: mx.array,
    labels: mx.array,
    mask: mx.array,
    dropout: float = 0.0,
    key: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropies of one micro-batch.

    Args:
        head, hidden, fed, dropout, key: As for :func:`depth_logits`.
        labels: ``(n, L-1)`` int32 draft ids.
        mask: ``(n, L-1)`` bool, entries in the loss.

    Returns:
        ``(total ()`` -- the sum over all in-loss entries, what is differentiated --,
        ``per_depth (L-1,))`` sums for logging.
    """
    per_depth = masked_cross_entropy(depth_logits(head, hidden, fed, dropout, key), labels, mask)
    return per_depth.sum(), per_depth


def soft_loss_sums(
    head: ReDrafterHead,
    hidden: mx.array,
    fed: mx.array,
    labels: mx.array,
    mask: mx.array,
    teacher_hidden: mx.array,
    soft_mask: mx.array,
    projection: mx.array,
    soft_weight: float,
    dropout: float = 0.0,
    key: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Summed hard + soft cross-entropies of one micro-batch (see "Soft targets" above).

    Args:
        head, hidden, fed, labels, mask, dropout, key: As for :func:`loss_sums`.
        teacher_hidden: ``(n, L-1, d)`` target hidden states ``h_{t+k}`` of each depth.
        soft_mask: ``(n, L-1)`` bool, depths whose ``teacher_hidden`` is real (and in the
            loss).
        projection: ``(d, K)`` the target's LM head restricted to the draft vocabulary.
        soft_weight: ``a`` in ``[0, 1]``.

    Returns:
        ``(total ()``, differentiated, ``per_depth (L-1,))`` hard cross-entropy sums (the
        same quantity :func:`loss_sums` logs, so curves stay comparable).
    """
    logits = depth_logits(head, hidden, fed, dropout, key).astype(mx.float32)
    hard = nn.losses.cross_entropy(logits, labels, reduction="none")
    teacher = mx.softmax(mx.stop_gradient(teacher_hidden @ projection), axis=-1)
    soft = -(teacher * nn.log_softmax(logits, axis=-1)).sum(axis=-1)
    weight = mx.where(soft_mask, soft_weight, 0.0)
    mixed = (1.0 - weight) * hard + weight * soft
    total = mx.where(mask, mixed, 0.0).sum()
    return total, mx.where(mask, hard, 0.0).sum(axis=0)


def teacher_projection(lm_head: nn.Module, width: int, draft_ids: mx.array | None) -> mx.array:
    """``(d, K)`` matrix of the target's (linear, bias-free) LM head on the draft vocabulary.

    Read off the head by applying it to the identity, so tied, untied and quantized heads
    all work. ``draft_ids`` ``(K,)`` selects the columns (``None``: all ``V``).

    Raises:
        ValueError: the head is not linear without bias (e.g. logit soft-capping).
    """
    eye = mx.eye(width, dtype=mx.float32)
    full = lm_head(eye).astype(mx.float32)
    zero = lm_head(mx.zeros((1, width), mx.float32)).astype(mx.float32)
    twice = lm_head(2.0 * eye[:1]).astype(mx.float32)
    linear = mx.allclose(twice, 2.0 * full[:1], rtol=1e-3, atol=1e-3).item()
    if mx.abs(zero).max().item() > 1e-6 or not linear:
        raise ValueError("soft targets need a linear LM head without bias or soft-capping")
    return full if draft_ids is None else mx.take(full, draft_ids, axis=1)


def masked_cross_entropy(
    logits: mx.array, labels: mx.array, mask: mx.array, axis: int = 0
) -> mx.array:
    """Sums of the cross-entropy of ``logits`` ``(n, L-1, K)``: per depth ``(L-1,)``
    (``axis=0``) or per row ``(n,)`` (``axis=1``).

    Only entries where ``mask`` ``(n, L-1)`` is set count; ``labels`` ``(n, L-1)`` int32.
    """
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), labels, reduction="none")
    return mx.where(mask, ce, 0.0).sum(axis=axis)
