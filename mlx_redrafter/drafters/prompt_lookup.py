"""Prompt lookup: draft the continuation of an earlier occurrence of the recent tokens.

Outputs often copy spans of their input (code edits, quotes, summaries, structured
answers). The drafter takes the last ``n`` tokens of the sequence (prompt + output, root
included), finds where else they occur, and proposes what followed there. It tries
``n = ngram, ngram - 1, ..., 1`` and takes the most recent matches first, keeping up to
``W`` matches whose continuations differ (a tree of ``W`` beams). A beam whose match lies
close to the end of the sequence has fewer than ``L - 1`` tokens to copy; its missing
positions, and every position of a beam without a match, are marked invalid, so the engine
neither verifies nor accepts them (with no match at all the step is an ordinary AR step).

It needs no training and no model, proposes deterministically (``stochastic = False``: the
exact tree walk keeps sampling exact) and reads the complete token list, so the engine asks
it after each step's host synchronisation (``needs_host_tokens = True``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mlx_redrafter.drafters.base import Draft, DraftContext


class TokenBuffer:
    """A growing host copy of the sequence as an int64 numpy array (amortised appends).

    Attributes:
        size: Number of tokens held.
    """

    def __init__(self, capacity: int = 1024):
        self._data = np.zeros(capacity, dtype=np.int64)
        self.size = 0

    def clear(self) -> None:
        """Forget every token."""
        self.size = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens[size:]`` (``tokens`` extends what is held); returns ``(T,)``."""
        if len(tokens) < self.size:
            raise ValueError(
                f"the token list shrank from {self.size} to {len(tokens)} tokens; "
                "call reset() before a new sequence"
            )
        new = tokens[self.size :]
        if self.size + len(new) > self._data.size:
            grown = np.zeros(max(2 * self._data.size, self.size + len(new)), dtype=np.int64)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : self.size + len(new)] = new
        self.size += len(new)
        return self._data[: self.size]


def match_starts(sequence: np.ndarray, n: int) -> np.ndarray:
    """Where the last ``n`` tokens occur earlier with at least one token after them.

    Args:
        sequence: ``(T,)`` token ids.
        n: n-gram length (``>= 1``).

    Returns:
        ``(M,)`` int64 start indices ``i`` (``i + n <= T - 1``) of the occurrences, most
        recent first.
    """
    if sequence.size <= n:
        return np.zeros(0, dtype=np.int64)
    suffix = sequence[-n:]
    windows = sliding_window_view(sequence[:-1], n)  # (T - n, n): starts 0 .. T-1-n
    starts = np.nonzero((windows == suffix).all(axis=1))[0]
    return starts[::-1]


def lookup_beams(
    sequence: np.ndarray, ngram: int, width: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Beams copied from earlier occurrences of the sequence's last tokens (module doc).

    Args:
        sequence: ``(T,)`` token ids; the last one is the root.
        ngram: Longest n-gram to match; shorter ones down to 1 are tried after it.
        width: ``W``, the most beams to propose.
        length: ``L``, beam length including the root.

    Returns:
        ``(beams (W, L) int32, valid (W, L) bool)``; ``beams[:, 0]`` is the root. Rows
        past the matches found repeat beam 0 with only the root valid.
    """
    beams = np.full((width, length), sequence[-1], dtype=np.int32)
    valid = np.zeros((width, length), dtype=bool)
    valid[:, 0] = True
    seen: set[tuple[int, ...]] = set()
    found = 0
    for n in range(min(ngram, sequence.size - 1), 0, -1):
        for start in match_starts(sequence, n):
            copied = sequence[start + n : start + n + length - 1]
            key = tuple(copied.tolist())
            if key in seen:
                continue
            seen.add(key)
            beams[found, 1 : 1 + copied.size] = copied
            valid[found, 1 : 1 + copied.size] = True
            found += 1
            if found == width:
                return beams, valid
    if found:
        beams[found:] = beams[0]
    return beams, valid


class PromptLookupDrafter:
    """Drafts by n-gram lookup in the prompt and the output so far (module doc).

    Args:
        ngram: Longest n-gram matched (``--ngram``; shorter ones down to 1 follow).
    """

    stochastic: bool = False
    needs_host_tokens: bool = True

    def __init__(self, ngram: int = 3):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self._buffer = TokenBuffer()

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence (a new buffer: a prompt cache may keep the old one)."""
        self._buffer = TokenBuffer()

    def save_sequence(self) -> TokenBuffer:
        """The sequence's token index, for a prompt cache."""
        return self._buffer

    def restore_sequence(self, state: TokenBuffer, length: int) -> int:
        """Continue a saved sequence whose first ``length`` tokens are unchanged."""
        state.size = min(state.size, length)
        self._buffer = state
        return length

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """``(W, L)`` beams and their ``valid`` mask from ``context.tokens`` (root last)."""
        sequence = self._buffer.sync(context.tokens)
        beams, valid = lookup_beams(sequence, self.ngram, width, length)
        return Draft(beams=mx.array(beams), valid=mx.array(valid))

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to update: the next ``propose`` reads the extended token list."""
