"""The target's token strings as a trie, read through the draft model's tokens (host side).

String-level rejection sampling (:mod:`mlx_redrafter.drafters.slrs`) maps a string ``s``
the draft model wrote to the first token of its target tokenization, ``T(s)[0]``, taken as
the **longest target token that is a prefix of** ``s`` (a longest-match segmentation of
``s`` by the target's byte strings). The draft model keeps writing while ``s`` is *open*:
a proper prefix of a longer target token, so that a later draft token could still make
``T(s)[0]`` longer. The walk needs, for an open string ``u`` and every draft token ``d``:

* ``T(u + d)[0]``: ``T(u)[0]`` (the *base* of ``u``) unless some target token ``w`` with
  ``u ⊊ w ⊆ u + d`` exists, the longest of which it is then (:attr:`Children.longer`);
* whether ``u + d`` is open (:attr:`Children.open_ids`).

Both are read off the sorted target strings that start with ``u`` (one ``bisect`` range)
and the sorted draft strings, and cached per ``u`` (they depend on the vocabularies only).

Byte strings come from :func:`~mlx_redrafter.drafters.vocab_map.token_bytes` (space markers
and byte tokens normalised). Special and added tokens have no byte string: a draft special
token maps to the target's special token of the same text when there is one (the TLI map's
rule), and to nothing otherwise; after an open string it adds no bytes (``T(u + d)[0]`` is
``T(u)[0]``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError, token_bytes

#: Cached :meth:`StringTrie.children` answers kept at most (oldest dropped first).
CACHE_SIZE = 20_000


@dataclass(frozen=True)
class Children:
    """What every draft token does after an open string ``u`` (module doc).

    Attributes:
        base: ``T(u)[0]``, the longest target token that is a prefix of ``u`` (``-1``: none).
        longer: ``(n,)`` int64 draft ids ``d`` with ``T(u + d)[0] != base``.
        longer_targets: ``(n,)`` int64 their ``T(u + d)[0]``.
        open_ids: ``(m,)`` int64 draft ids with ``u + d`` open.
    """

    base: int
    longer: np.ndarray
    longer_targets: np.ndarray
    open_ids: np.ndarray


class StringTrie:
    """Target token strings and the draft tokens that write them (module doc).

    Args:
        target_strings: Byte string of every ordinary target id.
        draft_strings: Byte string of every ordinary draft id.
        draft_size: ``V_d``, the draft model's number of logits (ids past it are ignored).
        specials: ``(draft id, target id)`` pairs of special tokens with the same text.

    Attributes:
        strings: Byte string of every ordinary draft id below ``V_d``.
        root_target: ``(V_d,)`` int32 ``T(bytes(d))[0]`` of each first draft token ``d``,
            ``-1`` where no target token is a prefix of it.
        root_open: ``(V_d,)`` bool, first draft tokens whose string is open.
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
        self.target_bytes = {index: raw for raw, index in self.target_of.items()}
        self.sorted = sorted(self.target_of)
        self.longest = max(map(len, self.sorted), default=0)
        self.strings = {i: raw for i, raw in draft_strings.items() if raw and i < draft_size}
        self.draft_of: dict[bytes, list[int]] = {}
        for index, raw in sorted(self.strings.items()):
            self.draft_of.setdefault(raw, []).append(index)
        by_string = sorted(self.strings.items(), key=lambda item: item[1])
        self._draft_keys = [raw for _, raw in by_string]
        self._draft_ids = np.array([i for i, _ in by_string], dtype=np.int64)
        self._draft_longest = max(map(len, self._draft_keys), default=0)
        self.draft_size = draft_size
        self.root_target = np.full(draft_size, -1, dtype=np.int32)
        self.root_open = np.zeros(draft_size, dtype=bool)
        for raw, ids in self.draft_of.items():
            self.root_target[ids] = self.longest_target(raw)
            self.root_open[ids] = self.extends(raw)
        self.special_draft: dict[int, int] = {}
        for draft, target in specials:
            if draft < draft_size:
                self.root_target[draft] = target
                self.special_draft.setdefault(target, draft)
        if not (self.root_target >= 0).any():
            raise VocabularyMismatchError(
                "no target token is a prefix of any draft token (compared as byte strings); "
                "the draft model cannot propose for this target"
            )
        self._children: dict[bytes, Children] = {}
        self._spellings: dict[int, tuple[int, ...] | None] = {}

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
        """True if ``prefix`` is open: a proper prefix of some target string."""
        at = bisect_left(self.sorted, prefix)
        if at < len(self.sorted) and self.sorted[at] == prefix:
            at += 1
        return at < len(self.sorted) and self.sorted[at].startswith(prefix)

    def longest_target(self, string: bytes) -> int:
        """``T(string)[0]``: the longest target token that is a prefix of ``string`` (``-1``:
        none)."""
        for cut in range(min(len(string), self.longest), 0, -1):
            target = self.target_of.get(string[:cut])
            if target is not None:
                return target
        return -1

    def children(self, prefix: bytes) -> Children:
        """What every draft token does after the open string ``prefix`` (cached)."""
        cached = self._children.get(prefix)
        if cached is not None:
            return cached
        size = len(prefix)
        lo = bisect_left(self.sorted, prefix)
        hi = bisect_right(self.sorted, prefix + b"\xff" * (self.longest - size + 1))
        rests = [(w[size:], self.target_of[w]) for w in self.sorted[lo:hi] if len(w) > size]
        rests.sort(key=lambda item: len(item[0]))  # shorter first: longer ones overwrite
        best = np.full(self.draft_size, -1, dtype=np.int64)
        open_ids: set[int] = set()
        keys = self._draft_keys
        for rest, target in rests:
            # draft tokens starting with ``rest`` reach the target token ``prefix + rest``
            begin = bisect_left(keys, rest)
            end = bisect_left(keys, rest + b"\xff" * (self._draft_longest + 1), begin)
            best[self._draft_ids[begin:end]] = target
            for cut in range(1, min(len(rest), self._draft_longest + 1)):
                open_ids.update(self.draft_of.get(rest[:cut], ()))
        longer = np.nonzero(best >= 0)[0]
        result = Children(
            base=self.longest_target(prefix),
            longer=longer,
            longer_targets=best[longer],
            open_ids=np.array(sorted(open_ids), dtype=np.int64),
        )
        if len(self._children) >= CACHE_SIZE:
            del self._children[next(iter(self._children))]
        self._children[prefix] = result
        return result

    def spell(self, target: int) -> tuple[int, ...] | None:
        """Draft ids writing exactly ``bytes(target)`` (greedy longest match; cached), the
        shared special token for a special target token, ``None`` if there is none."""
        if target in self._spellings:
            return self._spellings[target]
        raw = self.target_bytes.get(target)
        path: tuple[int, ...] | None = None
        if raw is None:
            draft = self.special_draft.get(target)
            path = None if draft is None else (draft,)
        else:
            ids, at = [], 0
            while at < len(raw):
                for cut in range(min(len(raw) - at, self._draft_longest), 0, -1):
                    found = self.draft_of.get(raw[at : at + cut])
                    if found:
                        ids.append(found[0])
                        at += cut
                        break
                else:
                    break
            path = tuple(ids) if at == len(raw) else None
        self._spellings[target] = path
        return path
