"""Held-out metrics of a draft head: per-depth top-k accuracy and simulated tokens per step.

All metrics are teacher-forced over held-out distilled sequences (see
:mod:`mlx_redrafter.train.objective` for the alignment) and scored in target-id space, so a
target outside a reduced draft vocabulary always counts as a miss.

* ``topk[k-1, m-1]``: share of the in-loss depth-``k`` targets ``x_{t+1+k}`` that are among
  the head's ``m`` most likely tokens at depth ``k``.
* ``tokens_per_step[W]``: the mean over the positions the engine can meet (``t >= r - 1``)
  of ``1 +`` the accepted drafts there. For ``W = 1`` (greedy chain) that is the number of
  leading depths whose top-1 token is right: while every earlier draft is right, the
  teacher-forced state equals the state the engine feeds back, so this is the exact
  accepted length of a greedy target over these sequences (the chain also stops at the
  end of the sequence). For ``W > 1`` the drafts come from the engine's own beam search
  (:func:`~mlx_redrafter.drafters.beam_search.beam_search`, vectorised over positions) and
  the longest right run over all beams counts.
* With prompt lookup in the same tree (:func:`lookup_accepted`, the engine's
  ``CombinedDrafter``), a row accepts the longer of the two runs.
* Sampled chain (:func:`sampled_chain_accepted`, ``W = 1`` at temperature ``T``): the head
  samples depth ``k`` from ``q_k`` and the chain rule accepts it with probability
  ``a_k = sum min(p_k, q_k)``, ``p_k`` the target's distribution at position ``t + k``
  (row ``t + k`` of the same sequence), so the expected accepted length is
  ``sum_j prod_{k <= j} a_k``. The head's state is teacher-forced on the stored tokens, not
  on the tokens the chain accepted (exact at depth 1, an approximation deeper); for data
  distilled at the same temperature the stored tokens are draws from ``p``.
* ``decode_tokens_per_step[W]``: tokens per target call of greedy decoding along each
  held-out response: start at ``t = r - 1``, emit ``1 + a_t`` tokens, jump to
  ``t + 1 + a_t``. This is what the engine reports for a target that reproduces the
  distilled responses (positions after a long accepted run are skipped, so it differs from
  the per-position mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafters.beam_search import Embedder, beam_search
from mlx_redrafter.drafters.redrafter import ReDrafterHead
from mlx_redrafter.train.objective import (
    PositionTable,
    depth_logits,
    draft_labels,
    masked_cross_entropy,
)
from mlx_redrafter.train.scoring_ops import embed_ids, leading_run

if TYPE_CHECKING:
    from mlx_redrafter.drafters.parallel import ParallelHead

#: Largest ``m`` of the reported top-``m`` accuracies.
TOP_M = 5


@dataclass
class EvalResult:
    """Held-out metrics (see the module docstring).

    Attributes:
        topk: ``(L-1, TOP_M)`` accuracy at depth ``k`` (row) within the top ``m`` (column).
        counts: ``(L-1,)`` in-loss targets per depth.
        tokens_per_step: Simulated tokens per step, ``W = 1``.
        loss: Mean over positions of the summed per-depth cross-entropy (training loss).
        positions: Positions averaged by ``tokens_per_step``.
        beam_tokens_per_step: Simulated tokens per step by beam width ``W > 1``.
    """

    topk: np.ndarray
    counts: np.ndarray
    loss: float
    positions: int
    tokens_per_step: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_step: dict[int, float] = field(default_factory=dict)
    #: ``(N,)`` accepted drafts at every row, by beam width (for combining with other
    #: drafters, see :func:`lookup_accepted`; not serialised).
    accepted: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "loss": self.loss,
            "tokens_per_step": {str(w): v for w, v in self.tokens_per_step.items()},
            "decode_tokens_per_step": {str(w): v for w, v in self.decode_tokens_per_step.items()},
            "top1_by_depth": [float(a) for a in self.topk[:, 0]],
            f"top{TOP_M}_by_depth": [float(a) for a in self.topk[:, -1]],
            "topk_by_depth": self.topk.tolist(),
            "targets_by_depth": [int(c) for c in self.counts],
            "positions": self.positions,
        }

    def summary(self) -> str:
        """One line: loss, top-1 by depth, tokens per step."""
        top1 = " ".join(f"{a:.3f}" for a in self.topk[:, 0])
        per_position = " ".join(f"W={w}:{v:.3f}" for w, v in self.tokens_per_step.items())
        decode = " ".join(f"W={w}:{v:.3f}" for w, v in self.decode_tokens_per_step.items())
        return (
            f"loss {self.loss:.4f} | top-1 by depth {top1} | tokens/step per position "
            f"{per_position} | decoding {decode}"
        )


def decode_walks(table: PositionTable, accepted: np.ndarray) -> list[list[int]]:
    """Accepted drafts at each target call of greedy decoding along every sequence.

    Decoding starts at ``t = r - 1``; a call at ``t`` emits ``g0 = x_{t+1}`` and ``a_t``
    drafts, and the next call is at ``t + 1 + a_t``, up to the call at ``t = T - 2`` (whose
    ``g0`` is the last token; it accepts nothing).

    Args:
        table: Positions (each sequence's ``at_inference`` rows run from ``t = r - 1`` to
            ``t = T - 3`` without gaps).
        accepted: ``(N,)`` accepted drafts at each row (read at ``at_inference`` rows only).

    Returns:
        One list ``[a_t, ...]`` per sequence with ``at_inference`` rows, in sequence order.
    """
    rows = np.flatnonzero(table.at_inference)
    walks = []
    for seq in np.unique(table.sequence[rows]):
        mine = rows[table.sequence[rows] == seq]
        first, last = int(table.position[mine[0]]), int(table.position[mine[-1]])
        walk, t = [], first
        while t <= last + 1:
            a = int(accepted[mine[t - first]]) if t <= last else 0
            walk.append(a)
            t += 1 + a
        walks.append(walk)
    return walks


def decode_tokens_per_step(table: PositionTable, accepted: np.ndarray) -> float:
    """Emitted tokens per target call over all :func:`decode_walks` (prefill included)."""
    walks = decode_walks(table, accepted)
    calls = sum(len(w) for w in walks)
    return (sum(len(w) + sum(w) for w in walks) / calls) if calls else float("nan")


def _top_ids(logits: mx.array, head: ReDrafterHead | HeadScorer, m: int) -> np.ndarray:
    """``(n, L-1, m)`` target ids of the ``m`` largest logits ``(n, L-1, K)``, best first."""
    m = min(m, logits.shape[-1])
    candidates = mx.argpartition(-logits, kth=m - 1, axis=-1)[..., :m]
    order = mx.argsort(-mx.take_along_axis(logits, candidates, axis=-1), axis=-1)
    ranked = mx.take_along_axis(candidates, order, axis=-1)
    return np.array(head.to_target_ids(ranked))


def beam_accepted(
    head: ReDrafterHead,
    embedding: Embedder,
    hidden: mx.array,
    windows: np.ndarray,
    in_loss: np.ndarray,
    width: int,
) -> np.ndarray:
    """``(n,)`` accepted drafts with ``width`` beams of length ``L`` at each position.

    Args:
        head, embedding: The head and the target's input embedding.
        hidden: ``(n, d)`` hidden states.
        windows: ``(n, L)`` windows (column 0 = ``g0``).
        in_loss: ``(n, L-1)`` which depth targets exist.
        width: ``W``.
    """
    length = windows.shape[1]
    search = mx.vmap(partial(beam_search, head, embedding, width=width, length=length))
    beams, _ = search(hidden, mx.array(windows[:, 0].astype(np.int32)))
    drafts = np.array(beams)[:, :, 1:]
    correct = (drafts == windows[:, None, 1:]) & in_loss[:, None, :]
    return leading_run(correct.reshape(-1, length - 1)).reshape(-1, width).max(axis=1)


def ahead_rows(table: PositionTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i + k`` (position ``t + k``) of every row ``i`` of ``rows`` ``(n,)``, ``k = 1 ..
    L-1``: ``(ahead (n, L-1), same (n, L-1))``; where ``t + k`` is not a row of the same
    sequence ``ahead`` repeats ``i`` and ``same`` is False. A sequence's rows are contiguous
    and in position order."""
    depth = np.arange(1, table.length, dtype=np.int64)
    ahead = rows[:, None].astype(np.int64) + depth[None, :]
    inside = ahead < table.size
    ahead = np.where(inside, ahead, rows[:, None])
    same = inside & (table.sequence[ahead] == table.sequence[rows][:, None])
    return np.where(same, ahead, rows[:, None]), same


def chain_acceptance(p: mx.array, q: mx.array) -> mx.array:
    """``(...)`` probability that the chain rule accepts a draft sampled from ``q``:
    ``sum min(p, q)`` over the last axis (``p``, ``q`` ``(..., K)`` on the same ids)."""
    return mx.minimum(p, q).sum(axis=-1)


def expected_run(rates: np.ndarray) -> np.ndarray:
    """``(n,)`` expected accepted drafts of chains whose depth ``k`` is accepted with
    probability ``rates[:, k]`` ``(n, D)`` once every earlier depth was."""
    return np.cumprod(rates, axis=1).sum(axis=1)


def sampled_chain_accepted(
    scorer: HeadScorer,
    table: PositionTable,
    features: np.ndarray,
    lm_head: Callable[[mx.array], mx.array],
    temperature: float,
    batch_size: int = 128,
) -> np.ndarray:
    """``(N,)`` expected drafts a sampled chain (``W = 1``) gets accepted at every row the
    engine can meet, at ``temperature`` (module docstring; 0 elsewhere).

    Args:
        scorer: The head over ``table``.
        table: Positions.
        features: ``(N, d)`` target hidden states of the rows.
        lm_head: The target's LM head ``(..., d) -> (..., V)``.
        temperature: ``T > 0``, applied to the target's and the head's logits alike.
        batch_size: Rows per forward.
    """
    if temperature <= 0:
        raise ValueError("a sampled chain needs a temperature > 0")
    expected = np.zeros(table.size)
    depths = table.length - 1
    rows_met = np.flatnonzero(table.at_inference)
    for lo in range(0, rows_met.size, batch_size):
        rows = rows_met[lo : lo + batch_size]
        logits = scorer.logits(rows)[:, :depths].astype(mx.float32)  # (n, D, K)
        draft_ids = scorer.to_target_ids(mx.arange(logits.shape[-1]))  # (K,)
        q = mx.softmax(logits / temperature, axis=-1)
        ahead, same = ahead_rows(table, rows)
        target = lm_head(mx.array(features[ahead]).astype(mx.float32)).astype(mx.float32)
        p = mx.softmax(target / temperature, axis=-1)[..., draft_ids]  # (n, D, K)
        rates = np.array(chain_acceptance(p, q)) * (same & table.in_loss[rows])
        expected[rows] = expected_run(rates)
    return expected


@dataclass
class RowMetrics:
    """What a head got right at every row of a :class:`PositionTable` (``N`` rows, ``D``
    depths); :func:`summarise` turns it into an :class:`EvalResult`, for all rows or for a
    subset (:meth:`take`) without running the head again.

    Attributes:
        within: ``(N, D, TOP_M)`` whether the depth target is among the head's ``m`` best.
        in_loss: ``(N, D)`` which depth targets exist.
        loss: ``(N,)`` summed per-depth cross-entropy of each row.
        accepted: ``(N,)`` accepted drafts at each row, by beam width (0 at rows the engine
            never meets when ``W > 1``).
    """

    within: np.ndarray
    in_loss: np.ndarray
    loss: np.ndarray
    accepted: dict[int, np.ndarray]

    def take(self, rows: np.ndarray) -> RowMetrics:
        """The metrics of ``rows`` (indices or a boolean mask over the ``N`` rows)."""
        return RowMetrics(
            self.within[rows],
            self.in_loss[rows],
            self.loss[rows],
            {w: a[rows] for w, a in self.accepted.items()},
        )


class HeadScorer(Protocol):
    """How :func:`row_metrics` runs one kind of head over table rows."""

    def logits(self, rows: np.ndarray) -> mx.array:
        """Draft logits ``(n, D, K)`` at table ``rows`` ``(n,)``."""
        ...

    def to_target_ids(self, ids: mx.array) -> mx.array:
        """Target ids of draft-vocabulary ids (any shape)."""
        ...

    def tree_accepted(self, rows: np.ndarray, logits: mx.array, width: int) -> np.ndarray:
        """``(n,)`` longest right run over the head's ``width`` beams at ``rows`` ``(n,)``,
        whose logits ``(n, D, K)`` are given."""
        ...


@dataclass
class ReDrafterScorer:
    """A ReDrafter head over a table's rows: teacher-forced depth logits, and the engine's
    beam search for ``W > 1``."""

    head: ReDrafterHead
    embedding: Embedder
    table: PositionTable
    #: ``(N, d)`` hidden states of the table's rows.
    features: np.ndarray

    def logits(self, rows: np.ndarray) -> mx.array:
        """``(n, L-1, K)`` logits with the true tokens fed to the recurrent state."""
        hidden = mx.array(self.features[rows]).astype(mx.float32)
        fed = embed_ids(self.embedding, self.table.windows[rows, :-1]).astype(mx.float32)
        return depth_logits(self.head, hidden, fed)

    def to_target_ids(self, ids: mx.array) -> mx.array:
        """Target ids of draft ids."""
        return self.head.to_target_ids(ids)

    def tree_accepted(self, rows: np.ndarray, logits: mx.array, width: int) -> np.ndarray:
        """Accepted drafts of the beam search at ``rows`` (``logits`` unused: beams depend
        on the drafted prefix)."""
        hidden = mx.array(self.features[rows]).astype(mx.float32)
        return beam_accepted(
            self.head,
            self.embedding,
            hidden,
            self.table.windows[rows],
            self.table.in_loss[rows],
            width,
        )


def row_metrics(
    scorer: HeadScorer,
    table: PositionTable,
    target_to_draft: np.ndarray | None,
    batch_size: int = 256,
    beam_widths: tuple[int, ...] = (),
) -> RowMetrics:
    """Run ``scorer`` over every row of ``table``, ``batch_size`` rows per forward.

    Args:
        scorer: The head (:class:`ReDrafterScorer` or the parallel head's scorer).
        table: The positions.
        target_to_draft: Training labels ``(V,)`` (for the loss), ``None`` = full vocabulary.
        batch_size: Rows per forward.
        beam_widths: Beam widths ``W > 1`` to simulate as well (at the rows the engine can
            meet only).
    """
    depths = table.length - 1
    within = np.zeros((table.size, depths, TOP_M), dtype=bool)
    losses = np.zeros(table.size)
    widths = [1, *sorted({w for w in beam_widths if w > 1})]
    accepted = {w: np.zeros(table.size, dtype=np.int64) for w in widths}
    for lo in range(0, table.size, batch_size):
        rows = np.arange(lo, min(lo + batch_size, table.size))
        windows, in_loss = table.windows[rows], table.in_loss[rows]
        logits = scorer.logits(rows)[:, :depths]
        labels, mask = draft_labels(windows, in_loss, target_to_draft)
        losses[rows] = np.array(masked_cross_entropy(logits, mx.array(labels), mx.array(mask), 1))
        ranked = _top_ids(logits, scorer, TOP_M)
        found = ranked == windows[:, 1:, None]
        hits = np.cumsum(found, axis=-1) > 0
        if hits.shape[-1] < TOP_M:
            hits = np.concatenate(
                [hits, np.repeat(hits[..., -1:], TOP_M - hits.shape[-1], axis=-1)], axis=-1
            )
        within[rows] = hits & in_loss[..., None]
        accepted[1][rows] = leading_run(found[..., 0] & in_loss)
        chain = np.flatnonzero(table.at_inference[rows])
        for width in widths[1:]:
            if chain.size:
                accepted[width][rows[chain]] = scorer.tree_accepted(
                    rows[chain], logits[mx.array(chain)], width
                )
    return RowMetrics(within, table.in_loss.copy(), losses, accepted)


def summarise(table: PositionTable, metrics: RowMetrics) -> EvalResult:
    """The :class:`EvalResult` of ``metrics`` over ``table`` (the rows they describe)."""
    counts = metrics.in_loss.sum(axis=0)
    chain_rows = table.at_inference
    with_loss = int(metrics.in_loss.any(axis=1).sum())
    return EvalResult(
        topk=metrics.within.sum(axis=0) / np.maximum(counts, 1)[:, None],
        counts=counts,
        loss=float(metrics.loss.sum() / max(1, with_loss)),
        positions=int(chain_rows.sum()),
        tokens_per_step={
            w: float(1.0 + a[chain_rows].mean()) if chain_rows.any() else float("nan")
            for w, a in metrics.accepted.items()
        },
        decode_tokens_per_step={
            w: decode_tokens_per_step(table, a) for w, a in metrics.accepted.items()
        },
        accepted=metrics.accepted,
    )


def scorer_for(
    head: ReDrafterHead | ParallelHead,
    embedding: Embedder,
    table: PositionTable,
    features: np.ndarray,
) -> HeadScorer:
    """The :class:`HeadScorer` of ``head``'s kind over ``table`` (features ``(N, d)``)."""
    from mlx_redrafter.drafters.parallel import ParallelHead
    from mlx_redrafter.train.parallel_evaluate import ParallelScorer

    if isinstance(head, ParallelHead):
        return ParallelScorer(head, embedding, table, features)
    return ReDrafterScorer(head, embedding, table, features)


def evaluate(
    head: ReDrafterHead | ParallelHead,
    embedding: Embedder,
    table: PositionTable,
    features: np.ndarray,
    target_to_draft: np.ndarray | None,
    batch_size: int = 256,
    beam_widths: tuple[int, ...] = (),
) -> EvalResult:
    """Held-out metrics of ``head`` (a ReDrafter or a parallel head, ``L <= k + 1``) over
    every row of ``table``.

    Args:
        head: The head.
        embedding: The target's input embedding ``(...) -> (..., d)``.
        table: Held-out positions.
        features: ``(N, d)`` hidden states of the table's rows.
        target_to_draft: Training labels ``(V,)`` (for the loss), ``None`` = full vocabulary.
        batch_size: Positions per forward.
        beam_widths: Beam widths ``W > 1`` to simulate as well.
    """
    scorer = scorer_for(head, embedding, table, features)
    return summarise(table, row_metrics(scorer, table, target_to_draft, batch_size, beam_widths))


def lookup_accepted(
    table: PositionTable, sequences: list[np.ndarray], ngram: int, width: int
) -> np.ndarray:
    """``(N,)`` drafts prompt lookup gets accepted at every row the engine can meet.

    At row ``t`` of sequence ``s`` the lookup sees ``sequences[s][: t + 2]`` (up to the root
    ``g0 = x_{t+1}``), proposes ``width`` beams of ``table.length`` tokens
    (:func:`~mlx_redrafter.drafters.prompt_lookup.lookup_beams`) and the longest valid run
    equal to the sequence counts. Rows the engine never meets stay 0.

    Args:
        table: Positions.
        sequences: ``(T_i,)`` token ids of every sequence the table indexes.
        ngram: Longest n-gram matched.
        width: Lookup beams.
    """
    from mlx_redrafter.drafters.prompt_lookup import lookup_beams

    accepted = np.zeros(table.size, dtype=np.int64)
    for row in np.flatnonzero(table.at_inference):
        tokens = np.asarray(sequences[int(table.sequence[row])], dtype=np.int64)
        seen = tokens[: int(table.position[row]) + 2]
        beams, valid = lookup_beams(seen, ngram, width, table.length)
        right = (beams[:, 1:] == table.windows[row, 1:]) & valid[:, 1:] & table.in_loss[row]
        accepted[row] = leading_run(right).max()
    return accepted
