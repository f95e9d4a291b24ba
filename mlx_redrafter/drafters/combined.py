"""Several drafters in one tree: e.g. a draft head's beams plus prompt-lookup beams.

Drafters fail in different places. A draft head predicts from the target's hidden state
and is right on fluent, predictable text; prompt lookup copies spans the output repeats
from the prompt or from itself (lists, code, restated questions), which a small head
rarely predicts. Their beams go into one prefix tree, which the target verifies in one
forward pass, so a step accepts whichever proposal runs longest.

:class:`CombinedDrafter` gives the engine's beam width ``W`` to its first drafter (the
*primary*) and a fixed number of beams to each further one. Its proposal is the members'
beams stacked along ``W``: ``(W + sum(extra widths), L)``, with the members' ``valid``
masks (prompt lookup marks positions without a match invalid, so a step without a match
costs no extra verification).

Pipelining: members that draft from the lazy hidden state (ReDrafter, the parallel head)
propose before the step's host synchronisation, as they would alone; members that need the
complete token list (prompt lookup) add their beams in :meth:`CombinedDrafter.complete`,
which the engine calls right after that synchronisation. The step keeps its single
synchronisation.

Exactness: the combined tree is verified by the exact tree walk (or greedy matching),
which is exact for any candidate tree built without looking at the target's own random
draws, so the members' proposal distributions are not needed: ``draft_logprobs`` is
``None`` and ``stochastic`` is ``False`` (the ReDrafter rule, which needs the head's
log-probabilities, is not available). A primary that samples its chain (a ReDrafter head
at ``temp > 0``, ``W = 1``) passes its ``proposal`` on as beam 0's, so the walk tests
that beam with ``min(1, p/q)`` and the lookup beams as deterministic candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlx_redrafter.drafters.base import Draft, DraftContext, Drafter


def stack_drafts(drafts: Sequence[Draft]) -> Draft:
    """The beams of ``drafts`` (each ``(W_i, L)``, same root) stacked: ``(sum W_i, L)``.

    The result's ``valid`` is the members' masks stacked (all-true for a member without
    one); ``draft_logprobs`` is dropped (see the module docstring). The first draft's
    ``proposal`` (a sampled chain as beam 0) is kept; the others' are dropped (their
    beams are then verified as deterministic candidates, which stays exact).
    """
    if not drafts:
        raise ValueError("stack_drafts needs at least one draft")
    lengths = {int(d.beams.shape[1]) for d in drafts}
    if len(lengths) != 1:
        raise ValueError(f"drafts of different beam lengths cannot be stacked: {sorted(lengths)}")
    beams = mx.concatenate([d.beams.astype(mx.int32) for d in drafts], axis=0)
    proposal = drafts[0].proposal
    state = [a for d in drafts for a in d.state]
    if all(d.valid is None for d in drafts):
        return Draft(beams=beams, proposal=proposal, state=state)
    valid = mx.concatenate(
        [mx.ones(d.beams.shape, dtype=mx.bool_) if d.valid is None else d.valid for d in drafts],
        axis=0,
    )
    return Draft(beams=beams, valid=valid, proposal=proposal, state=state)


class CombinedDrafter:
    """Stacks the proposals of several drafters into one tree (module docstring).

    Args:
        primary: Gets the engine's beam width ``W``.
        extras: Further drafters, each with the fixed number of beams it proposes
            (``>= 1``), e.g. ``[(PromptLookupDrafter(), 1)]``.

    Raises:
        ValueError: When no extra drafter is given or a width is below 1.
    """

    stochastic: bool = False

    def __init__(self, primary: Drafter, extras: Sequence[tuple[Drafter, int]]):
        if not extras:
            raise ValueError("CombinedDrafter needs at least one extra drafter")
        if any(width < 1 for _, width in extras):
            raise ValueError(f"extra drafters need widths >= 1, got {[w for _, w in extras]}")
        self.primary = primary
        self.extras = [(drafter, int(width)) for drafter, width in extras]
        members = [primary, *(d for d, _ in self.extras)]
        self._host = [bool(getattr(d, "needs_host_tokens", False)) for d in members]
        #: Every member needs host tokens: propose everything after the synchronisation.
        self.needs_host_tokens = all(self._host)
        #: Recent hidden states the members ask for (the largest window).
        self.hidden_window = max(int(getattr(d, "hidden_window", 1)) for d in members)
        taps = {getattr(d, "feature_layers", None) for d in members} - {None}
        if len(taps) > 1:
            raise ValueError(f"members read different target layers: {sorted(taps)}")
        #: Target layers whose inputs the members read (see ``Target(taps=...)``).
        self.feature_layers = taps.pop() if taps else None

    @property
    def members(self) -> list[tuple[Drafter, int | None]]:
        """``(drafter, width)`` pairs; the primary's width is ``None`` (the engine's ``W``)."""
        return [(self.primary, None), *self.extras]

    def _propose(
        self, context: DraftContext, width: int, length: int, host: bool | None
    ) -> list[Draft]:
        """Proposals of the members with ``needs_host_tokens == host`` (``None``: all)."""
        drafts = []
        for (drafter, fixed), needs_host in zip(self.members, self._host, strict=True):
            if host is None or needs_host == host:
                drafts.append(drafter.propose(context, width if fixed is None else fixed, length))
        return drafts

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence in every member."""
        for drafter, _ in self.members:
            drafter.reset(prompt_tokens)

    def __getattr__(self, name: str):
        # ``prime`` exists when a member has one (the engine checks with getattr)
        if name == "prime":
            primed = [d for d, _ in self.members if callable(getattr(d, "prime", None))]
            if primed:

                def prime(hidden: mx.array, next_tokens: mx.array, start: int = 0) -> None:
                    for drafter in primed:
                        if start:
                            drafter.prime(hidden, next_tokens, start)
                        else:
                            drafter.prime(hidden, next_tokens)

                return prime
        raise AttributeError(name)

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """The pipelined members' beams (lazy), or every member's when all need host tokens.

        Host members' beams follow in :meth:`complete` (the engine calls it).
        """
        host = None if self.needs_host_tokens else False
        return stack_drafts(self._propose(context, width, length, host))

    def complete(self, draft: Draft, context: DraftContext, width: int, length: int) -> Draft:
        """Append the host members' beams to ``draft``; ``context.tokens`` ends at the root."""
        if self.needs_host_tokens or not any(self._host):
            return draft
        return stack_drafts([draft, *self._propose(context, width, length, True)])

    def save_sequence(self) -> list:
        """Every member's saved sequence state (``None`` for members without one)."""
        saved = []
        for drafter, _ in self.members:
            save = getattr(drafter, "save_sequence", None)
            saved.append(save() if callable(save) else None)
        return saved

    def restore_sequence(self, state: list, length: int) -> int:
        """Restore every member (reset those without a state); returns the smallest
        length any member keeps."""
        keep = length
        for (drafter, _), saved in zip(self.members, state, strict=True):
            restore = getattr(drafter, "restore_sequence", None)
            if callable(restore) and saved is not None:
                keep = min(keep, int(restore(saved, length)))
            elif callable(getattr(drafter, "prime", None)):
                keep = 0  # a primed member without its state reads the sequence again
        return keep

    def accepted(self, tokens: list[int]) -> None:
        """Tell every member what was accepted."""
        for drafter, _ in self.members:
            drafter.accepted(tokens)
