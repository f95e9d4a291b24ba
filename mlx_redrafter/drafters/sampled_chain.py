"""A ReDrafter head *samples* one chain of drafts (``W = 1``, sampling only).

Beam search proposes the head's most likely tokens; a sampling target accepts such a
deterministic draft ``x`` with probability ``p(x)`` only. Drawing the draft from the head's
own distribution ``q`` instead, and testing it with the speculative-sampling ratio
``min(1, p(x) / q(x))``, accepts with probability ``sum_x min(p(x), q(x))``, which is
larger whenever ``q`` resembles ``p`` (the exact walk in :mod:`mlx_redrafter.accept`
applies that test to the first beam of a tree whose ``Draft.proposal`` is set).

Token ``j + 1`` of the chain is drawn from ``q_j = softmax(params.logits(head logits))``:
the head's distribution over its draft vocabulary under the *target's* sampling
transforms (temperature, top-p, min-p, top-k), like a draft model at ``temp > 0``. The
draw is a Gumbel-max over noise made outside the compiled graph from MLX's global
generator, so ``mx.random.seed`` makes a run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import mlx.core as mx

from mlx_redrafter.drafters.beam_search import Embedder, RecurrentHead, compile_with_head
from mlx_redrafter.sampling import SamplingParams


def sample_chain(
    head: RecurrentHead,
    embedding: Embedder,
    params: SamplingParams,
    hidden: mx.array,
    root: mx.array,
    gumbel: mx.array,
) -> tuple[mx.array, mx.array]:
    """Draw one chain from the head, as a pure MLX graph (what :class:`ChainSampler` compiles).

    Args:
        head: The draft head (``K`` outputs).
        embedding: The target's input embedding ``(1,) -> (1, d)``.
        params: The target's sampling settings (not greedy).
        hidden: ``(d,)`` target hidden state at the last accepted position.
        root: ``()`` (or ``(1,)``) int32 root token ``g0``.
        gumbel: ``(L-1, K)`` standard Gumbel noise, one row per drafted token.

    Returns:
        ``chain (1, L)`` int32 target ids (column 0 = ``g0``) and ``log_q (L-1, K)``
        float32, the normalised log-probabilities each drafted token was drawn from
        (draft-vocabulary space; ``-inf`` where the transforms exclude a token).
    """
    context = hidden.reshape(1, -1)
    last = root.reshape(1).astype(mx.int32)
    state = head.initial_state((1,))
    chain = [last]
    log_q = []
    for j in range(gumbel.shape[0]):
        state = head.rnn_step(state, embedding(last))
        weights = params.logits(head.logits(context, state).astype(mx.float32))[0]  # (K,)
        step = weights - mx.logsumexp(weights, keepdims=True)
        drawn = mx.argmax(step + gumbel[j], keepdims=True).astype(mx.int32)  # (1,)
        last = head.to_target_ids(drawn)
        chain.append(last)
        log_q.append(step)
    return mx.concatenate(chain)[None], mx.stack(log_q)


def _params_key(params: SamplingParams) -> tuple:
    return (params.temp, params.top_p, params.min_p, params.top_k, params.min_tokens_to_keep)


class ChainSampler:
    """Samples chains from one head over one embedding; one compiled graph per
    ``(L, sampling settings)``.

    Args:
        head: The draft head.
        embedding: The target's input embedding module or a callable ``(1,) -> (1, d)``.
        compile: Set ``False`` to run eagerly (for debugging).
    """

    def __init__(self, head: RecurrentHead, embedding: Embedder, compile: bool = True):
        self.head = head
        self.embedding = embedding
        self.compile = compile
        self._functions: dict[tuple, Callable[..., tuple[mx.array, mx.array]]] = {}

    def function(self, params: SamplingParams) -> Callable[..., tuple[mx.array, mx.array]]:
        """The (cached) graph ``(hidden, root, gumbel) -> (chain, log_q)`` for ``params``."""
        if params.greedy:
            raise ValueError("a sampled chain needs temp > 0 (greedy drafts use beam search)")
        if params.top_k >= self.head.config.output_size:
            params = replace(params, top_k=0)  # keeps every draft id anyway
        key = _params_key(params)
        if key not in self._functions:
            fn = partial(sample_chain, self.head, self.embedding, params)
            if self.compile:
                fn = compile_with_head(fn, self.head, self.embedding)
            self._functions[key] = fn
        return self._functions[key]

    def __call__(
        self, hidden: mx.array, root: mx.array, length: int, params: SamplingParams
    ) -> tuple[mx.array, mx.array]:
        """Draw a chain of ``L = length`` tokens (root included), lazily.

        Returns:
            ``chain (1, L)`` int32 target ids and ``log_q (L-1, V)`` float32 in
            target-vocabulary space (``-inf`` off the head's draft vocabulary).
        """
        if length < 2:
            raise ValueError(f"need length >= 2, got L={length}")
        k = self.head.config.output_size
        gumbel = mx.random.gumbel(shape=(length - 1, k))
        chain, log_q = self.function(params)(hidden, root, gumbel)
        return chain, to_target_space(log_q, self.head.draft_vocab, self.head.config.vocab_size)


def to_target_space(log_q: mx.array, draft_vocab: mx.array | None, vocab_size: int) -> mx.array:
    """``(R, K)`` draft-vocabulary log-probabilities as ``(R, V)`` (``-inf`` elsewhere)."""
    if draft_vocab is None:
        return log_q
    out = mx.full((log_q.shape[0], vocab_size), -mx.inf, dtype=mx.float32)
    out[:, draft_vocab] = log_q
    return out
