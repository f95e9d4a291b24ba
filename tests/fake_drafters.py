"""Drafters used by engine tests: an oracle that knows the AR continuation, random beams,
the target's most probable tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafters.base import Draft, DraftContext


class OracleDrafter:
    """Drafts the target's own AR continuation in beam ``truth_beam`` (long acceptances).

    Other beams share a prefix of random length with the truth and then diverge, so the
    tree has real branching. ``sequence`` is prompt + the AR output (+ padding).
    """

    stochastic = False
    needs_host_tokens = False

    def __init__(
        self,
        sequence: list[int],
        vocab_size: int,
        seed: int = 0,
        wrong_every: int = 0,
        truth_beam: int = 0,
    ):
        self.sequence = mx.array(sequence + [0] * 64, dtype=mx.int32)
        self.vocab_size = vocab_size
        self.key = mx.random.key(seed)
        self.wrong_every = wrong_every
        #: The beam that holds the truth (the others are decoys sharing a prefix with it).
        self.truth_beam = truth_beam
        self.calls = 0

    def reset(self, prompt_tokens: list[int]) -> None:
        self.calls = 0

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        self.calls += 1
        self.key, k1, k2 = mx.random.split(self.key, 3)
        idx = context.position + mx.arange(length)
        truth = self.sequence[mx.minimum(idx, self.sequence.size - 1)]
        truth = mx.concatenate([context.root[None], truth[1:]])
        if self.wrong_every and self.calls % self.wrong_every == 0:
            # occasionally break the truth at a random depth
            cut = mx.random.randint(1, length, key=k1)
            noise = mx.random.randint(0, self.vocab_size, (length,), key=k2)
            truth = mx.where(mx.arange(length) >= cut, noise, truth)
        beams = [truth]
        for w in range(1, width):
            kw1, kw2 = (
                mx.random.split(mx.random.fold_in(k2, w))
                if hasattr(mx.random, "fold_in")
                else mx.random.split(k2)
            )
            share = mx.random.randint(1, length, key=kw1)
            noise = mx.random.randint(0, self.vocab_size, (length,), key=kw2)
            beams.append(mx.where(mx.arange(length) < share, truth, noise))
        first = min(self.truth_beam, width - 1)
        beams[0], beams[first] = beams[first], beams[0]
        return Draft(beams=mx.stack(beams).astype(mx.int32))

    def accepted(self, tokens: list[int]) -> None:
        pass


class RandomDrafter:
    """Uniformly random beams (almost nothing is accepted)."""

    stochastic = False
    needs_host_tokens = False

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.key = mx.random.key(seed)

    def reset(self, prompt_tokens: list[int]) -> None:
        pass

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        self.key, sub = mx.random.split(self.key)
        rest = mx.random.randint(0, self.vocab_size, (width, length - 1), key=sub)
        roots = mx.broadcast_to(context.root.reshape(1, 1), (width, 1))
        return Draft(beams=mx.concatenate([roots, rest], axis=1).astype(mx.int32))

    def accepted(self, tokens: list[int]) -> None:
        pass


def probable_beams(
    probs, context: list[int], length: int, widths: tuple[int, int] = (3, 2)
) -> list[list[int]]:
    """Beams ``[root, a_i, b_ij, ...]`` whose tokens carry the target's probability.

    ``a_i`` are the ``widths[0]`` most likely tokens after ``context`` (which ends with the
    root), ``b_ij`` the ``widths[1]`` most likely after ``a_i``; later positions follow the
    argmax. Every level of the tree has several siblings, each holding real mass, so the
    exact walk's renormalisation and residual terms all change what it emits.

    Args:
        probs: ``context -> (V,)`` the target's sampling distribution after ``context``.
        context: Host tokens, the root last.
        length: Beam length ``L >= 3`` (root included).
        widths: Siblings at the first and second drafted level.
    """
    beams = []
    for a in np.argsort(-probs(context), kind="stable")[: widths[0]]:
        for b in np.argsort(-probs([*context, int(a)]), kind="stable")[: widths[1]]:
            beam = [context[-1], int(a), int(b)]
            while len(beam) < length:
                beam.append(int(np.argmax(probs(context + beam[1:]))))
            beams.append(beam)
    return beams


class ProbableDrafter:
    """A host drafter proposing :func:`probable_beams` from the target's own distribution
    (lookup-like deterministic beams that are often, but not always, accepted)."""

    stochastic = False
    needs_host_tokens = True

    def __init__(self, model, widths: tuple[int, int] = (3, 2)):
        self.model = model
        self.widths = widths

    def reset(self, prompt_tokens: list[int]) -> None:
        pass

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        def probs(tokens: list[int]) -> np.ndarray:
            logits = self.model(mx.array(tokens)[None])[0, -1]
            return np.array(context.params.probs(logits))

        beams = probable_beams(probs, list(context.tokens), length, self.widths)[:width]
        return Draft(beams=mx.array(beams, dtype=mx.int32))

    def accepted(self, tokens: list[int]) -> None:
        pass
