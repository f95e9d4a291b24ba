"""Continuous-batching generation for an unmodified mlx-lm model (greedy or seeded sampling).

:class:`SlotGenerator` keeps ``B`` sequences ("slots") in flight. Every decode step is one
forward over all ``B`` slots (one token each); the next tokens are chosen on the device and
the host syncs once per step, to read the ``(B,)`` tokens that step consumed. A slot whose
sequence ends (EOS, kept, or ``max_new_tokens``) is refilled at once: waiting prompts are
prefilled together in a separate forward (right-padded, in chunks, LM head on the last
prompt position only) and their keys/values copied into the free slots (see
:mod:`mlx_redrafter.train.slot_cache`). Host work per step is a few vectorised numpy
operations on ``(B,)`` arrays; per-row Python work happens only when a sequence ends.

Lanes: with ``streams=N`` the slots are split into ``N`` lanes, each with its own cache
and MLX stream, i.e. its own CPU thread; their forwards run concurrently (with a
single-threaded BLAS this uses ``N`` cores for everything, attention and softmax
included, not only for matrix products). Once no request is waiting, a lane whose slots
are at most half busy drops its idle slots (their keys/values are gathered into smaller
buffers), so the tail of a run does not compute for finished rows.

Shared prefix: prompts that all start with the same ids (the chat template's system turn)
get that prefix's keys/values copied in, computed once, instead of recomputed per prompt.

Kernels: unless disabled, forwards are built with :mod:`mlx_redrafter.train.fast_ops`
(fast ``exp`` in softmax and SwiGLU, grouped one-token attention), after a probe has shown
their logits agree with those of MLX's own kernels (relative difference at most 1e-4).

Pipelining: step ``t`` is launched (``mx.async_eval``) before the host reads the tokens of
step ``t - 1``, so the device never waits for the host. The host records the tokens each
step *consumed*; a slot refilled between two steps just feeds its new first token into the
next step, and the garbage the old sequence's slot produced meanwhile is never read.

Hidden states (``capture_hidden``): the backbone computes the final hidden state of every
token it consumes, prompt and response alike, so a completion can carry all of them,
``(P + R, d)``, at the cost of one ``(B, d)`` host copy per step. They are what teacher
forcing the finished sequence would give, up to float rounding (batched, chunked
forwards), and let training skip a separate extraction pass.

Sampling at ``temperature > 0`` adds Gumbel noise from a counter-based hash of
``(request seed, token index, token id)``, so a request's sample does not depend on which
other requests share its batch (or on the batch size).
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_redrafter.train import fast_ops
from mlx_redrafter.train.slot_cache import SlotCache, num_cache_layers

#: Token id used to right-pad prompts in a prefill batch (its outputs are never used).
PAD_ID = 0
#: Decode steps between releases of MLX's cache of freed buffers.
CLEAR_CACHE_EVERY = 256
#: Largest relative logit difference accepted between the fast kernels and the originals.
FAST_OPS_TOLERANCE = 1e-4

# --------------------------------------------------------------------------------------
# Model split: backbone (hidden states) and head (logits)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelParts:
    """A causal LM as backbone + LM head.

    Attributes:
        backbone: ``(B, T)`` ids and a cache list -> ``(B, T, D)`` final hidden states, or
            ``(B, T, V)`` logits when ``head_split`` is False.
        head: ``(..., D)`` -> ``(..., V)`` logits (identity when not split).
        head_split: True when prefill can skip the logits of all but the last position.
        hidden_size: ``D`` (0 when not split).
    """

    backbone: Callable[[mx.array, list[Any]], mx.array]
    head: Callable[[mx.array], mx.array]
    head_split: bool
    hidden_size: int = 0


def _identity(x: mx.array) -> mx.array:
    return x


def split_model(model: nn.Module) -> ModelParts:
    """Split ``model`` into backbone + head when that reproduces ``model(...)`` exactly.

    Handles the common mlx-lm layout (``model.model`` returns the normed hidden states and
    the head is ``model.lm_head`` or the tied ``model.model.embed_tokens.as_linear``). A
    4-token probe must give bit-identical logits to the model's own ``__call__`` (this
    catches logit soft-capping or scaling); otherwise the whole model is the backbone.
    """
    fallback = ModelParts(backbone=model, head=_identity, head_split=False)
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Module):
        return fallback
    if "lm_head" in model:
        head = model.lm_head
    else:
        embed = getattr(inner, "embed_tokens", None)
        if embed is None or not hasattr(embed, "as_linear"):
            return fallback
        head = embed.as_linear
    probe = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
    try:
        want = model(probe, cache=make_prompt_cache(model))
        hidden = inner(probe, make_prompt_cache(model))
        got = head(hidden)
    except (TypeError, ValueError, AttributeError):
        return fallback
    if got.shape != want.shape or not mx.array_equal(got, want).item():
        return fallback
    return ModelParts(backbone=inner, head=head, head_split=True, hidden_size=hidden.shape[-1])


# --------------------------------------------------------------------------------------
# Token choice
# --------------------------------------------------------------------------------------

_U32 = mx.uint32


def _mix32(x: mx.array) -> mx.array:
    """The ``lowbias32`` integer finaliser, elementwise on uint32."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, _U32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, _U32)
    return x ^ (x >> 16)


def gumbel_noise(row_seeds: mx.array, steps: mx.array, vocab_size: int) -> mx.array:
    """Gumbel(0, 1) noise that is a pure function of ``(row seed, step, token id)``.

    Args:
        row_seeds: ``(B,)`` uint32, one per sequence.
        steps: ``(B,)`` uint32, index of the token being chosen in each sequence.
        vocab_size: ``V``.

    Returns:
        ``(B, V)`` float32.
    """
    row = _mix32(row_seeds ^ _mix32(steps + mx.array(0x9E3779B9, _U32)))
    ids = mx.arange(vocab_size, dtype=_U32)[None] * mx.array(0x85EBCA77, _U32)
    bits = _mix32(row[:, None] ^ ids)
    u = ((bits >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))
    return -mx.log(-mx.log(u))


def choose_tokens(
    logits: mx.array,
    temperature: float,
    row_seeds: mx.array | None = None,
    steps: mx.array | None = None,
) -> mx.array:
    """Next token per row: argmax at ``temperature == 0``, else a seeded Gumbel-max sample.

    Args:
        logits: ``(B, V)``.
        temperature: 0 for greedy.
        row_seeds: ``(B,)`` uint32 per-sequence seeds (sampling only).
        steps: ``(B,)`` uint32 per-sequence token index (sampling only).

    Returns:
        ``(B,)`` int32 token ids.
    """
    if temperature <= 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    return _gumbel_max(logits, row_seeds, steps, 1.0 / temperature)


def _gumbel_max_body(
    logits: mx.array, row_seeds: mx.array, steps: mx.array, inverse_temperature: float
) -> mx.array:
    noise = gumbel_noise(row_seeds, steps, logits.shape[-1])
    scores = logits.astype(mx.float32) * inverse_temperature + noise
    return mx.argmax(scores, axis=-1).astype(mx.int32)


# One fused loop for the hash, the two logs and the argmax: the same ids, and at batch 128
# x 49,152 ids ~95 ms instead of ~130 ms per decode step on a 2-core CPU.
_gumbel_max = mx.compile(_gumbel_max_body)


def mix_seed(global_seed: int, request_seed: int) -> int:
    """The uint32 noise seed of a request under a global seed."""
    x = (request_seed * 0x9E3779B1 + global_seed * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 12)


# --------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One sequence to generate.

    Attributes:
        key: The caller's identifier, returned with the completion.
        tokens: Prompt ids ``(P,)``, ``P >= 1``.
        seed: Per-request sampling seed (unused when greedy).
    """

    key: Any
    tokens: tuple[int, ...]
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    """A finished sequence.

    Attributes:
        key: The request's key.
        prompt: ``(P,)`` int32 prompt ids.
        response: ``(R,)`` int32 generated ids, ``1 <= R <= max_new_tokens``, ending with an
            EOS id when ``finish_reason == "eos"``.
        finish_reason: ``"eos"`` or ``"length"``.
        hidden: ``(P + R, d)`` float16 final hidden state of every prompt and response
            position (``capture_hidden`` only, else ``None``).
    """

    key: Any
    prompt: np.ndarray
    response: np.ndarray
    finish_reason: str
    hidden: np.ndarray | None = None


@dataclass
class GenerationStats:
    """Counters of one :meth:`SlotGenerator.generate` call."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    sequences: int = 0
    decode_steps: int = 0
    prefills: int = 0
    reused_prompt_tokens: int = 0
    shrinks: int = 0
    slot_steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        """Seconds since the call started."""
        return time.perf_counter() - self.started

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second (prefill time included)."""
        return self.generated_tokens / max(self.elapsed, 1e-9)

    @property
    def occupancy(self) -> float:
        """Fraction of slot-steps that produced a kept token."""
        return self.generated_tokens / max(self.slot_steps, 1)


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


class SlotGenerator:
    """Continuous-batching generator (see the module docstring).

    Args:
        model: An mlx-lm model whose caches are plain ``KVCache`` objects.
        eos_token_ids: Ids that end a response (kept in it).
        batch_size: Number of slots ``B``.
        max_new_tokens: Longest response.
        temperature: 0 for greedy decoding.
        seed: Global sampling seed, mixed into every request's seed.
        prefill_chunk: Most prompt tokens per row in one prefill forward.
        prefill_rows: Most prompts prefilled in one forward.
        refill_min: Prefill only once this many slots of a lane are free (or none is busy).
        fast_kernels: Use :mod:`mlx_redrafter.train.fast_ops` (checked on a probe first).
        streams: Split the slots into this many lanes, each on its own MLX stream (CPU
            thread); use the number of cores, and one OpenBLAS thread. With one lane (the
            default), decode attention uses the native kernel when it is available.
        native_attention: Allow the native decode-attention kernel (one lane only: its
            host sync per layer would serialise lanes).
        shared_prefix: Ids that start most prompts (e.g. the chat template's system
            turn): their keys/values are computed once and copied into each prefill.
        capture_hidden: Return every position's final hidden state with each completion.

    Raises:
        UnsupportedModelError: If the model needs rotating/quantized/state-space caches.
        ValueError: ``capture_hidden`` for a model whose LM head does not split off.
    """

    def __init__(
        self,
        model: nn.Module,
        eos_token_ids: Iterable[int],
        *,
        batch_size: int = 64,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        prefill_chunk: int = 512,
        prefill_rows: int = 8,
        refill_min: int = 1,
        fast_kernels: bool = True,
        streams: int = 1,
        native_attention: bool = True,
        shared_prefix: Iterable[int] = (),
        capture_hidden: bool = False,
    ):
        if min(batch_size, max_new_tokens, prefill_chunk, prefill_rows, refill_min, streams) < 1:
            raise ValueError("sizes must be >= 1")
        self.model = model
        self.num_layers = num_cache_layers(model)
        self.parts = split_model(model)
        if capture_hidden and not self.parts.head_split:
            raise ValueError("hidden states need a model whose LM head splits off its backbone")
        self.capture_hidden = capture_hidden
        self.eos = np.array(sorted({int(t) for t in eos_token_ids}), dtype=np.int64)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.seed = int(seed) & 0xFFFFFFFF
        self.prefill_chunk = prefill_chunk
        self.prefill_rows = prefill_rows
        self.refill_min = min(refill_min, batch_size)
        self.streams = streams
        self.native_attention = native_attention and streams == 1
        self._lane_streams: list[Any] = []
        self.shared_prefix = tuple(int(t) for t in shared_prefix)
        self._prefix_state: tuple[list[mx.array], list[mx.array]] | None = None
        self._prefix_hidden: mx.array | None = None
        self.fast_kernels = fast_kernels and self._fast_kernels_agree()
        self.stats = GenerationStats()

    def _fast_kernels_agree(self) -> bool:
        """Whether a 2-row prefill + decode gives the same logits with the fast kernels."""
        if not fast_ops.patchable(self.model):
            return False
        prompt = mx.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=mx.int32)
        logits = []
        for enabled in (False, True):
            cache = SlotCache(self.num_layers, 2)
            cache.begin_prefill(0, prompt.shape[1])
            self._backbone(prompt, cache, enabled)
            cache.begin_decode(np.array([5, 3]))
            logits.append(self.parts.head(self._backbone(prompt[:, :1], cache, enabled)))
        scale = mx.abs(logits[0]).max().item() + 1e-6
        diff = mx.abs(logits[0] - logits[1]).max().item() / scale
        if diff > FAST_OPS_TOLERANCE:
            warnings.warn(
                f"fast kernels disagree (rel. diff {diff:.2e}); not using them", stacklevel=3
            )
            return False
        return True

    def _backbone(self, tokens: mx.array, cache: SlotCache, fast: bool) -> mx.array:
        """Build the backbone graph for ``(B, T)`` tokens, with or without the fast kernels."""
        with fast_ops.installed(self.model, fast, native=self.native_attention):
            return self.parts.backbone(tokens, cache.layers)

    # -- public ----------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Generate every request; yield completions as they finish.

        Requests are started in the order given (sort them by prompt length: rows of
        similar length waste less attention). The iterator may be abandoned at any time.
        """
        run = _Run(self, deque(requests))
        self.stats = run.stats
        yield from run.loop()

    def lane_streams(self, n: int) -> list[Any]:
        """``n`` MLX streams: the default one, then streams created once and reused."""
        device = mx.default_device()
        while len(self._lane_streams) < n - 1:
            self._lane_streams.append(mx.new_stream(device))
        return [mx.default_stream(device), *self._lane_streams[: n - 1]]

    # -- forwards ----------------------------------------------------------------------------

    def decode_step(
        self,
        cache: SlotCache,
        inputs: mx.array,
        row_seeds: mx.array | None = None,
        steps: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """``(B,)`` input ids -> ``(B,)`` next ids and the inputs' ``(B, d)`` final hidden
        states (both lazy); ``cache.begin_decode`` first."""
        h = self._backbone(inputs[:, None], cache, self.fast_kernels)[:, 0]
        return choose_tokens(self.parts.head(h), self.temperature, row_seeds, steps), h

    def prefix_state(self) -> tuple[list[mx.array], list[mx.array]] | None:
        """Keys/values ``(1, H, p, D)`` per layer of :attr:`shared_prefix` (computed once)."""
        if not self.shared_prefix:
            return None
        if self._prefix_state is None:
            p = len(self.shared_prefix)
            cache = SlotCache(self.num_layers, 1)
            cache.begin_prefill(0, p)
            prefix = mx.array([self.shared_prefix], dtype=mx.int32)
            hidden = self._backbone(prefix, cache, self.fast_kernels)
            keys = [mx.contiguous(k[..., :p, :]) for k in cache.keys]
            values = [mx.contiguous(v[..., :p, :]) for v in cache.values]
            mx.eval(keys, values, hidden)
            self._prefix_state = (keys, values)
            self._prefix_hidden = hidden
        return self._prefix_state

    def _reused_prefix(self, prompts: list[tuple[int, ...]]) -> int:
        """Length of :attr:`shared_prefix` when every prompt extends it, else 0."""
        p = len(self.shared_prefix)
        if p == 0 or any(len(q) <= p or q[:p] != self.shared_prefix for q in prompts):
            return 0
        return p

    def prefill(
        self, prompts: list[tuple[int, ...]], row_seeds: mx.array | None = None
    ) -> tuple[SlotCache, mx.array, int, np.ndarray | None]:
        """Run ``k`` prompts through the model, right-padded, ``prefill_chunk`` at a time.

        When every prompt extends :attr:`shared_prefix`, its keys/values are copied in
        instead of being recomputed.

        Args:
            prompts: ``k`` id sequences.
            row_seeds: ``(k,)`` uint32 (sampling only).

        Returns:
            The ``k``-row cache, the ``(k,)`` first generated ids (lazy), the padded
            prompt length ``T`` and (``capture_hidden`` only) the ``(k, T, d)`` float16
            hidden states of the padded prompts.
        """
        k = len(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        padded = np.full((k, width), PAD_ID, dtype=np.int32)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        tokens = mx.array(padded)
        cache = SlotCache(self.num_layers, k)
        cache.reserve(width)
        reused = self._reused_prefix(prompts)
        if reused:
            cache.fill_prefix(*self.prefix_state())
            self.stats.reused_prompt_tokens += reused * k
        last = lengths - 1
        rows = mx.arange(k)
        picked: mx.array | None = None
        hidden: list[np.ndarray] = []
        if reused and self.capture_hidden:
            prefix = np.array(self._prefix_hidden.astype(mx.float16))
            hidden.append(np.broadcast_to(prefix, (k, *prefix.shape[1:])))
        for start in range(reused, width, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, width)
            cache.begin_prefill(start, stop - start)
            h = self._backbone(tokens[:, start:stop], cache, self.fast_kernels)
            here = (last >= start) & (last < stop)
            if here.any():
                at = mx.array(np.clip(last - start, 0, stop - start - 1).astype(np.int32))
                chunk_last = h[rows, at]
                if picked is None:
                    picked = chunk_last
                else:
                    picked = mx.where(mx.array(here)[:, None], chunk_last, picked)
            if self.capture_hidden:
                hidden.append(np.array(h.astype(mx.float16)))
            if stop < width:
                mx.eval(cache.arrays(), *([] if picked is None else [picked]))
        steps = mx.zeros((k,), dtype=_U32) if row_seeds is not None else None
        first = choose_tokens(self.parts.head(picked), self.temperature, row_seeds, steps)
        states = np.concatenate(hidden, axis=1) if self.capture_hidden else None
        return cache, first, width, states


class _Lane:
    """A share of the slots with its own cache and MLX stream (one CPU thread each).

    Lanes run their forwards concurrently; the host drives them in turn. Each holds host
    mirrors of its slots: the request, whether it is active, its cache length, how many
    ids it has generated and the ids themselves.
    """

    def __init__(self, gen: SlotGenerator, size: int, stream: Any, stats: GenerationStats):
        self.gen = gen
        self.size = size
        self.stream = stream
        self.stats = stats
        self.cache = SlotCache(gen.num_layers, size)
        self.requests: list[Request | None] = [None] * size
        self.active = np.zeros(size, dtype=bool)
        self.lengths = np.zeros(size, dtype=np.int64)
        self.count = np.zeros(size, dtype=np.int64)
        self.out = np.zeros((size, gen.max_new_tokens), dtype=np.int32)
        self.seeds = np.zeros(size, dtype=np.uint32)
        self.sampling = gen.temperature > 0
        with mx.stream(stream):
            self.inputs = mx.zeros((size,), dtype=mx.int32)
        self._fed: mx.array | None = None
        self._hidden: mx.array | None = None
        self._consumed = self.active
        # capture_hidden: each slot's prompt states (P, d) and response states (R, d)
        self.prompt_hidden: list[np.ndarray | None] = [None] * size
        self.out_hidden = (
            np.zeros((size, gen.max_new_tokens, gen.parts.hidden_size), dtype=np.float16)
            if gen.capture_hidden
            else None
        )

    def launch(self) -> None:
        """Queue one decode step of every slot (the device starts at once)."""
        self._consumed = self.active.copy()
        self._fed = self.inputs
        with mx.stream(self.stream):
            self.cache.begin_decode(np.where(self._consumed, self.lengths, 0))
            seeds = steps = None
            if self.sampling:
                seeds = mx.array(self.seeds)
                steps = mx.array((self.count + 1).astype(np.uint32))
            self.inputs, hidden = self.gen.decode_step(self.cache, self._fed, seeds, steps)
            self._hidden = hidden.astype(mx.float16) if self.gen.capture_hidden else None
        mx.async_eval(self.inputs, *([] if self._hidden is None else [self._hidden]))
        self.lengths[self._consumed] += 1
        self.stats.decode_steps += 1
        self.stats.slot_steps += self.size

    def collect(self) -> Iterator[Completion]:
        """Read the ids the last launched step consumed (the one host sync per step);
        yield the sequences that ended."""
        fed = np.array(self._fed)
        idx = np.flatnonzero(self._consumed)
        self.out[idx, self.count[idx]] = fed[idx]
        if self.out_hidden is not None:
            self.out_hidden[idx, self.count[idx]] = np.array(self._hidden)[idx]
        self.count[idx] += 1
        self.stats.generated_tokens += idx.size
        is_eos = np.isin(fed[idx], self.gen.eos)
        done = idx[is_eos | (self.count[idx] >= self.gen.max_new_tokens)]
        for b in done:
            req = self.requests[b]
            n = int(self.count[b])
            reason = "eos" if np.isin(self.out[b, n - 1], self.gen.eos) else "length"
            hidden = None
            if self.out_hidden is not None:
                hidden = np.concatenate([self.prompt_hidden[b], self.out_hidden[b, :n]])
            self.active[b] = False
            self.requests[b] = None
            self.prompt_hidden[b] = None
            self.lengths[b] = 0
            self.stats.sequences += 1
            yield Completion(
                key=req.key,
                prompt=np.asarray(req.tokens, dtype=np.int32),
                response=self.out[b, :n].copy(),
                finish_reason=reason,
                hidden=hidden,
            )

    def shrink(self) -> None:
        """Keep only the active slots (once no request is waiting, idle slots are waste)."""
        keep = np.flatnonzero(self.active)
        with mx.stream(self.stream):
            self.cache.keep_rows(keep)
            self.inputs = self.inputs[mx.array(keep.astype(np.int32))]
        self.requests = [self.requests[i] for i in keep]
        self.prompt_hidden = [self.prompt_hidden[i] for i in keep]
        for name in ("active", "lengths", "count", "out", "seeds"):
            setattr(self, name, getattr(self, name)[keep])
        if self.out_hidden is not None:
            self.out_hidden = self.out_hidden[keep]
        self.size = int(keep.size)
        self.stats.shrinks += 1

    def refill(self, queue: deque) -> None:
        """Prefill waiting requests into free slots; their first ids become the next inputs."""
        free = np.flatnonzero(~self.active)
        if not queue or free.size == 0:
            return
        if free.size < min(self.gen.refill_min, self.size) and self.active.any():
            return
        slots = free[: min(free.size, len(queue))]
        for start in range(0, slots.size, self.gen.prefill_rows):
            group = slots[start : start + self.gen.prefill_rows]
            self._prefill_into(group, [queue.popleft() for _ in group])

    def _prefill_into(self, slots: np.ndarray, reqs: list[Request]) -> None:
        gen = self.gen
        row_seeds = np.array([mix_seed(gen.seed, r.seed) for r in reqs], dtype=np.uint32)
        prompts = [tuple(r.tokens) for r in reqs]
        with mx.stream(self.stream):
            source, first, width, states = gen.prefill(
                prompts, mx.array(row_seeds) if self.sampling else None
            )
            longest = max(len(p) for p in prompts)
            self.cache.reserve(max(width, longest + gen.max_new_tokens))
            self.cache.insert_rows([int(s) for s in slots], source, width)
            where = np.zeros(self.size, dtype=bool)
            where[slots] = True
            source_row = np.zeros(self.size, dtype=np.int32)
            source_row[slots] = np.arange(len(reqs), dtype=np.int32)
            self.inputs = mx.where(mx.array(where), first[mx.array(source_row)], self.inputs)
        for row, (s, r, p) in enumerate(zip(slots, reqs, prompts, strict=True)):
            self.requests[s] = r
            self.lengths[s] = len(p)
            if states is not None:
                self.prompt_hidden[s] = states[row, : len(p)].copy()
        self.active[slots] = True
        self.count[slots] = 0
        self.seeds[slots] = row_seeds
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.prefills += 1


class _Run:
    """One :meth:`SlotGenerator.generate` call: the lanes and the shared request queue."""

    def __init__(self, gen: SlotGenerator, queue: deque):
        self.queue = queue
        self.stats = GenerationStats()
        n = max(1, min(gen.streams, gen.batch_size))
        sizes = [gen.batch_size // n + (i < gen.batch_size % n) for i in range(n)]
        streams = gen.lane_streams(n)
        self.lanes = [_Lane(gen, k, st, self.stats) for k, st in zip(sizes, streams, strict=True)]
        self.steps = 0

    def loop(self) -> Iterator[Completion]:
        """Decode until the queue is drained and every slot is idle."""
        for lane in self.lanes:
            lane.refill(self.queue)
        while True:
            busy = [lane for lane in self.lanes if lane.active.any()]
            if not busy:
                return
            for lane in busy:
                lane.launch()
            self.steps += 1
            if self.steps % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()  # shapes change every step: do not hoard freed buffers
            for lane in busy:
                yield from lane.collect()
                lane.refill(self.queue)
                if not self.queue and 0 < lane.active.sum() <= lane.size // 2:
                    lane.shrink()
