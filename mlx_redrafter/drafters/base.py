"""The drafter seam: what every drafter gives the engine and what it is told back.

A drafter only *proposes*. It never touches the target's KV cache, never decides what is
accepted and never samples the output; the engine (``generate.py``) owns those. Every
proposal is a set of ``W`` beams of length ``L`` that all start with the root token ``g0``
(the token the target emitted last, not yet in the target's cache); beams that share a
prefix are merged into one prefix tree by :mod:`mlx_redrafter.tree`.

Arrays in a :class:`Draft` may be lazy: the engine evaluates them together with the
previous step's acceptance in a single host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import mlx.core as mx


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
            (prompt + output so far). Drafters proposing from lazy inputs are asked before
            the previous step's acceptance is read, so for them this list may end up to
            ``L`` tokens before ``position``; use it only for slow-moving context.
    """

    hidden: mx.array
    root: mx.array
    position: mx.array
    tokens: list[int]


@dataclass
class Draft:
    """A drafter's proposal.

    Attributes:
        beams: ``(W, L)`` int32 target-vocabulary ids; ``beams[:, 0] == root``.
        draft_logprobs: ``(W, L-1, V)`` float32 log-probabilities of the drafter's own
            proposal distribution ``q`` at each drafted position, in target-vocabulary
            space, or ``None`` for deterministic drafts (beam search, lookup), which the
            exact rule verifies with ``q = 1`` on the chosen tokens.
        valid: ``(W, L)`` bool, or ``None`` when every position is a real draft. Positions
            after the first invalid one of a beam are never accepted (for drafters that
            propose fewer than ``L - 1`` tokens, e.g. prompt lookup without a match).
    """

    beams: mx.array
    draft_logprobs: mx.array | None = None
    valid: mx.array | None = None


@runtime_checkable
class Drafter(Protocol):
    """Anything that proposes beams for the engine to verify."""

    #: ``True`` if ``Draft.draft_logprobs`` is set and drafts are *sampled* from it
    #: (draft models at T > 0); ``False`` for deterministic proposals.
    stochastic: bool

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence whose prompt is ``prompt_tokens``."""
        ...

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """Propose ``width`` beams of ``length`` tokens (root included) for ``context``."""
        ...

    def accepted(self, tokens: list[int]) -> None:
        """The engine accepted ``tokens`` (drafted tokens then the target's own token)."""
        ...
