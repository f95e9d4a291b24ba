"""String-level exact match (SLEM): a draft model with another tokenizer drafts text.

Timor et al. (ICML 2025). The draft model reads the target's text re-encoded with its own
tokenizer (its cache rewound to the last agreeing token, as for TLI), drafts ``K = L - 1``
tokens freely in its own vocabulary (argmax), and the drafted *text* is re-tokenized with
the target's tokenizer. The result is a deterministic chain of target ids, verified by the
target's own rules (greedy matching, or the exact tree walk when sampling, which treats
it as a point-mass proposal): lossless under greedy decoding and sampling alike.

Re-tokenizing: the drafted text is encoded after the text of the last ``lookbehind``
target tokens, so that context-sensitive encodings come out as the target would encode
the whole text (a tokenizer that marks word starts, ``Ġ`` with ``add_prefix_space`` or
SentencePiece's ``▁``, would mark drafted text continuing a word as a new word if it were
encoded on its own). If that re-encoding changes the look-behind tokens
themselves (the drafted text merges with committed tokens: ``"12" + "3"`` becoming
``"123"``), the committed tokens cannot change, so the drafted text is encoded on its
own. Positions the re-tokenized text does not fill are marked invalid.

Cost: the context is decoded and re-encoded every step (linear in its length), and the
drafted ids are read back to the host inside :meth:`SlemDrafter.propose` (the text is
needed), one synchronisation more per step than the other drafters.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.draft_model import DraftRunner
from mlx_redrafter.drafters.vocab_map import hf_tokenizer, reencode

#: Target tokens whose text precedes the drafted text when it is re-tokenized.
LOOKBEHIND = 8


def retokenize(tokenizer: Any, window: list[int], text: str) -> list[int]:
    """The target ids of ``text`` following the committed tokens ``window`` (module doc).

    Args:
        tokenizer: The target tokenizer.
        window: The last committed target ids (the look-behind; may be empty).
        text: Drafted text that follows them.

    Returns:
        Ids ``t`` such that ``window + t`` encodes the text ``decode(window) + text``.
    """
    hf = hf_tokenizer(tokenizer)
    if not text:
        return []
    ids = list(hf.encode(hf.decode(window) + text, add_special_tokens=False))
    if ids[: len(window)] == window:
        return ids[len(window) :]
    return list(hf.encode(text, add_special_tokens=False))


class SlemDrafter:
    """Drafts text with a draft model of another tokenizer (module doc).

    Args:
        model: The draft model.
        target_tokenizer: The target's tokenizer.
        draft_tokenizer: The draft model's tokenizer.
        lookbehind: Committed target tokens re-tokenized with the drafted text.
    """

    stochastic: bool = False
    needs_host_tokens: bool = True

    def __init__(
        self,
        model: nn.Module,
        target_tokenizer: Any,
        draft_tokenizer: Any,
        lookbehind: int = LOOKBEHIND,
    ):
        if lookbehind < 1:
            raise ValueError(f"lookbehind must be >= 1, got {lookbehind}")
        self.runner = DraftRunner(model)
        self.target_tokenizer = target_tokenizer
        self.draft_tokenizer = draft_tokenizer
        self.lookbehind = lookbehind

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence: an empty draft cache."""
        self.runner.reset()

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to do: the next :meth:`propose` re-encodes the extended text."""

    def save_sequence(self) -> tuple:
        """The draft model's cache, for a prompt cache."""
        return self.runner.snapshot()

    def restore_sequence(self, state: tuple, length: int) -> int:
        """Continue a saved sequence (the next proposal rewinds the draft cache)."""
        self.runner.restore(state)
        return length

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """``(1, L)`` target ids re-tokenized from ``L - 1`` drafted tokens, with ``valid``.

        Raises:
            ValueError: if ``width != 1``.
        """
        if width != 1:
            raise ValueError(f"a draft model drafts one chain: use beam width 1 (got {width})")
        context_ids = reencode(context.tokens, self.target_tokenizer, self.draft_tokenizer)
        logits = self.runner.start(context_ids, stable=False)
        drafted = []
        for j in range(length - 1):
            drafted.append(mx.argmax(logits).astype(mx.int32))
            if j < length - 2:
                logits = self.runner.feed(drafted[-1])
        text = hf_tokenizer(self.draft_tokenizer).decode(mx.stack(drafted).tolist())
        window = context.tokens[-self.lookbehind :]
        proposal = retokenize(self.target_tokenizer, window, text)[: length - 1]
        beams = np.full((1, length), context.tokens[-1], dtype=np.int32)
        valid = np.zeros((1, length), dtype=bool)
        beams[0, 1 : 1 + len(proposal)] = proposal
        valid[0, : 1 + len(proposal)] = True
        return Draft(beams=mx.array(beams), valid=mx.array(valid))
