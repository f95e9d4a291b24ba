"""The user's sampling transforms, shared by the autoregressive and speculative paths.

Both paths must target *one* distribution: the target's next-token distribution after the
logits processors, top-p, min-p, top-k and temperature, applied exactly as mlx-lm's
``make_sampler`` applies them (same functions, same order). :class:`SamplingParams.logits`
returns that distribution as unnormalised log-weights ``(..., V)`` (masked entries are
``-inf``); speculative acceptance uses ``softmax`` of it. AR sampling applies
:meth:`SamplingParams.warp` to the log-probs it computed exactly as mlx-lm does and draws
with ``mx.random.categorical``: bit-identical to mlx-lm's sampler for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; ``temp == 0`` means greedy (argmax).

    Attributes:
        temp: Temperature (0 = greedy).
        top_p: Nucleus threshold in (0, 1); 0 or 1 disables it.
        min_p: Min-p threshold relative to the top token; 0 disables it.
        top_k: Keep the k most likely tokens; 0 disables it.
        min_tokens_to_keep: As in mlx-lm's ``apply_min_p``.
        logits_processors: mlx-lm style processors ``f(tokens (T,), logits (1, V))``
            applied to raw logits before everything else.
    """

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    min_tokens_to_keep: int = 1
    logits_processors: Sequence[LogitsProcessor] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature 0)."""
        return self.temp == 0

    def process(self, history: mx.array, logits: mx.array) -> mx.array:
        """Apply the logits processors.

        Args:
            history: ``(T,)`` int32 tokens so far (prompt + output) for this row.
            logits: ``(1, V)`` raw logits.

        Returns:
            ``(1, V)`` processed logits.
        """
        for processor in self.logits_processors:
            logits = processor(history, logits)
        return logits

    def logits(self, logits: mx.array) -> mx.array:
        """The sampling distribution as unnormalised log-weights.

        Args:
            logits: ``(..., V)`` processed logits.

        Returns:
            ``(..., V)`` log-weights (the logits' dtype); softmax gives the distribution to
            sample from. For greedy decoding, the normalised log-probs.
        """
        return self.warp(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    def warp(self, logprobs: mx.array) -> mx.array:
        """mlx-lm's sampler chain on normalised log-probs: top-p, min-p, top-k, temperature.

        Args:
            logprobs: ``(..., V)`` normalised log-probs. They are not normalised again: a
                second ``logsumexp`` shifts every entry by a rounding error, which can move
                a token across the top-p boundary and break bit-identity with mlx-lm.

        Returns:
            ``(..., V)`` log-weights, bit-identical to what mlx-lm's ``make_sampler`` hands
            to ``mx.random.categorical`` (``logprobs`` itself when greedy).
        """
        if self.greedy:
            return logprobs
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1 / self.temp)

    def log_weights(self, logits: mx.array) -> mx.array:
        """The sampling distribution as unnormalised log-weights, as cheaply as possible.

        Same distribution as :meth:`logits` (``softmax`` of either is identical in exact
        arithmetic); without top-p, min-p or top-k, which need normalised log-probs, it is
        just ``logits / temp`` (no ``logsumexp`` over ``V``).

        Args:
            logits: ``(..., V)`` processed logits.

        Returns:
            ``(..., V)`` log-weights (``-inf`` = excluded token).
        """
        if self.greedy or (0 < self.top_p < 1.0) or self.min_p != 0.0 or self.top_k > 0:
            return self.logits(logits)
        return logits * (1 / self.temp)

    def probs(self, logits: mx.array) -> mx.array:
        """``(..., V)`` normalised probabilities of the sampling distribution."""
        return mx.softmax(self.logits(logits).astype(mx.float32), axis=-1)

    def sample(self, logits: mx.array, key: mx.array | None = None) -> mx.array:
        """Draw a token (argmax when greedy).

        Args:
            logits: ``(..., V)`` processed logits.
            key: Optional PRNG key; the global MLX generator is used when ``None``.

        Returns:
            ``(...)`` uint32/int32 token ids.
        """
        return self.draw(self.logits(logits), key)

    def draw(self, weights: mx.array, key: mx.array | None = None) -> mx.array:
        """Draw from log-weights that :meth:`logits` or :meth:`warp` returned.

        Args:
            weights: ``(..., V)`` log-weights of the sampling distribution.
            key: Optional PRNG key; the global MLX generator is used when ``None``.

        Returns:
            ``(...)`` uint32/int32 token ids (argmax when greedy).
        """
        if self.greedy:
            return mx.argmax(weights, axis=-1)
        return mx.random.categorical(weights, key=key)
