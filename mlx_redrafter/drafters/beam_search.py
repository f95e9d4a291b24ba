"""Beam search over a ReDrafter head: ``W`` beams of ``L`` tokens (``g0`` + ``L-1`` drafts).

Beam 0 starts alone (the others at log-probability ``-inf``, so beams never duplicate).
Each step updates the recurrent state of every beam with the embedding of its last token,
takes the log-softmax of the head's logits ``(W, K)``, adds each beam's cumulative
log-probability, keeps the best ``W`` of the ``W * K`` candidates (token = index mod ``K``,
parent = index div ``K``) and gathers states and histories by parent.

The search is one lazy MLX graph per ``(W, L)`` (compiled and cached by
:class:`BeamSearcher`): no host synchronisation, no branching on array values. Beams are
ordered by cumulative log-probability, best first, ties broken by candidate index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from mlx_redrafter.drafters.logit_warp import warp_top_k

#: The target's input embedding: a module or any callable ``(W,) int32 -> (W, d)``.
Embedder = nn.Module | Callable[[mx.array], mx.array]


class RecurrentHead(Protocol):
    """What beam search and the sampled chain use of a recurrent draft head
    (:class:`~mlx_redrafter.drafters.redrafter.ReDrafterHead` is one): ``K`` outputs
    (``config.output_size``), a recurrent state of size ``d``."""

    @property
    def config(self) -> Any: ...

    @property
    def draft_vocab(self) -> mx.array | None: ...

    def initial_state(self, batch_shape: tuple[int, ...] = ()) -> mx.array:
        """``s_0`` ``(*batch_shape, d)``."""
        ...

    def rnn_step(self, state: mx.array, emb: mx.array) -> mx.array:
        """``s_{t-1}, e(g_{t-1}) -> s_t``, shapes ``(..., d)``."""
        ...

    def logits(self, h: mx.array, state: mx.array) -> mx.array:
        """Draft logits ``(..., K)`` from ``h`` ``(..., d)`` and ``s_t`` ``(..., d)``."""
        ...

    def to_target_ids(self, ids: mx.array) -> mx.array:
        """Draft ids ``(...)`` in ``[0, K)`` to target ids ``(...)``."""
        ...


@dataclass
class BeamSearchResult:
    """Output of one beam search (all arrays lazy).

    Attributes:
        beams: ``(W, L)`` int32 target ids, column 0 = ``g0``, best beam first.
        scores: ``(W,)`` float32 cumulative draft log-probability of each beam.
        valid: ``(W, L)`` bool when ``W > K`` (then fewer than ``W`` distinct beams may
            exist and beams with score ``-inf`` are marked invalid after ``g0``), else
            ``None`` (every beam is a distinct, real draft).
        logprobs: ``(W, L-1, K)`` float32 head log-probabilities at each drafted position
            of each beam (draft-vocabulary space), or ``None`` if not requested.
        draft_vocab: ``(K,)`` int32 target ids of a reduced draft vocabulary, or ``None``.
    """

    beams: mx.array
    scores: mx.array
    valid: mx.array | None = None
    logprobs: mx.array | None = None
    draft_vocab: mx.array | None = None

    def target_logprobs(self, vocab_size: int) -> mx.array:
        """``logprobs`` in target-vocabulary space ``(W, L-1, V)`` (``-inf`` off the draft vocab).

        Raises:
            ValueError: if the search was run without ``with_logprobs``.
        """
        if self.logprobs is None:
            raise ValueError("beam search was run without with_logprobs=True")
        if self.draft_vocab is None:
            if self.logprobs.shape[-1] != vocab_size:
                raise ValueError(
                    f"vocab_size {vocab_size} does not match the head's {self.logprobs.shape[-1]}"
                )
            return self.logprobs
        out = mx.full((*self.logprobs.shape[:-1], vocab_size), -mx.inf, dtype=mx.float32)
        out[..., self.draft_vocab] = self.logprobs
        return out


def compile_with_head(fn: Callable, head: nn.Module, embedding: Embedder) -> Callable:
    """``mx.compile(fn)`` with the head's (and an embedding module's) arrays declared as
    inputs, so later weight updates (e.g. while training) are seen; a plain-callable
    embedding's arrays are captured as constants."""
    inputs = [head]
    if isinstance(embedding, nn.Module):
        inputs.append(embedding)
    return mx.compile(fn, inputs=inputs)


def sorted_top(scores: mx.array, k: int) -> mx.array:
    """Indices ``(k,)`` of the ``k`` largest of ``scores`` ``(N,)``, best first.

    Equal scores are ordered by index (ascending), so the order is deterministic; which
    of several equal scores at the cut-off is kept is up to ``argpartition``.
    """
    if k == 1:
        return mx.argmax(scores, keepdims=True).astype(mx.int32)
    idx = mx.argpartition(-scores, kth=k - 1)[:k].astype(mx.int32)
    top = scores[idx]
    # rank[i] = number of candidates that come before i; a permutation of 0..k-1.
    before = (top[None, :] > top[:, None]) | (
        (top[None, :] == top[:, None]) & (idx[None, :] < idx[:, None])
    )
    rank = before.astype(mx.int32).sum(axis=1)
    return idx[mx.argsort(rank)]


def beam_search(
    head: RecurrentHead,
    embedding: Embedder,
    hidden: mx.array,
    root: mx.array,
    width: int,
    length: int,
    with_logprobs: bool = False,
    top_k: int | None = None,
) -> tuple[mx.array, ...]:
    """The search as a pure MLX graph (what :class:`BeamSearcher` compiles).

    Args:
        head: The draft head (``K`` outputs, recurrent state size ``d``).
        embedding: The target's input embedding ``(W,) -> (W, d)``.
        hidden: ``(d,)`` target hidden state at the last accepted position.
        root: ``()`` (or ``(1,)``) int32 root token ``g0``.
        width: ``W`` beams.
        length: ``L`` tokens per beam including ``g0`` (``L - 1`` head steps).
        with_logprobs: Also return the per-step head log-probabilities.
        top_k: Apple's warp of the head's logits before the log-softmax
            (:func:`~mlx_redrafter.drafters.logit_warp.warp_top_k`), or ``None``.

    Returns:
        ``(beams (W, L) int32, scores (W,) float32)`` and, with ``with_logprobs``,
        ``logprobs (W, L-1, K) float32``.
    """
    k = head.config.output_size
    context = hidden.reshape(1, -1)
    last = mx.broadcast_to(root.reshape(1).astype(mx.int32), (width,))
    history = last[:, None]
    state = head.initial_state((width,))
    scores = mx.concatenate(
        [mx.zeros((1,), mx.float32), mx.full((width - 1,), -mx.inf, dtype=mx.float32)]
    )
    logprobs = mx.zeros((width, 0, k), mx.float32)
    for _ in range(length - 1):
        state = head.rnn_step(state, embedding(last))
        logits = head.logits(context, state).astype(mx.float32)
        if top_k is not None:
            logits = warp_top_k(logits, top_k)
        step_lp = nn.log_softmax(logits, axis=-1)
        candidates = (scores[:, None] + step_lp).reshape(-1)
        chosen = sorted_top(candidates, width)
        scores = candidates[chosen]
        parent = chosen // k
        last = head.to_target_ids(chosen % k)
        history = mx.concatenate([history[parent], last[:, None]], axis=1)
        state = state[parent]
        if with_logprobs:
            logprobs = mx.concatenate([logprobs[parent], step_lp[parent][:, None]], axis=1)
    if with_logprobs:
        return history, scores, logprobs
    return history, scores


class BeamSearcher:
    """Beam search of one head over one embedding, one compiled graph per shape.

    Compiled functions are cached by ``(W, L, with_logprobs)``; the head's (and the
    embedding module's) arrays are declared as compile inputs, so updating the head's
    weights (e.g. while training) is seen by later calls.

    Args:
        head: The draft head.
        embedding: The target's input embedding module or a callable ``(W,) -> (W, d)``
            (a plain callable's arrays are captured as constants).
        compile: Set ``False`` to run the search eagerly (for debugging).
        top_k: Warp the head's logits to their top ``top_k`` before the log-softmax, as
            Apple's beam search does (``50``); ``None`` (default): no warp.
    """

    def __init__(
        self,
        head: RecurrentHead,
        embedding: Embedder,
        compile: bool = True,
        top_k: int | None = None,
    ):
        self.head = head
        self.top_k = top_k
        self.embedding = embedding
        self.compile = compile
        self._functions: dict[tuple[int, int, bool], Callable[..., tuple[mx.array, ...]]] = {}

    def function(self, width: int, length: int, with_logprobs: bool = False) -> Callable:
        """The (cached) search function for ``(W, L)``: ``(hidden, root) -> outputs``."""
        if width < 1 or length < 2:
            raise ValueError(f"need width >= 1 and length >= 2, got W={width}, L={length}")
        key = (width, length, with_logprobs)
        if key not in self._functions:
            fn = partial(
                beam_search,
                self.head,
                self.embedding,
                width=width,
                length=length,
                with_logprobs=with_logprobs,
                top_k=self.top_k,
            )
            if self.compile:
                fn = compile_with_head(fn, self.head, self.embedding)
            self._functions[key] = fn
        return self._functions[key]

    def __call__(
        self,
        hidden: mx.array,
        root: mx.array,
        width: int,
        length: int,
        with_logprobs: bool = False,
    ) -> BeamSearchResult:
        """Search ``W`` beams of length ``L`` from ``hidden`` ``(d,)`` and ``root`` ``()``."""
        outputs = self.function(width, length, with_logprobs)(hidden, root)
        beams, scores = outputs[0], outputs[1]
        valid = None
        if width > self.head.config.output_size:
            finite = mx.isfinite(scores)[:, None]
            first = mx.arange(length)[None, :] == 0
            valid = first | finite
        return BeamSearchResult(
            beams=beams,
            scores=scores,
            valid=valid,
            logprobs=outputs[2] if with_logprobs else None,
            draft_vocab=self.head.draft_vocab,
        )
