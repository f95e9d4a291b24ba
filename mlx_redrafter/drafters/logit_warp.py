"""Apple's top-k logit warp for ReDrafter beam search (``warp_logits`` in Apple's
``recurrent_drafting/modeling_drafter.py``).

Apple's drafter computes its logits as ``warp_logits(maintain_logits(z))``: the row's
maximum is subtracted, then every entry below the ``k``-th largest (``k = 50``) is set to
``-50000`` (ties with the ``k``-th are kept); the beam search takes the log-softmax of
that. The kept tokens' log-probabilities are thus renormalised over the top ``k``, which
changes how beams of different tails compare: without the warp a converted Apple head
draws different beams for ``W >= 2``.
"""

from __future__ import annotations

import mlx.core as mx

#: Apple's ``top_k`` default in ``warp_logits``.
APPLE_TOP_K = 50
#: Apple's ``LOG_0``: the value given to the warped-out entries.
LOG_0 = -50000.0


def warp_top_k(logits: mx.array, top_k: int, fill: float = LOG_0) -> mx.array:
    """``logits`` ``(..., K)`` minus their row maximum, entries below the row's ``top_k``-th
    largest set to ``fill`` (``top_k`` is capped at ``K``)."""
    k = min(int(top_k), logits.shape[-1])
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return mx.where(logits < kth, mx.array(fill, dtype=logits.dtype), shifted)
