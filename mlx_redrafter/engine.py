"""The decoding engine: the autoregressive baseline and the speculative decoding loop.

One speculative step, read top to bottom in :func:`speculative_tokens`::

    draft   = drafter.propose(context)          beams (W, L), root first        [drafters/]
    tree    = pack(beams)                       N deduplicated nodes            [tree.py]
    logits  = target.tree_forward(tree)         (N, V) + hidden (N, d)          [target.py]
    result  = accept(tree, logits)              accepted path, next root token  [accept.py]
    cache   = gather_path + set_length          keep the path's K/V only        [cache.py]
              (after the sync, and only when the path leaves the first beam)

Everything in a step is lazy until the single host synchronisation that reads the accepted
length. Pipelined drafters (ReDrafter) propose the next step's beams from the lazy
acceptance before that synchronisation, so their beams are read in it too; host drafters
(``needs_host_tokens``: prompt lookup, draft models) propose right after it, from the
complete token list. A drafter with both kinds of parts (``CombinedDrafter``: a head plus
prompt lookup) proposes its pipelined part before the synchronisation and adds the rest
in ``complete(draft, context, W, L)`` right after it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_redrafter.accept import (
    Acceptance,
    accept_chain,
    accept_exact,
    accept_greedy,
    accept_redrafter,
)
from mlx_redrafter.cache import gather_path, set_length
from mlx_redrafter.drafters.base import Draft, DraftContext, Drafter
from mlx_redrafter.hidden_window import HiddenWindow
from mlx_redrafter.prompt_cache import PromptCache
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.target import Target
from mlx_redrafter.tree import Tree, pack

PREFILL_STEP = 2048


@dataclass
class GenerationResponse:
    """One streamed token; mlx-lm's ``GenerationResponse`` fields plus decoding statistics.

    Attributes:
        text: The next segment of decoded text (may be empty).
        token: The token id.
        logprobs: ``(V,)`` log-probabilities for AR decoding; ``None`` when speculative.
        from_draft: True if the token was drafted and accepted.
        prompt_tokens: Number of prompt tokens.
        prompt_tps: Prompt tokens per second.
        generation_tokens: Tokens generated so far.
        generation_tps: Generation tokens per second.
        peak_memory: Peak memory so far, GB.
        finish_reason: ``"stop"``, ``"length"`` or ``None``.
        steps: Target forward passes since the prompt (speculative: verification steps).
        acceptance_by_depth: Fraction of steps that accepted at least ``k`` drafted tokens,
            for ``k = 1 .. L-1`` (empty for AR).
        cached_tokens: Leading tokens of the sequence whose K/V came from the prompt cache
            (0 without one); the prompt pass read the rest.
    """

    text: str
    token: int
    logprobs: mx.array | None
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    steps: int = 0
    acceptance_by_depth: list[float] = field(default_factory=list)
    cached_tokens: int = 0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target call (accepted drafts + 1)."""
        return self.generation_tokens / max(self.steps, 1)


@dataclass
class StepStats:
    """Counters the speculative loop updates; read by the streaming wrapper and the bench.

    Attributes:
        steps: Verification steps (target calls after the prompt).
        accepted: Drafted tokens accepted at each step.
        tree_sizes: Packed tree size ``N`` at each step.
        profile: When true, the loop evaluates each phase separately (extra host syncs)
            so that ``times`` splits the step into draft / verify / accept / compact;
            otherwise everything runs lazily and only ``times["step"]`` is filled.
        times: Seconds spent per phase.
        prefill_tokens: Tokens the prompt pass fed to the target.
        cached_tokens: Leading tokens whose K/V a prompt cache already held.
    """

    steps: int = 0
    accepted: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    profile: bool = False
    times: dict[str, float] = field(default_factory=dict)
    prefill_tokens: int = 0
    cached_tokens: int = 0

    def acceptance_by_depth(self, depth: int) -> list[float]:
        """Fraction of steps accepting at least k drafts, for k = 1 .. depth."""
        if not self.accepted:
            return [0.0] * depth
        counts = np.asarray(self.accepted)
        return [float((counts >= k).mean()) for k in range(1, depth + 1)]

    def lap(self, phase: str, start: float, *arrays: mx.array) -> float:
        """Close ``phase`` (evaluating ``arrays`` first when profiling); returns the time now."""
        if self.profile and arrays:
            mx.eval(*arrays)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - start
        return now


def _prefill(model: nn.Module, prompt: mx.array, cache: list) -> None:
    """Run all but the last prompt token through ``model`` (as mlx-lm does), in chunks."""
    for start in range(0, prompt.size - 1, PREFILL_STEP):
        model(prompt[None, start : min(start + PREFILL_STEP, prompt.size - 1)], cache=cache)
        mx.eval([c.state for c in cache])


def _ar_step(
    model: nn.Module, cache: list, params: SamplingParams, tokens: mx.array, history: mx.array
) -> tuple[mx.array, mx.array]:
    """One AR step: ``tokens (n,)`` in, ``(next token (1,), logprobs (V,))`` out (lazy)."""
    logits = model(tokens[None], cache=cache)[:, -1, :]
    logits = params.process(history, logits)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return params.draw(params.warp(logprobs)), logprobs.squeeze(0)


def ar_tokens(
    model: nn.Module,
    prompt: mx.array,
    params: SamplingParams,
    max_tokens: int,
    prompt_cache: PromptCache | None = None,
    stats: StepStats | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Autoregressive decoding: yields ``(token, logprobs (V,))``, mlx-lm's arithmetic.

    ``prompt`` ``(P,)`` is the whole sequence; with ``prompt_cache`` the K/V it holds for
    a prefix of it are reused (and it follows the tokens fed). The next step is queued
    (``mx.async_eval``) before the current token is read, so the host never waits idle
    between steps.
    """
    keep = 0
    if prompt_cache is None:
        cache = make_prompt_cache(model)
    else:
        keep = _reuse_ar(model, prompt.tolist(), prompt_cache)
        cache = prompt_cache.cache
    if stats is not None:
        stats.cached_tokens, stats.prefill_tokens = keep, prompt.size - keep
    _prefill(model, prompt[keep:], cache)
    history = prompt
    y, logprobs = _ar_step(model, cache, params, prompt[-1:], history)
    mx.async_eval(y, logprobs)
    n = 0
    while n != max_tokens:
        if params.logits_processors:
            history = mx.concatenate([history, y.astype(history.dtype)])
        next_y, next_logprobs = _ar_step(model, cache, params, y, history)
        mx.async_eval(next_y, next_logprobs)
        token = y.item()
        if prompt_cache is not None:
            prompt_cache.held.append(token)  # its K/V are in the cache (lazily)
        yield token, logprobs
        y, logprobs = next_y, next_logprobs
        n += 1


def _reuse_ar(model: nn.Module, sequence: list[int], prompt_cache: PromptCache) -> int:
    """Rewind ``prompt_cache`` (mlx-lm caches) to its prefix shared with ``sequence``;
    returns that prefix's length (0: a new cache). Afterwards ``held`` is the sequence,
    which the prompt pass will read."""
    keep = prompt_cache.reusable(sequence, "ar")
    if keep and can_trim_prompt_cache(prompt_cache.cache):
        trim_prompt_cache(prompt_cache.cache, len(prompt_cache.held) - keep)
    else:
        keep = 0
        prompt_cache.cache, prompt_cache.kind = make_prompt_cache(model), "ar"
    prompt_cache.held = list(sequence)
    prompt_cache.drafter = prompt_cache.drafter_state = None
    return keep


def accept(
    tree: Tree,
    logits: mx.array,
    params: SamplingParams,
    rule: str,
    draft: Draft,
    stochastic: bool = False,
) -> Acceptance:
    """Apply the acceptance rule to one tree.

    Greedy when ``temp == 0``; the chain rule when the drafter is ``stochastic`` and the
    draft carries the ``q`` its tokens were sampled from; else ``rule`` (``"exact"`` or
    ``"redrafter"``) for deterministic drafts, the exact walk testing a sampled beam 0
    (``draft.proposal``) with ``min(1, p/q)``.
    """
    tokens = mx.array(tree.tokens)
    if params.greedy:
        return accept_greedy(tree, tokens, logits)
    if stochastic and draft.draft_logprobs is not None:
        return accept_chain(tree, tokens, params.probs(logits), draft.draft_logprobs)
    if rule == "redrafter":
        if draft.draft_logprobs is None:
            raise ValueError("the redrafter rule needs the drafter's log-probs (draft_logprobs)")
        return accept_redrafter(
            tree, tokens, params.probs(logits), draft.draft_logprobs, params.temp
        )
    return accept_exact(tree, tokens, params.log_weights(logits), draft.proposal)


def prefill(
    target: Target, prompt: list[int], cache: list, params: SamplingParams, window: int = 1
) -> tuple[mx.array, mx.array]:
    """Prompt pass: the first generated token ``()`` and the last hidden states ``(n, d)``.

    ``n = 1`` for ``window = 1``; otherwise up to ``window`` rows, oldest first, ending with
    the last prompt position's state (``window >= len(prompt)``: every prompt position).
    """
    prompt_arr = mx.array(prompt, dtype=mx.int32)
    tail: list[mx.array] = []
    for start in range(0, len(prompt) - 1, PREFILL_STEP):
        chunk = prompt_arr[start : min(start + PREFILL_STEP, len(prompt) - 1)]
        _, hidden = target.forward(chunk, cache)
        tail = [mx.concatenate([*tail, hidden])[-(window - 1) :]] if window > 1 else []
        mx.eval([c.state for c in cache], *tail)
    logits, hidden = target.forward(prompt_arr[-1:], cache)
    recent = mx.concatenate([*tail, hidden[-1:]])
    return params.sample(logits[-1]).astype(mx.int32), recent[-window:]


def speculative_tokens(
    target: Target,
    drafter: Drafter,
    prompt: list[int],
    params: SamplingParams,
    width: int,
    length: int,
    stats: StepStats,
    rule: str = "exact",
    prompt_cache: PromptCache | None = None,
) -> Iterator[tuple[int, bool]]:
    """Speculative decoding: yields ``(token, from_draft)`` forever (the caller stops).

    Args:
        target: The wrapped target model.
        drafter: Any :class:`~mlx_redrafter.drafters.base.Drafter`.
        prompt: Prompt token ids (the whole sequence, also with a prompt cache).
        params: Sampling parameters (greedy when ``temp == 0``).
        width: Beam width ``W``.
        length: Beam length ``L`` (root included; ``L - 1`` drafted tokens).
        stats: Updated in place.
        rule: ``"exact"`` or ``"redrafter"`` (approximate) when sampling.
        prompt_cache: Reuse (and keep updating) the K/V it holds for a prefix of
            ``prompt``, with the drafter's state (:mod:`mlx_redrafter.prompt_cache`).
    """
    if params.logits_processors:
        raise ValueError("logits processors are supported only for AR decoding (--drafter none)")
    pipelined = not getattr(drafter, "needs_host_tokens", False)
    stochastic = bool(getattr(drafter, "stochastic", False))
    completes = callable(getattr(drafter, "complete", None))
    tokens = list(prompt)
    window_size = int(getattr(drafter, "hidden_window", 1))
    primes = callable(getattr(drafter, "prime", None))
    if prompt_cache is None:
        drafter.reset(prompt)
        keep, cache = 0, target.make_cache()
    else:
        keep = _reuse(target, drafter, tokens, window_size, primes, prompt_cache)
        cache = prompt_cache.cache
    stats.cached_tokens, stats.prefill_tokens = keep, len(prompt) - keep
    fresh = prompt[keep:]
    root, recent = prefill(target, fresh, cache, params, len(fresh) if primes else window_size)
    hidden = recent[-1]
    # the token after each position read: the prompt shifted by one, then the root
    after = mx.concatenate([mx.array(prompt[keep + 1 :], dtype=mx.int32), root[None]])
    if primes:
        if keep:
            drafter.prime(recent, after, keep)
        else:
            drafter.prime(recent, after)
    window = None
    if window_size > 1:
        window = HiddenWindow.start(recent[-window_size:], window_size, after[-window_size:])
    mx.eval(root)
    tokens.append(int(root.item()))
    _follow(prompt_cache, drafter, tokens)
    yield tokens[-1], False
    position = mx.array(len(tokens) - 1, dtype=mx.int32)
    draft = None
    while True:
        tic = time.perf_counter()
        if draft is None or completes:
            # host drafters (and the first step): propose from the synchronised context
            context = _context(hidden, root, position, tokens, params, window)
            if draft is None:
                draft = drafter.propose(context, width, length)
            if completes:
                draft = drafter.complete(draft, context, width, length)
            tic = stats.lap("draft", tic, draft.beams)
        num_cached = len(tokens) - 1  # the root is not in the cache yet
        tree = pack(*_host_draft(draft))
        logits, tree_hidden = target.tree_forward(tree, cache)
        tic = stats.lap("verify", tic, logits)
        result = accept(tree, logits, params, rule, draft, stochastic)
        tic = stats.lap("accept", tic, result.num_accepted, result.next_root)
        hidden, root = tree_hidden[result.last_node], result.next_root
        if window is not None:
            window = window.advance(
                tree_hidden[result.path], result.num_accepted, _path_next(result)
            )
        position = num_cached + 1 + result.num_accepted
        draft = None
        if pipelined:
            # the next draft starts from the lazy acceptance: no host sync in between
            draft = drafter.propose(
                _context(hidden, root, position, tokens, params, window), width, length
            )
            tic = stats.lap("draft", tic, draft.beams)
        # the step's single host synchronisation
        mx.eval(result.num_accepted, result.drafted, result.path, root, *_draft_arrays(draft))
        num = int(result.num_accepted.item())
        new = result.drafted.tolist()[:num] + [int(root.item())]
        tic = stats.lap("sync", tic)
        kept = result.path.tolist()[: num + 1]
        if kept != list(range(num + 1)):
            # the path left the first beam: move its K/V next to the prefix (lazy, it runs
            # with the next forward); a path along the first beam is already in place
            gather_path(cache, mx.array(kept, dtype=mx.int32), num_cached)
            stats.lap("compact", tic, *[c.state for c in cache])
        set_length(cache, num_cached + num + 1)
        stats.steps += 1
        stats.accepted.append(num)
        stats.tree_sizes.append(tree.size)
        drafter.accepted(new)
        tokens.extend(new)
        _follow(prompt_cache, drafter, tokens)
        for i, token in enumerate(new):
            yield token, i < num


def _reuse(
    target: Target,
    drafter: Drafter,
    sequence: list[int],
    window_size: int,
    primes: bool,
    prompt_cache: PromptCache,
) -> int:
    """Rewind ``prompt_cache`` and the drafter to their prefix shared with ``sequence``;
    returns its length ``keep`` (the prompt pass reads ``sequence[keep:]``).

    A drafter reading ``C = window_size`` recent states re-reads ``C - 1`` kept tokens;
    one with ``restore_sequence`` gets its saved state back (it may keep fewer tokens),
    others are reset (a primed drafter without its state then re-reads everything).
    """
    common = prompt_cache.reusable(sequence, "speculative")
    keep = max(0, common - (window_size - 1))
    if primes:
        keep = min(keep, max(common - 1, 0))  # entry i of a primed drafter reads token i + 1
    restore = getattr(drafter, "restore_sequence", None)
    state = prompt_cache.drafter_state if prompt_cache.drafter is drafter else None
    if keep and callable(restore) and state is not None:
        keep = min(keep, int(restore(state, keep)))
    else:
        drafter.reset(sequence)
        if primes:
            keep = 0
    if prompt_cache.kind != "speculative":
        prompt_cache.cache, prompt_cache.kind = target.make_cache(), "speculative"
    set_length(prompt_cache.cache, keep)
    prompt_cache.held = list(sequence)  # the prompt pass reads the rest
    return keep


def _follow(prompt_cache: PromptCache | None, drafter: Drafter, tokens: list[int]) -> None:
    """After a step: the cache holds the K/V of every token but the root (the last), and
    the drafter's state is saved next to it."""
    if prompt_cache is None:
        return
    prompt_cache.held.extend(tokens[len(prompt_cache.held) : len(tokens) - 1])
    save = getattr(drafter, "save_sequence", None)
    prompt_cache.drafter = drafter
    prompt_cache.drafter_state = save() if callable(save) else None


def _path_next(result: Acceptance) -> mx.array:
    """``(P,)`` the token after each node of the chosen path: the next drafted token, and
    the new root after the last accepted one (later entries are never read)."""
    following = mx.concatenate([result.drafted, result.next_root[None]])
    at_root = mx.arange(following.shape[0]) == result.num_accepted
    return mx.where(at_root, result.next_root, following)


def _context(
    hidden: mx.array,
    root: mx.array,
    position: mx.array,
    tokens: list[int],
    params: SamplingParams,
    window: HiddenWindow | None,
) -> DraftContext:
    """The :class:`DraftContext` of a proposal (with the recent hidden states if kept)."""
    if window is None:
        return DraftContext(hidden, root, position, tokens, params)
    return DraftContext(
        hidden, root, position, tokens, params, window.rows, window.count, window.tokens
    )


def _draft_arrays(draft: Draft | None) -> list[mx.array]:
    """The arrays of a (lazy) draft evaluated in the step's sync: beams, the valid mask
    (the host reads both), a sampled beam's proposal and the drafter's state."""
    if draft is None:
        return []
    return [a for a in (draft.beams, draft.valid, draft.proposal, *draft.state) if a is not None]


def _host_draft(draft: Draft) -> tuple[np.ndarray, np.ndarray | None]:
    """``(beams (W, L), valid (W, L) or None)`` on the host, for :func:`pack`."""
    valid = None if draft.valid is None else np.array(draft.valid)
    return np.array(draft.beams), valid


def _encode(tokenizer: TokenizerWrapper, prompt: str | list[int] | mx.array) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt.astype(mx.int32)
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(prompt, dtype=mx.int32)


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int] | mx.array,
    max_tokens: int = 256,
    *,
    drafter: Drafter | None = None,
    beam_width: int = 1,
    beam_length: int = 4,
    sampler: SamplingParams | None = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    logits_processors: list | None = None,
    acceptance: str = "exact",
    stats: StepStats | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[GenerationResponse]:
    """Stream a response token by token, as ``mlx_lm.stream_generate`` does.

    With ``drafter=None`` this is autoregressive decoding (token for token what mlx-lm
    produces for the same model, sampler and seed); with a drafter it is speculative
    decoding with the same output (greedy: identical tokens; sampling: the same
    distribution). EOS and ``max_tokens`` end the output at exactly the token AR would.

    Args:
        model: An mlx-lm model.
        tokenizer: Its tokenizer (``TokenizerWrapper`` or HF tokenizer).
        prompt: Text (already chat-formatted if wanted) or token ids.
        max_tokens: Maximum tokens to generate.
        drafter: ``None`` for AR, else a drafter (e.g. a loaded ReDrafter head).
        beam_width: ``W`` beams per step.
        beam_length: ``L`` tokens per beam including the root (``L - 1`` drafted).
        sampler: Sampling parameters; overrides ``temp``/``top_p``/``min_p``/``top_k``.
        temp, top_p, min_p, top_k: Sampling settings (``temp == 0``: greedy).
        logits_processors: mlx-lm logits processors (AR only).
        acceptance: ``"exact"`` (default) or ``"redrafter"`` (approximate; for comparison)
            for deterministic drafts; drafts sampled by a stochastic drafter (a draft model
            at ``temp > 0``) are always verified by the chain rule.
        stats: Optional :class:`StepStats` to fill (speculative decoding).
        prompt_cache: A :class:`~mlx_redrafter.prompt_cache.PromptCache`, updated in
            place: ``prompt`` continues the conversation it holds, and only the tokens
            its K/V do not cover are prefilled (mlx-lm's ``prompt_cache`` semantics).
    """
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    params = sampler or SamplingParams(
        temp=temp,
        top_p=top_p,
        min_p=min_p,
        top_k=top_k,
        logits_processors=tuple(logits_processors or ()),
    )
    prompt_arr = _encode(tokenizer, prompt)
    if prompt_arr.size == 0:
        raise ValueError("the prompt is empty")
    num_prompt = prompt_arr.size
    if prompt_cache is not None:
        if not isinstance(prompt_cache, PromptCache):
            raise TypeError(
                "prompt_cache must be an mlx_redrafter PromptCache "
                f"(mlx_redrafter.prompt_cache.make_prompt_cache), got {type(prompt_cache).__name__}"
            )
        prompt_arr = mx.array(prompt_cache.tokens + prompt_arr.tolist(), dtype=mx.int32)
    _check_context(model, prompt_arr.size)
    stats = stats if stats is not None else StepStats()
    if drafter is None:
        tokens = (
            (token, False, logprobs)
            for token, logprobs in ar_tokens(model, prompt_arr, params, -1, prompt_cache, stats)
        )
    else:
        if beam_width < 1 or beam_length < 2:
            raise ValueError("beam_width must be >= 1 and beam_length >= 2")
        if acceptance not in ("exact", "redrafter"):
            raise ValueError(f"unknown acceptance rule {acceptance!r} (exact or redrafter)")
        target = Target(model, taps=getattr(drafter, "feature_layers", None))
        tokens = (
            (token, from_draft, None)
            for token, from_draft in speculative_tokens(
                target,
                drafter,
                prompt_arr.tolist(),
                params,
                beam_width,
                beam_length,
                stats,
                acceptance,
                prompt_cache,
            )
        )
    record = None
    if prompt_cache is not None:
        prompt_cache.tokens = prompt_arr.tolist()
        record = prompt_cache.tokens
    yield from _responses(
        tokenizer, num_prompt, tokens, max_tokens, stats, beam_length, drafter, record
    )


def _check_context(model: nn.Module, num_prompt: int) -> None:
    args = getattr(model, "args", None)
    limit = getattr(args, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and num_prompt >= limit:
        raise ValueError(
            f"prompt of {num_prompt} tokens does not fit the model's context ({limit} tokens)"
        )


class _Clock:
    """Prompt and generation timing as mlx-lm reports it."""

    def __init__(self, num_prompt: int):
        self.num_prompt = num_prompt
        self.start = time.perf_counter()
        self.prompt_tps = 0.0

    def first_token(self) -> None:
        """The prompt pass is over: its rate is fixed and generation timing starts."""
        self.prompt_tps = self.num_prompt / (time.perf_counter() - self.start)
        self.start = time.perf_counter()

    def generation_tps(self, count: int) -> float:
        return count / (time.perf_counter() - self.start)


def _response(
    clock: _Clock,
    text: str,
    token: int,
    count: int,
    logprobs: mx.array | None,
    from_draft: bool,
    stats: StepStats,
    depth: int,
    finish_reason: str | None = None,
) -> GenerationResponse:
    """The response after ``count`` tokens; ``depth`` is ``L - 1``, or 0 for AR (one step
    per token)."""
    steps = stats.steps if depth else count
    return GenerationResponse(
        text=text,
        token=token,
        logprobs=logprobs,
        from_draft=from_draft,
        prompt_tokens=clock.num_prompt,
        prompt_tps=clock.prompt_tps,
        generation_tokens=count,
        generation_tps=clock.generation_tps(count),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish_reason,
        steps=steps,
        acceptance_by_depth=stats.acceptance_by_depth(depth),
        cached_tokens=stats.cached_tokens,
    )


def _responses(
    tokenizer: TokenizerWrapper,
    num_prompt: int,
    tokens: Iterator[tuple[int, bool, mx.array | None]],
    max_tokens: int,
    stats: StepStats,
    beam_length: int,
    drafter: Drafter | None,
    record: list[int] | None = None,
) -> Iterator[GenerationResponse]:
    """Turn a token stream into mlx-lm style responses (detokenising, EOS, max_tokens);
    every token emitted (an ending EOS included) is appended to ``record`` if given."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    depth = beam_length - 1 if drafter is not None else 0
    clock = _Clock(num_prompt)
    n = 0
    token, from_draft, logprobs = -1, False, None
    for n, (token, from_draft, logprobs) in enumerate(tokens):
        if n == 0:
            clock.first_token()
        if record is not None:
            record.append(token)
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
        if (n + 1) == max_tokens:
            break
        yield _response(
            clock, detokenizer.last_segment, token, n + 1, logprobs, from_draft, stats, depth
        )
    detokenizer.finalize()
    finish = "stop" if token in tokenizer.eos_token_ids else "length"
    yield _response(
        clock, detokenizer.last_segment, token, n + 1, logprobs, from_draft, stats, depth, finish
    )


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response; ``kwargs`` go to :func:`stream_generate`."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print_stats(response, speculative=kwargs.get("drafter") is not None)
    return text


def print_stats(response: GenerationResponse, speculative: bool, file=sys.stdout) -> None:
    """Print mlx-lm's three stats lines (plus tokens per step when speculative)."""
    print(
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        file=file,
    )
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
        file=file,
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=file)
    if speculative:
        # the first token comes from the prompt pass, not from a verification step
        per_step = (response.generation_tokens - 1) / max(response.steps, 1)
        print(f"Tokens per step: {per_step:.3f}", file=file)
        depth = " ".join(f"{a:.3f}" for a in response.acceptance_by_depth)
        print(f"Acceptance by depth: {depth}", file=file)
