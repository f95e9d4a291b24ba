"""The target's token strings as a trie, read through the draft model's tokens (host side).

String-level rejection sampling (:mod:`mlx_redrafter.drafters.slrs`) needs, for a string
``u`` the draft model has written so far, which draft tokens ``d`` complete a target token
(``u + bytes(d)`` is a target token's byte string: *terminal*) and which keep ``u`` on its
way to one (``u + bytes(d)`` is not a target token but a proper prefix of one: *open*).
Every other draft token leads nowhere (no target token starts with that string).

The trie is the sorted list of the target's byte strings: the target tokens that start
with ``u`` are one contiguous range of it (``bisect``), and the children of ``u`` are read
off that range by splitting each token's rest into a draft token and what remains.
:meth:`StringTrie.children` caches its answers (they depend on the vocabularies only).

Byte strings come from :func:`~mlx_redrafter.drafters.vocab_map.token_bytes` (space
markers and byte tokens normalised). Special and added tokens have no byte string; a draft
special token is terminal at the first step when the target has one of the same text (the
TLI map's rule, so a shared end-of-turn token can be proposed).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import numpy as np

from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError, token_bytes


class StringTrie:
    """Target token strings and the draft tokens that spell them (module doc).

    Args:
        target_strings: Byte string of every ordinary target id.
        draft_strings: Byte string of every ordinary draft id.
        draft_size: ``V_d``, the draft model's number of logits (ids past it are ignored).
        specials: ``(draft id, target id)`` pairs of special tokens with the same text.

    Attributes:
        strings: Byte string of every ordinary draft id below ``V_d``.
        root_target: ``(V_d,)`` int32, the target id a first draft token spells, ``-1``
            where it spells none.
        root_open: ``(V_d,)`` bool, first draft tokens that are open (module doc).
    """

    def __init__(
        self,
        target_strings: dict[int, bytes],
        draft_strings: dict[int, bytes],
        draft_size: int,
        specials: list[tuple[int, int]] = (),
    ):
        self.target_of: dict[bytes, int] = {}
        for index, raw in sorted(target_strings.items()):
            if raw:
                self.target_of.setdefault(raw, index)
        self.sorted = sorted(self.target_of)
        self.strings = {i: raw for i, raw in draft_strings.items() if raw and i < draft_size}
        self.draft_of: dict[bytes, list[int]] = {}
        for index, raw in sorted(self.strings.items()):
            self.draft_of.setdefault(raw, []).append(index)
        self.root_target = np.full(draft_size, -1, dtype=np.int32)
        self.root_open = np.zeros(draft_size, dtype=bool)
        for raw, ids in self.draft_of.items():
            target = self.target_of.get(raw)
            if target is not None:
                self.root_target[ids] = target
            else:
                self.root_open[ids] = self.extends(raw)
        for draft, target in specials:
            if draft < draft_size:
                self.root_target[draft] = target
        if not (self.root_target >= 0).any():
            raise VocabularyMismatchError(
                "no draft token spells a target token (compared as byte strings); the draft "
                "model cannot propose for this target"
            )
        self._children: dict[bytes, tuple[list[tuple[int, int]], list[int]]] = {}

    @classmethod
    def from_tokenizers(
        cls, target_tokenizer: Any, draft_tokenizer: Any, draft_size: int
    ) -> StringTrie:
        """The trie of ``target_tokenizer``'s strings read through ``draft_tokenizer``'s."""
        from mlx_redrafter.drafters.vocab_map import _added_tokens

        draft_added = {t.content: i for i, t in _added_tokens(draft_tokenizer)}
        specials = [
            (draft_added[t.content], i)
            for i, t in _added_tokens(target_tokenizer)
            if t.content in draft_added
        ]
        return cls(
            token_bytes(target_tokenizer), token_bytes(draft_tokenizer), draft_size, specials
        )

    def extends(self, prefix: bytes) -> bool:
        """True if some target string is longer than ``prefix`` and starts with it."""
        at = bisect_left(self.sorted, prefix)
        if at < len(self.sorted) and self.sorted[at] == prefix:
            at += 1
        return at < len(self.sorted) and self.sorted[at].startswith(prefix)

    def children(self, prefix: bytes) -> tuple[list[tuple[int, int]], list[int]]:
        """``(terminal, open)`` draft tokens after the open string ``prefix`` (module doc).

        Returns:
            ``terminal``: ``(draft id, target id)`` pairs with ``prefix + bytes(draft) ==
            bytes(target)``; ``open``: draft ids that keep the string open.
        """
        cached = self._children.get(prefix)
        if cached is not None:
            return cached
        terminal: set[tuple[int, int]] = set()
        open_ids: set[int] = set()
        size = len(prefix)
        at = bisect_left(self.sorted, prefix)
        while at < len(self.sorted) and self.sorted[at].startswith(prefix):
            whole = self.sorted[at]
            at += 1
            rest = whole[size:]
            for cut in range(1, len(rest) + 1):
                ids = self.draft_of.get(rest[:cut], ())
                if cut == len(rest):
                    terminal.update((draft, self.target_of[whole]) for draft in ids)
                elif whole[: size + cut] not in self.target_of:
                    open_ids.update(ids)
        result = (sorted(terminal), sorted(open_ids))
        self._children[prefix] = result
        return result
