"""How a draft model's vocabulary maps onto the target's.

A :class:`VocabularyMap` tells :class:`~mlx_redrafter.drafters.draft_model.DraftModelDrafter`
three things:

* ``source`` ``(V,)``: for every target id, the draft id whose logit it takes, or ``V_d``
  (a ``-inf`` slot appended to the draft logits) when the draft cannot propose it. The
  draft's proposal ``q`` over the target vocabulary is built from these gathered logits,
  so ``q`` is zero outside the shared tokens and the chain rule stays exact.
* ``to_draft`` ``(V,)``: the draft id to feed back after drafting a target id.
* :meth:`VocabularyMap.context`: the draft's tokens for a target token sequence.

Two maps exist:

* :func:`same_vocabulary`: one tokenizer (the logit tables may differ in padding); the
  context is the target's token list itself.
* :func:`token_intersection` (TLI, Timor et al., ICML 2025): different tokenizers. The
  draft may propose only tokens whose *byte strings* exist in both vocabularies (space
  markers ``Ġ`` / ``▁`` and byte tokens ``<0xNN>`` normalised to bytes; special and added
  tokens by their exact text, e.g. a shared ``<|im_end|>``), and its context
  is the target's text re-encoded with the draft tokenizer at every step (so a token
  boundary that the new text changes is re-encoded too; the drafter rewinds its cache to
  the last agreeing token). Decoding and re-encoding are linear in the context length.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class VocabularyMismatchError(ValueError):
    """The draft model's vocabulary is not usable for the target (the message says why)."""


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm ``TokenizerWrapper`` (or ``tokenizer``)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


@dataclass(frozen=True)
class VocabularyMap:
    """Target <-> draft vocabulary correspondence (module doc).

    Attributes:
        source: ``(V,)`` int32 draft id for each target id; ``V_d`` where none.
        to_draft: ``(V,)`` int32 draft id to feed for each target id (0 where none; such
            ids are never drafted).
        draft_size: ``V_d``, the draft model's number of logits.
        shared: Number of target ids the draft can propose.
        target_tokenizer, draft_tokenizer: Set for different tokenizers (TLI) only.
    """

    source: mx.array
    to_draft: mx.array
    draft_size: int
    shared: int
    target_tokenizer: Any = None
    draft_tokenizer: Any = None

    @property
    def same_tokens(self) -> bool:
        """True when both models read the same token ids (the context is not re-encoded)."""
        return self.target_tokenizer is None

    def target_logits(self, logits: mx.array) -> mx.array:
        """Draft logits ``(V_d,)`` as target-vocabulary logits ``(V,)`` (``-inf`` if absent)."""
        padded = mx.concatenate([logits, mx.full((1,), -mx.inf, dtype=logits.dtype)])
        return padded[self.source]

    def context(self, tokens: list[int]) -> list[int]:
        """The draft model's tokens for the target token sequence ``tokens`` (non-empty)."""
        if self.same_tokens:
            return tokens
        return reencode(tokens, self.target_tokenizer, self.draft_tokenizer)


def reencode(tokens: list[int], source_tokenizer: Any, dest_tokenizer: Any) -> list[int]:
    """``tokens`` of one tokenizer as text, encoded with another (non-empty result).

    Args:
        tokens: Ids of ``source_tokenizer``.
        source_tokenizer, dest_tokenizer: ``TokenizerWrapper`` or Hugging Face tokenizers.

    Returns:
        ``dest_tokenizer``'s ids of the decoded text (special tokens included as text, so
        shared specials map to each other); ``[bos or 0]`` if the text encodes to nothing.
    """
    text = hf_tokenizer(source_tokenizer).decode(tokens)
    dest = hf_tokenizer(dest_tokenizer)
    ids = list(dest.encode(text, add_special_tokens=False))
    if not ids:  # e.g. a lone special token the other side lacks: read something
        ids = [dest.bos_token_id if dest.bos_token_id is not None else 0]
    return ids


def same_vocabulary(target_size: int, draft_size: int) -> VocabularyMap:
    """The identity map (one tokenizer); ids past the smaller table are never drafted."""
    ids = np.arange(target_size)
    source = np.where(ids < draft_size, ids, draft_size).astype(np.int32)
    to_draft = np.where(ids < draft_size, ids, 0).astype(np.int32)
    return VocabularyMap(
        mx.array(source), mx.array(to_draft), draft_size, min(target_size, draft_size)
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder")
    return "ByteLevel" in json.dumps(decoder)


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """Byte string of every ordinary (non-special, non-added) token, by id.

    Byte-level vocabularies (``Ġ`` = space) are decoded through :func:`bytes_to_unicode`;
    others have ``▁`` read as a space and ``<0xNN>`` as the byte ``NN``.
    """
    inner = hf_tokenizer(tokenizer)
    skip = set(inner.all_special_ids) | set(getattr(inner, "added_tokens_decoder", {}))
    out: dict[int, bytes] = {}
    if _is_byte_level(inner):
        table = {char: byte for byte, char in bytes_to_unicode().items()}
        for token, index in inner.get_vocab().items():
            if index not in skip and all(c in table for c in token):
                out[index] = bytes(table[c] for c in token)
        return out
    for token, index in inner.get_vocab().items():
        if index in skip:
            continue
        match = _BYTE_TOKEN.fullmatch(token)
        out[index] = bytes([int(match[1], 16)]) if match else token.replace("▁", " ").encode()
    return out


def _added_tokens(tokenizer: Any) -> list[tuple[int, Any]]:
    """``(id, AddedToken)`` of the special and added tokens."""
    return sorted(getattr(hf_tokenizer(tokenizer), "added_tokens_decoder", {}).items())


def token_intersection(
    target_tokenizer: Any, draft_tokenizer: Any, target_size: int, draft_size: int
) -> VocabularyMap:
    """The TLI map: the tokens whose byte strings both vocabularies hold (module doc).

    Raises:
        VocabularyMismatchError: if the vocabularies share no token.
    """
    draft_of = {}
    for index, raw in sorted(token_bytes(draft_tokenizer).items()):
        if index < draft_size:
            draft_of.setdefault(raw, index)
    source = np.full(target_size, draft_size, dtype=np.int32)
    to_draft = np.zeros(target_size, dtype=np.int32)
    for index, raw in token_bytes(target_tokenizer).items():
        if index < target_size and raw in draft_of:
            source[index] = to_draft[index] = draft_of[raw]
    draft_added = {t.content: i for i, t in _added_tokens(draft_tokenizer) if i < draft_size}
    for index, token in _added_tokens(target_tokenizer):
        if index < target_size and token.content in draft_added:
            source[index] = to_draft[index] = draft_added[token.content]
    shared = int((source < draft_size).sum())
    if shared == 0:
        raise VocabularyMismatchError(
            "the draft model's vocabulary shares no token with the target's (compared as "
            "byte strings); it cannot draft for this target"
        )
    return VocabularyMap(
        mx.array(source),
        mx.array(to_draft),
        draft_size,
        shared,
        target_tokenizer=target_tokenizer,
        draft_tokenizer=draft_tokenizer,
    )
