"""The target's hidden states at the last ``C`` accepted positions, kept lazily by the engine.

Drafters that read more than the last hidden state (the parallel head reads ``C``) declare
``hidden_window = C``; the engine then keeps a :class:`HiddenWindow` next to the cache and
passes it in :class:`~mlx_redrafter.drafters.base.DraftContext`. Advancing it after a step
is a gather with the lazy accepted length as offset: no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class HiddenWindow:
    """The last ``C`` accepted hidden states (lazy).

    Attributes:
        rows: ``(C, d)`` oldest first; the last row is the last accepted position's state.
        count: ``()`` int32, how many of the last rows are real (the rest, at the front,
            are zero padding: the sequence is shorter than ``C``).
        tokens: ``(C,)`` int32 token that followed each row (the last: the root), or
            ``None`` when not kept.
    """

    rows: mx.array
    count: mx.array
    tokens: mx.array | None = None

    @classmethod
    def start(
        cls, recent: mx.array, size: int, next_tokens: mx.array | None = None
    ) -> HiddenWindow:
        """A window of ``size`` rows from the prompt's last hidden states ``(n, d)`` (and
        the tokens after them ``(n,)``, when kept)."""
        n = recent.shape[0]
        if n >= size:
            tokens = None if next_tokens is None else next_tokens[n - size :]
            return cls(recent[n - size :], mx.array(size, mx.int32), tokens)
        pad = mx.zeros((size - n, recent.shape[1]), recent.dtype)
        tokens = None
        if next_tokens is not None:
            tokens = mx.concatenate([mx.zeros((size - n,), mx.int32), next_tokens])
        return cls(mx.concatenate([pad, recent]), mx.array(n, mx.int32), tokens)

    def advance(
        self, path_hidden: mx.array, num_accepted: mx.array, path_next: mx.array | None = None
    ) -> HiddenWindow:
        """The window after a step that kept path nodes ``0 .. num_accepted``.

        Args:
            path_hidden: ``(P, d)`` hidden states of the chosen path's nodes, root first
                (``P > num_accepted``; entries past ``num_accepted`` are ignored).
            num_accepted: ``()`` int32 accepted drafts (lazy).
            path_next: ``(P,)`` the token after each path node (kept tokens only).
        """
        size = self.rows.shape[0]
        stacked = mx.concatenate([self.rows, path_hidden.astype(self.rows.dtype)])
        index = mx.arange(size) + num_accepted + 1
        count = mx.minimum(self.count + num_accepted + 1, size).astype(mx.int32)
        tokens = None
        if self.tokens is not None and path_next is not None:
            tokens = mx.concatenate([self.tokens, path_next.astype(mx.int32)])[index]
        return HiddenWindow(stacked[index], count, tokens)
