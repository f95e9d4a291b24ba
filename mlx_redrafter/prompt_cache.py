"""Prompt caches that live across calls: a second turn prefills only its new tokens.

A :class:`PromptCache` is what ``prompt_cache=`` of :func:`~mlx_redrafter.engine.stream_generate`
takes, in mlx-lm's terms: the prompt given with it *continues* the conversation the cache
holds (``cache.tokens + prompt`` is what the model reads), and the cache is updated in place
as tokens are generated. It keeps

* the target's per-layer KV cache and the host list of the tokens whose K/V it holds
  (after a speculative step this may run past what the caller was shown: accepted tokens
  beyond ``max_tokens`` or an EOS);
* ``tokens``: the conversation as the caller saw it (every prompt, then every emitted token,
  an ending EOS included);
* the drafter's own sequence state (a draft model's cache, the prompt-lookup index, the
  feature-level head's KV cache), saved with ``drafter.save_sequence()`` and handed back
  with ``drafter.restore_sequence(state, length)`` on the next call.

Each call keeps the longest prefix of the held K/V that agrees with the new sequence and
prefills the rest (at least the last token, whose logits start decoding). Drafters that read
the last ``C`` hidden states (``hidden_window``) re-read ``C - 1`` kept tokens, so that
their window holds real states; every other drafter prefills exactly the new tokens.

:func:`save_prompt_cache` / :func:`load_prompt_cache` write the target's cache and the
tokens with mlx-lm's file format (the drafter's state is not saved: a loaded cache starts
the drafter afresh, and a drafter that is primed with every prompt state, the feature-level
head, then prefills the whole sequence again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models import cache as lm_cache

#: Metadata keys of a saved prompt cache (no dots: mlx-lm unflattens dotted keys).
_TOKENS_KEY = "mlx_redrafter_tokens"
_KIND_KEY = "mlx_redrafter_kind"
#: ``kind`` of a cache made for AR decoding (mlx-lm's caches) or for speculative decoding
#: (one plain ``KVCache`` per layer, see ``Target.make_cache``).
KINDS = ("ar", "speculative")


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PromptCache:
    """A conversation's caches (module doc); make one with :func:`make_prompt_cache`.

    Attributes:
        tokens: The conversation so far as the caller saw it (prompts and emitted tokens).
        cache: The target's per-layer caches, or ``None`` before the first call.
        kind: ``"ar"`` or ``"speculative"``: how ``cache`` was made (``None`` before the
            first call). A call of the other kind starts a new cache.
        held: The tokens whose K/V ``cache`` holds, in order (``len(held)`` entries).
        drafter: The drafter whose state ``drafter_state`` is (compared by identity).
        drafter_state: What ``drafter.save_sequence()`` returned, or ``None``.
    """

    tokens: list[int] = field(default_factory=list)
    cache: list[Any] | None = None
    kind: str | None = None
    held: list[int] = field(default_factory=list)
    drafter: Any = None
    drafter_state: Any = None

    def __len__(self) -> int:
        """Tokens whose K/V the cache holds."""
        return len(self.held)

    def continuation(self, full: list[int]) -> list[int]:
        """The part of ``full`` (a whole conversation's prompt) to pass with this cache.

        Forgets the conversation past the prefix it shares with ``full`` and returns the
        rest of ``full`` (at least its last token). For servers and chat front ends that
        re-render the whole conversation on every turn.
        """
        if not full:
            raise ValueError("the prompt is empty")
        keep = min(common_prefix(self.tokens, full), len(full) - 1)
        del self.tokens[keep:]
        return list(full[keep:])

    def reset(self) -> None:
        """Forget everything (the next call prefills from scratch)."""
        self.tokens = []
        self.cache = None
        self.kind = None
        self.held = []
        self.drafter = None
        self.drafter_state = None

    def reusable(self, sequence: list[int], kind: str) -> int:
        """How many leading tokens of ``sequence`` have K/V in a cache of ``kind`` (always
        fewer than ``len(sequence)``: the last token is read again for its logits)."""
        if self.cache is None or self.kind != kind:
            return 0
        return min(common_prefix(self.held, sequence), len(sequence) - 1)


def make_prompt_cache(model: Any = None) -> PromptCache:
    """An empty :class:`PromptCache` (``model`` is accepted for mlx-lm's signature; the
    caches are made on the first call, of the kind that call decodes with)."""
    return PromptCache()


def save_prompt_cache(path: str, prompt_cache: PromptCache) -> None:
    """Write the target's cache and the tokens to ``path`` (``.safetensors``, mlx-lm's
    prompt-cache format with two metadata keys of ours)."""
    if prompt_cache.cache is None:
        raise ValueError("the prompt cache is empty: nothing to save")
    metadata = {
        _TOKENS_KEY: json.dumps({"tokens": prompt_cache.tokens, "held": prompt_cache.held}),
        _KIND_KEY: str(prompt_cache.kind),
    }
    lm_cache.save_prompt_cache(str(path), prompt_cache.cache, metadata)


def load_prompt_cache(path: str) -> PromptCache:
    """Read a cache written by :func:`save_prompt_cache` (the drafter starts afresh).

    Raises:
        ValueError: if the file is not a prompt cache of this library.
    """
    cache, metadata = lm_cache.load_prompt_cache(str(path), return_metadata=True)
    if _TOKENS_KEY not in metadata or metadata.get(_KIND_KEY) not in KINDS:
        raise ValueError(f"{path} is not an mlx-redrafter prompt cache (no token list)")
    saved = json.loads(metadata[_TOKENS_KEY])
    held = [int(t) for t in saved["held"]]
    offsets = {getattr(c, "offset", len(held)) for c in cache}
    if offsets != {len(held)}:
        raise ValueError(f"{path}: the cache holds {sorted(offsets)} entries, {len(held)} tokens")
    return PromptCache(
        tokens=[int(t) for t in saved["tokens"]],
        cache=cache,
        kind=metadata[_KIND_KEY],
        held=held,
    )
