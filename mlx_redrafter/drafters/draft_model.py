"""A smaller mlx-lm model of the same vocabulary drafts a chain of ``K`` tokens.

Each step the draft model reads the tokens the engine accepted since its last proposal,
then drafts ``K = L - 1`` tokens one at a time, feeding each back (a chain: ``W = 1``).

* **Greedy** (``temp == 0``) or ``sample=False``: the draft is the draft model's argmax, a
  deterministic proposal verified by the greedy rule or by the exact tree walk.
* **Sampling** (``temp > 0``): token ``j`` is a sample from
  ``q_j = SamplingParams.probs(draft logits)`` — the draft model's distribution under the
  *target's* temperature / top-p / top-k / min-p — and ``Draft.draft_logprobs`` carries
  ``log q``. The engine verifies it with the standard chain rule (:func:`accept_chain`):
  accept with ``min(1, p/q)``, resample from ``norm(max(0, p - q))``, bonus token from ``p``.

The draft model keeps its own KV cache. After a step, the cache holds the context and the
first ``K - 1`` drafted tokens; the next proposal compares them with the accepted tokens
and rewinds the cache to the agreeing prefix with mlx-lm's ``trim_prompt_cache``. The cache
is one plain ``KVCache`` per layer (:meth:`Target.make_cache`: sliding windows are applied
in the attention mask, so the cache can always be rewound — an mlx-lm
``RotatingKVCache`` cannot once it has wrapped).

By default the vocabularies must be the same: equal logit counts, or, when both
tokenizers are given, the same token strings at the same ids (a padded embedding table is
allowed); different tokenizers raise :class:`VocabularyMismatchError`. With
``method="tli"`` a draft model with another tokenizer drafts over the tokens both
vocabularies share (:func:`~mlx_redrafter.drafters.vocab_map.token_intersection`), still
verified by the same exact rules.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.vocab_map import (
    VocabularyMap,
    VocabularyMismatchError,
    hf_tokenizer,
    same_vocabulary,
    token_intersection,
)
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.target import Target

#: Tokens per forward when the draft model reads a long context (the prompt).
PREFILL_STEP = 2048
#: ``method`` values of :meth:`DraftModelDrafter.from_models`.
METHODS = ("same", "tli")


def _vocab(tokenizer: Any) -> dict[str, int]:
    """Token string -> id of a ``TokenizerWrapper`` or Hugging Face tokenizer."""
    return dict(hf_tokenizer(tokenizer).get_vocab())


def _describe(vocab: dict[str, int], token: str) -> str:
    """``"id 17"`` or ``"absent"``."""
    return f"id {vocab[token]}" if token in vocab else "absent"


def check_same_vocabulary(
    target_size: int,
    draft_size: int,
    target_tokenizer: Any = None,
    draft_tokenizer: Any = None,
) -> None:
    """Raise :class:`VocabularyMismatchError` unless the draft can propose target ids.

    Args:
        target_size: Number of target logits ``V``.
        draft_size: Number of draft logits.
        target_tokenizer: Optional target tokenizer.
        draft_tokenizer: Optional draft tokenizer (checked when both are given).

    With both tokenizers, every token must have the same id in both and fit both logit
    tables (padded tables of different sizes are fine); without them the logit counts
    must be equal.
    """
    if target_tokenizer is None or draft_tokenizer is None:
        if target_size != draft_size:
            raise VocabularyMismatchError(
                f"vocabulary sizes differ: the target has {target_size} logits, the draft "
                f"model {draft_size}; a draft model must share the target's tokenizer"
            )
        return
    target_vocab, draft_vocab = _vocab(target_tokenizer), _vocab(draft_tokenizer)
    if target_vocab != draft_vocab:
        differ = sorted(
            set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda kv: (kv[1], kv[0])
        )
        token, _ = differ[0]
        raise VocabularyMismatchError(
            f"the draft model's tokenizer differs from the target's ({len(target_vocab)} vs "
            f"{len(draft_vocab)} tokens, {len(differ) // 2 or len(differ)} entries differ; "
            f"e.g. {token!r} is {_describe(target_vocab, token)} for the target and "
            f"{_describe(draft_vocab, token)} for the draft); drafting across different "
            "tokenizers needs the token-intersection method (--draft-method tli)"
        )
    needed = max(target_vocab.values(), default=-1) + 1
    if needed > min(target_size, draft_size):
        raise VocabularyMismatchError(
            f"the tokenizer has ids up to {needed - 1} but the target has {target_size} and "
            f"the draft model {draft_size} logits"
        )


class DraftRunner:
    """A draft model, its KV cache and a host copy of the tokens the cache holds.

    :meth:`start` rewinds the cache to the longest prefix it shares with a new context and
    reads the rest; :meth:`feed` appends drafted tokens lazily (they are read back to the
    host at the next :meth:`start`, after the engine's synchronisation evaluated them).

    Args:
        model: Any mlx-lm model :class:`Target` supports.
    """

    def __init__(self, model: nn.Module):
        self.model = Target(model)
        self.reset()

    @property
    def vocab_size(self) -> int:
        """``V_d``, the draft model's number of logits."""
        return self.model.vocab_size

    def reset(self) -> None:
        """An empty cache."""
        self.cache: list[Any] = self.model.make_cache()
        self._held: list[int] = []  # host copy of the tokens whose K/V the cache holds
        self._pending: list[mx.array] = []  # fed drafts not yet in _held (lazy)
        self._agreed = 0  # a prefix of _held known to equal the next context

    def start(self, tokens: list[int], stable: bool) -> mx.array:
        """Bring the cache to ``tokens`` (draft ids, non-empty); ``(V_d,)`` next logits.

        ``stable``: later contexts extend ``tokens`` (same vocabulary), so the next call
        need not compare this prefix again; re-encoded contexts (other tokenizers) may
        change their last tokens and are compared from the start.
        """
        if self._pending:
            self._held.extend(mx.stack(self._pending).tolist())
            self._pending = []
        agree = min(self._agreed, len(tokens))
        while (
            agree < len(self._held) and agree < len(tokens) and self._held[agree] == tokens[agree]
        ):
            agree += 1
        agree = min(agree, len(tokens) - 1)  # always read the last token: its logits are needed
        excess = len(self._held) - agree
        if excess:
            if not can_trim_prompt_cache(self.cache):
                raise ValueError("the draft model's cache cannot be rewound")
            trim_prompt_cache(self.cache, excess)
            del self._held[agree:]
        feed = tokens[agree:]
        for begin in range(0, len(feed) - 1, PREFILL_STEP):
            chunk = feed[begin : min(begin + PREFILL_STEP, len(feed) - 1)]
            self.model.forward(mx.array(chunk, dtype=mx.int32), self.cache)
            mx.eval([c.state for c in self.cache])
        logits = self.model.forward(mx.array(feed[-1:], dtype=mx.int32), self.cache)[0][-1]
        self._held.extend(feed)
        self._agreed = len(tokens) if stable else 0
        return logits

    def snapshot(self) -> tuple[list[Any], list[int], list[mx.array]]:
        """The cache and its token lists, for a prompt cache (:meth:`reset` makes new ones,
        so a snapshot is never changed by another sequence)."""
        return self.cache, self._held, self._pending

    def restore(self, snapshot: tuple[list[Any], list[int], list[mx.array]]) -> None:
        """Continue from ``snapshot``; the next :meth:`start` rewinds it as far as needed."""
        self.cache, self._held, self._pending = snapshot
        self._agreed = 0

    def feed(self, token: mx.array) -> mx.array:
        """Append one drafted draft id ``()`` (lazy); ``(V_d,)`` next logits."""
        self._pending.append(token)
        return self.model.forward(token[None], self.cache)[0][-1]

    def extend(self, tokens: list[int]) -> mx.array:
        """Append draft ids known on the host (non-empty); ``(V_d,)`` logits after the last."""
        if self._pending:
            self._held.extend(mx.stack(self._pending).tolist())
            self._pending = []
        self._held.extend(tokens)
        return self.model.forward(mx.array(tokens, dtype=mx.int32), self.cache)[0][-1]


class DraftModelDrafter:
    """Drafts a chain of ``K = L - 1`` tokens with an mlx-lm model (module doc).

    Args:
        model: The draft model (any mlx-lm model Target supports; it may be the target).
        vocabulary: How its vocabulary maps onto the target's
            (:func:`~mlx_redrafter.drafters.vocab_map.same_vocabulary` or
            :func:`~mlx_redrafter.drafters.vocab_map.token_intersection`).
        sample: At ``temp > 0`` draw the drafts from ``q`` (chain rule; default). With
            ``False`` the drafts are always the argmax (verified by the exact tree walk).
    """

    stochastic: bool = True
    needs_host_tokens: bool = True

    def __init__(self, model: nn.Module, vocabulary: VocabularyMap, *, sample: bool = True):
        self.runner = DraftRunner(model)
        if vocabulary.draft_size != self.runner.vocab_size:
            raise VocabularyMismatchError(
                f"the vocabulary map is for {vocabulary.draft_size} draft logits, the draft "
                f"model has {self.runner.vocab_size}"
            )
        self.vocabulary = vocabulary
        self.sample = sample

    @classmethod
    def from_models(
        cls,
        target: nn.Module,
        draft: nn.Module,
        target_tokenizer: Any = None,
        draft_tokenizer: Any = None,
        *,
        method: str = "same",
        sample: bool = True,
    ) -> DraftModelDrafter:
        """A drafter for ``target``.

        Args:
            target: The target model.
            draft: The draft model.
            target_tokenizer, draft_tokenizer: Their tokenizers (``"same"``: optional, then
                checked to be equal; ``"tli"``: required).
            method: ``"same"`` (one vocabulary) or ``"tli"`` (token-level intersection of
                two tokenizers).
            sample: See the class.

        Raises:
            VocabularyMismatchError: if the vocabularies do not fit the method.
            ValueError: for an unknown method or missing tokenizers.
        """
        target_size, draft_size = Target(target).vocab_size, Target(draft).vocab_size
        if method == "same":
            check_same_vocabulary(target_size, draft_size, target_tokenizer, draft_tokenizer)
            vocabulary = same_vocabulary(target_size, draft_size)
        elif method == "tli":
            if target_tokenizer is None or draft_tokenizer is None:
                raise ValueError("the tli method needs both tokenizers")
            vocabulary = token_intersection(
                target_tokenizer, draft_tokenizer, target_size, draft_size
            )
        else:
            raise ValueError(f"unknown draft method {method!r} (one of {', '.join(METHODS)})")
        return cls(draft, vocabulary, sample=sample)

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence: an empty cache (the prompt is read at the first proposal)."""
        self.runner.reset()

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to do: the next :meth:`propose` compares its tokens with the cache."""

    def save_sequence(self) -> tuple:
        """The draft model's cache, for a prompt cache."""
        return self.runner.snapshot()

    def restore_sequence(self, state: tuple, length: int) -> int:
        """Continue a saved sequence (the next proposal rewinds the draft cache to the
        prefix it shares with the new context)."""
        self.runner.restore(state)
        return length

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """A ``(1, L)`` chain of target ids after ``context.tokens`` (root last), lazy.

        Raises:
            ValueError: if ``width != 1`` (a draft model proposes one chain).
        """
        if width != 1:
            raise ValueError(f"a draft model drafts one chain: use beam width 1 (got {width})")
        vocabulary = self.vocabulary
        logits = self.runner.start(vocabulary.context(context.tokens), vocabulary.same_tokens)
        sampling = self.sample and not context.params.greedy
        drafted, logprobs = [], []
        for j in range(length - 1):
            token, logq = self._next(logits, context.params, sampling)
            drafted.append(token)
            if logq is not None:
                logprobs.append(logq)
            if j < length - 2:
                logits = self.runner.feed(vocabulary.to_draft[token])
        root = mx.array([context.tokens[-1]], dtype=mx.int32)
        beams = mx.concatenate([root, mx.stack(drafted)])[None]
        return Draft(beams=beams, draft_logprobs=mx.stack(logprobs)[None] if logprobs else None)

    def _next(
        self, logits: mx.array, params: SamplingParams, sampling: bool
    ) -> tuple[mx.array, mx.array | None]:
        """One drafted token ``()`` int32 and its ``log q`` ``(V,)`` (``None`` if argmax)."""
        logits = self.vocabulary.target_logits(logits.astype(mx.float32))
        if not sampling:
            return mx.argmax(logits).astype(mx.int32), None
        weights = params.logits(logits)
        token = mx.random.categorical(weights).astype(mx.int32)
        return token, weights - mx.logsumexp(weights)
