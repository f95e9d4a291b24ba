"""The drafter seam: what every drafter gives the engine and what it is told back.

A drafter only *proposes*. It never touches the target's KV cache, never decides what is
accepted and never samples the output; the engine (``engine.py``) owns those. Every
proposal is a set of ``W`` beams of length ``L`` that all start with the root token ``g0``
(the token the target emitted last, not yet in the target's cache); beams that share a
prefix are merged into one prefix tree by :mod:`mlx_redrafter.tree`.

Two kinds of drafters, told apart by :attr:`Drafter.needs_host_tokens`:

* *Pipelined* drafters (``False``: ReDrafter) propose from lazy device inputs (the target's
  hidden state and root token) before the previous step's acceptance is read; their
  arrays are evaluated together with that acceptance in the step's single host
  synchronisation.
* *Host* drafters (``True``: prompt lookup, draft models) need the complete token list;
  the engine asks them right after the synchronisation, with ``context.tokens`` ending in
  the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import mlx.core as mx

from mlx_redrafter.sampling import SamplingParams


@dataclass
class DraftContext:
    """What the engine knows when it asks for a draft.

    Attributes:
        hidden: ``(d,)`` target's final-norm hidden state at the last accepted position
            (lazy).
        root: ``()`` int32, the root token ``g0`` the target produced there (lazy).
        position: ``()`` int32, index of ``root`` in the full token sequence (prompt +
            output), i.e. the number of tokens before it (lazy).
        tokens: Host list of the tokens known on the host when the draft is requested
            (prompt + output so far; the engine keeps appending to it, so read it during
            ``propose`` only). For host drafters (``needs_host_tokens``) it is complete:
            it ends with ``root`` and ``len(tokens) == position + 1``. Pipelined drafters
            are asked before the previous step's acceptance is read, so for them it may
            end up to ``L`` tokens before ``position``; use it only for slow-moving context.
        params: The target's sampling settings. Drafters that sample (draft models at
            ``temp > 0``) draw from their own logits under the same transforms, which
            keeps the proposal ``q`` close to the target's ``p``.
        recent_hidden: ``(C, d)`` hidden states of the last ``C`` accepted positions,
            oldest first, the last row equal to ``hidden`` (lazy); only for drafters that
            declare ``hidden_window = C > 1`` (see :mod:`mlx_redrafter.hidden_window`),
            else ``None``.
        recent_count: ``()`` int32, how many of the last rows of ``recent_hidden`` are
            real (lazy; the front rows are padding early in a sequence), or ``None``.
        recent_tokens: ``(C,)`` int32, the token that followed each row of
            ``recent_hidden`` (the last is ``root``; lazy), or ``None``.
    """

    hidden: mx.array
    root: mx.array
    position: mx.array
    tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    recent_hidden: mx.array | None = None
    recent_count: mx.array | None = None
    recent_tokens: mx.array | None = None


@dataclass
class Draft:
    """A drafter's proposal.

    Attributes:
        beams: ``(W, L)`` int32 target-vocabulary ids; ``beams[:, 0] == root``.
        draft_logprobs: ``(W, L-1, V)`` float32 log-probabilities of the drafter's own
            proposal distribution ``q`` at each drafted position, in target-vocabulary
            space, or ``None`` for deterministic drafts (beam search, lookup), which the
            exact rule verifies with ``q = 1`` on the chosen tokens. For a stochastic
            drafter the drafted tokens are samples from exactly this ``q`` (the chain
            rule needs that).
        valid: ``(W, L)`` bool, or ``None`` when every position is a real draft. An invalid
            position and every later position of its beam are neither verified nor
            accepted (for drafters that propose fewer than ``L - 1`` tokens, e.g. prompt
            lookup without a long enough match); ``valid[:, 0]`` (the root) is ignored.
        proposal: ``(L-1, V)`` float32 normalised log-probabilities, or ``None``: beam 0's
            drafted token ``j + 1`` was *sampled* from ``softmax(proposal[j])`` (target
            vocabulary), the other beams are deterministic. The exact walk then tests
            beam 0's tokens with ``min(1, p/q)`` (a ReDrafter head's sampled chain,
            alone or in a combined tree; see :mod:`mlx_redrafter.accept`). Beam 0 must
            be fully valid.
        state: Arrays the drafter keeps for its next proposal (e.g. a draft KV cache),
            evaluated in the step's synchronisation with the beams so that no graph
            grows across steps.
    """

    beams: mx.array
    draft_logprobs: mx.array | None = None
    valid: mx.array | None = None
    proposal: mx.array | None = None
    state: list[mx.array] = field(default_factory=list)


@runtime_checkable
class Drafter(Protocol):
    """Anything that proposes beams for the engine to verify.

    An optional attribute ``hidden_window: int`` (``C``; 1 when absent) asks the engine
    for the hidden states of the last ``C`` accepted positions in
    ``DraftContext.recent_hidden`` (the parallel head reads them).

    An optional method ``prime(hidden, next_tokens)`` receives the target's states at every
    prompt position ``(P, d)`` and the token after each ``(P,)`` (the prompt shifted by one,
    then the root) after the prompt pass (lazy; the feature-level head builds its own
    cache from them).

    ``prime`` may take a third argument ``start``: the states are then those of positions
    ``start ..`` of a sequence continued from a prompt cache (see below).

    Drafters that keep per-sequence state may follow a prompt cache
    (:mod:`mlx_redrafter.prompt_cache`) with two optional methods: ``save_sequence()``
    returns the state (the engine stores it in the cache after every step), and
    ``restore_sequence(state, length) -> int`` continues that saved sequence when only its
    first ``length`` tokens are known to be unchanged, returning how many it keeps
    (``<= length``). Drafters without them are ``reset`` on every call.

    An optional method ``complete(draft, context, width, length) -> Draft`` is called by
    the engine right after each step's host synchronisation, with ``context.tokens``
    complete, on the draft :meth:`propose` returned (before the synchronisation, for a
    pipelined drafter); it returns the draft to verify. A drafter with a pipelined part and
    a host part (:class:`~mlx_redrafter.drafters.combined.CombinedDrafter`) adds its host
    beams there, so the step keeps a single synchronisation.
    """

    #: ``True`` if, whenever ``Draft.draft_logprobs`` is set, the drafts are *sampled*
    #: from it (draft models at T > 0; verified by the chain rule); ``False`` for
    #: deterministic proposals (verified by the exact tree walk).
    stochastic: bool

    #: ``True`` if :meth:`propose` needs ``context.tokens`` complete up to the root (host
    #: drafters: prompt lookup, draft models); ``False`` if it drafts from the lazy
    #: ``hidden``/``root`` before the step's host synchronisation (ReDrafter). Drafters
    #: without the attribute are treated as ``False``.
    needs_host_tokens: bool

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence whose prompt is ``prompt_tokens``."""
        ...

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """Propose ``width`` beams of ``length`` tokens (root included) for ``context``."""
        ...

    def accepted(self, tokens: list[int]) -> None:
        """The engine accepted ``tokens`` (drafted tokens then the target's own token)."""
        ...
