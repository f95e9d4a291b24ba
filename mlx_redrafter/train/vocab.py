"""Reduced draft vocabularies: the most frequent target tokens of the training responses.

A draft vocabulary is an int32 array ``(K,)`` of distinct target ids, most frequent first
(ties by ascending id). It is chosen from the counts of the tokens the head is trained to
predict (response tokens) either by size (``K`` most frequent) or by coverage (the
smallest ``K`` whose tokens make up at least the requested share of all counted tokens).

Targets outside the vocabulary are handled in one of two ways (:data:`OOV_MODES`):

* ``"mask"``: they are left out of the loss (the head never learns about them);
* ``"slot"``: the vocabulary keeps ``K - 1`` regular tokens and its last entry is a
  catch-all slot, trained on every out-of-vocabulary target. The slot is stored as the
  most frequent token not among the ``K - 1`` regular ones, so drafting it is right
  whenever that token comes next.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mlx_redrafter.train.objective import Sequence

OOV_MODES = ("mask", "slot")


@dataclass(frozen=True)
class DraftVocab:
    """A draft vocabulary and how out-of-vocabulary targets map into it.

    Attributes:
        ids: ``(K,)`` int32 target ids, most frequent first.
        oov: ``"mask"`` or ``"slot"`` (see the module docstring).
        vocab_size: ``V``, size of the target's vocabulary.
    """

    ids: np.ndarray
    oov: str
    vocab_size: int

    def __post_init__(self) -> None:
        if self.oov not in OOV_MODES:
            raise ValueError(f"oov must be one of {OOV_MODES}, got {self.oov!r}")
        if np.unique(self.ids).size != self.ids.size:
            raise ValueError("draft vocabulary holds duplicate ids")

    @property
    def size(self) -> int:
        """``K``."""
        return int(self.ids.size)

    def target_to_draft(self) -> np.ndarray:
        """``(V,)`` int32 training label of each target id.

        The draft id for in-vocabulary tokens; out-of-vocabulary tokens get ``-1``
        (``"mask"``, excluded from the loss) or ``K - 1`` (``"slot"``).
        """
        fill = self.size - 1 if self.oov == "slot" else -1
        table = np.full(self.vocab_size, fill, dtype=np.int32)
        table[self.ids] = np.arange(self.size, dtype=np.int32)
        return table


def response_token_counts(sequences: Iterable[Sequence], vocab_size: int) -> np.ndarray:
    """``(V,)`` int64 count of each target id among the response tokens of ``sequences``.

    Args:
        sequences: ``(tokens (T,) int, response_start)`` pairs; tokens ``[response_start, T)``
            are counted.
        vocab_size: ``V``.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens, start in sequences:
        response = np.asarray(tokens[start:], dtype=np.int64)
        if response.size and (response.min() < 0 or response.max() >= vocab_size):
            raise ValueError(f"token ids outside [0, {vocab_size}) in the training data")
        counts += np.bincount(response, minlength=vocab_size)
    return counts


def frequency_order(counts: np.ndarray) -> np.ndarray:
    """``(V,)`` int32 ids by descending count, ties by ascending id."""
    return np.lexsort((np.arange(counts.size), -counts)).astype(np.int32)


def size_for_coverage(counts: np.ndarray, coverage: float) -> int:
    """Smallest ``K`` whose ``K`` most frequent ids hold at least ``coverage`` of ``counts``."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no response tokens to build a draft vocabulary from")
    cumulative = np.cumsum(np.sort(counts)[::-1])
    # Integer comparison avoids float round-off at coverage = 1.
    need = int(np.ceil(coverage * total - 1e-9))
    return int(np.searchsorted(cumulative, need, side="left")) + 1


def coverage_of(ids: np.ndarray, counts: np.ndarray) -> float:
    """Share of the counted tokens whose id is in ``ids``."""
    return float(counts[ids].sum() / max(1, int(counts.sum())))


def build_draft_vocab(
    counts: np.ndarray,
    size: int | None = None,
    coverage: float | None = None,
    oov: str = "mask",
) -> DraftVocab:
    """The draft vocabulary for ``counts`` by ``size`` (``K``) or by ``coverage``.

    With ``oov="slot"`` and a coverage target, the ``K - 1`` regular tokens alone reach
    the coverage and the slot comes on top.

    Raises:
        ValueError: unless exactly one of ``size`` / ``coverage`` is given, or for a size
            outside ``[1, V]`` (``[2, V]`` with a slot).
    """
    if (size is None) == (coverage is None):
        raise ValueError("give exactly one of size or coverage")
    v = counts.size
    extra = 1 if oov == "slot" else 0
    k = size if size is not None else min(v, size_for_coverage(counts, coverage) + extra)
    if not 1 + extra <= k <= v:
        raise ValueError(f"draft vocabulary size must be in [{1 + extra}, {v}], got {k}")
    return DraftVocab(ids=frequency_order(counts)[:k].copy(), oov=oov, vocab_size=v)
