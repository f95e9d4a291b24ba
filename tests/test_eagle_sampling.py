"""The EAGLE drafter's *sampled* chain (``temp > 0``, ``W = 1``, no dynamic tree).

``EagleDrafter.sample_chain`` draws each drafted token from the head's distribution under
the target's sampling transforms and reports it as ``Draft.proposal``; the exact walk
tests the chain with ``min(1, p/q)`` and, after a rejection, draws from
``max(0, p - q)``. End to end through ``stream_generate``, the first three tokens (the
prefill's sample, then the first speculative step's chain of two drafted tokens) must
follow the target's own law, at T = 1 and at T = 0.7 with top-p: chi-square on the joint
law of the first two tokens and on that of the first three (the third tests the chain's
second depth).

The head (:class:`CloseEagle`) is the drafter's own machinery — cache, tree attention,
Gumbel draws, the proposal it reports — with logits steered to the target's after the
drafted prefix, a fixed perturbation added and the target's favourite demoted, so most
drafts are accepted and the rejections leave a residual far from ``p``. The same draws
fail the test when the drafter reports a flattened ``q`` (its ``log_q`` at another
temperature than it sampled from) and when the walk's residual after a rejection is
``p`` instead of ``max(0, p - q)``. ``sample=False`` keeps the chain deterministic (beam
search) at T = 1.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import walk_mutant
from test_eagle import Case, random_head
from test_exact_sampling import PROMPT, VOCAB, Setup, goodness_of_fit, tvd_bound
from tiny_models import byte_tokenizer

from mlx_redrafter import accept
from mlx_redrafter.drafters.eagle import EagleDrafter, lm_head_rows
from mlx_redrafter.engine import stream_generate
from mlx_redrafter.sampling import SamplingParams

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

DRAWS = 400
LENGTH = 3  # a chain of two drafted tokens after the root
SETTINGS = {
    "plain": SamplingParams(temp=1.0),
    "temp_top_p": SamplingParams(temp=0.7, top_p=0.9),
}
#: A reduced draft vocabulary without 15 and 31 (some of the target's mass at both depths:
#: only the residual emits them) and four unlikely ids.
REDUCED = np.array([i for i in range(VOCAB) if i not in (4, 12, 15, 20, 27, 31)], np.int32)
#: Perturbation of the draft logits: a fixed random vector of this scale, and the target's
#: favourite demoted by DEMOTE (under-proposed: the residual after a rejection carries it).
BIAS, DEMOTE, HEAD_MIX = 0.5, 2.0, 0.05


class Law:
    """The tiny target's logits after ``PROMPT + [a]`` and ``PROMPT + [a, b]`` for every
    ``a, b`` (plain batched forwards), and the enumerated law of the first three tokens."""

    def __init__(self, setup: Setup):
        self.setup = setup
        model = setup.model
        ids = range(VOCAB)
        one = mx.array([[*PROMPT, a] for a in ids])
        self.after_one = model(one)[:, -1]  # (V, V)
        two = mx.array([[*PROMPT, a, b] for a in ids for b in ids])
        self.after_two = model(two)[:, -1].reshape(VOCAB, VOCAB, VOCAB)
        mx.eval(self.after_one, self.after_two)

    def joint(self, params: SamplingParams) -> np.ndarray:
        """``(V, V, V)`` ``P(x0, x1, x2)`` after ``PROMPT`` (x0: the prefill's sample)."""
        p0 = self.setup.next_probs(PROMPT, params).astype(np.float64)
        p1 = np.array(params.probs(self.after_one), dtype=np.float64)
        p2 = np.array(params.probs(self.after_two), dtype=np.float64)
        p0[p0 < 1e-4] = 0.0
        joint = p0[:, None, None] * p1[:, :, None] * p2
        return joint / joint.sum()


class SteeredHead:
    """An :class:`EagleHead` whose ``logits`` are replaced by ``steer`` (all else its own)."""

    def __init__(self, head, steer):
        self._head, self._steer = head, steer

    def __getattr__(self, name):
        return getattr(self._head, name)

    def logits(self, out: mx.array, rows: mx.array) -> mx.array:
        return self._steer(out, self._head.logits(out, rows))


class CloseEagle(EagleDrafter):
    """A random EAGLE head (full or reduced draft vocabulary) sampling chains whose draft
    logits are the target's after the prefix (the root, then the drafted tokens; known for prefixes of at most two tokens
    after ``PROMPT``, the first speculative step's), plus a fixed random vector, minus
    ``DEMOTE`` on the target's favourite, plus a little of the head's own logits.

    Everything ``sample_chain`` does is the drafter's own (the cache writes, the nodes'
    attention, the Gumbel draws, the proposal ``log_q`` it reports). Later steps' prefixes
    use the same tables (a proposal off the target's law there: still exact, accepted
    less). It counts the proposals that carried a sampled chain.
    """

    def __init__(self, model, law: Law, draft_vocab: np.ndarray | None = None, **kw):
        head = random_head(model, 1, draft_vocab)
        rows = lm_head_rows(model, draft_vocab)
        super().__init__(head, rows, model.model.embed_tokens, draft_vocab, **kw)
        self.head = SteeredHead(head, self._steer)
        self.law = law
        rng = np.random.default_rng(7)
        size = int(rows.shape[0])
        self.bias = mx.array((BIAS * rng.standard_normal(size)).astype(np.float32))
        self.sampled = 0
        self.proposals = 0

    def _advance(self, context, depth):
        self._path = [context.root.astype(mx.int32).reshape(())]
        return super()._advance(context, depth)

    def _node(self, token, *args):
        self._path.append(token.astype(mx.int32).reshape(()))
        return super()._node(token, *args)

    def _steer(self, out: mx.array, own: mx.array) -> mx.array:
        if len(self._path) == 1:
            target = self.law.after_one[self._path[0]]
        else:
            target = self.law.after_two[self._path[-2], self._path[-1]]
        if self.vocab is not None:
            target = target[self.vocab]
        favourite = target == target.max()
        return (target + self.bias - DEMOTE * favourite)[None] + HEAD_MIX * own

    def propose(self, context, width, length):
        draft = super().propose(context, width, length)
        self.proposals += 1
        self.sampled += draft.proposal is not None
        return draft


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(seed=0)


@pytest.fixture(scope="module")
def law(setup) -> Law:
    return Law(setup)


@pytest.fixture(scope="module")
def tokenizer():
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}
    return tok


def first_tokens(setup, law, tokenizer, params, seed: int = 60000, **kw):
    """``(DRAWS, 3)`` first three tokens ``stream_generate`` emits after ``PROMPT`` with a
    fresh :class:`CloseEagle` chain (one seed per draw), the fraction of draws whose second
    and third tokens were accepted drafts ``(2,)``, and the drafter."""
    drafter = CloseEagle(setup.model, law, **kw)
    draws, drafted = [], np.zeros(2)
    for i in range(DRAWS):
        mx.random.seed(seed + i)
        responses = list(
            stream_generate(
                setup.model,
                tokenizer,
                PROMPT,
                max_tokens=3,
                sampler=params,
                drafter=drafter,
                beam_width=1,
                beam_length=LENGTH,
            )
        )
        draws.append([r.token for r in responses])
        drafted += [r.from_draft for r in responses[1:]]
    return np.array(draws), drafted / DRAWS, drafter


def fit(draws: np.ndarray, joint: np.ndarray) -> dict[str, tuple[float, float, int]]:
    """:func:`goodness_of_fit` of the first two tokens and of the first three."""
    pair = goodness_of_fit(draws[:, :2], joint.sum(axis=2))
    rows = np.stack([draws[:, 0] * VOCAB + draws[:, 1], draws[:, 2]], axis=1)
    triple = goodness_of_fit(rows, joint.reshape(VOCAB * VOCAB, VOCAB))
    return {"pair": pair, "triple": triple}


def _describe(result) -> str:
    return ", ".join(
        f"{k}: p={p:.2e} tvd={t:.3f} impossible={n}" for k, (p, t, n) in result.items()
    )


@pytest.mark.parametrize(
    "name, vocab",
    [("plain", None), ("temp_top_p", None), ("plain", REDUCED)],
    ids=["plain", "temp_top_p", "plain_reduced_vocab"],
)
def test_sampled_chain_keeps_the_target_law(setup, law, tokenizer, name, vocab):
    params = SETTINGS[name]
    joint = law.joint(params)
    draws, accepted, drafter = first_tokens(setup, law, tokenizer, params, draft_vocab=vocab)
    assert drafter.sampled == drafter.proposals > 0  # every draft was a sampled chain
    # drafts accepted often (both depths), rejected often enough for the residual to matter
    assert 0.3 < accepted[0] < 0.9 and accepted[1] > 0.15, accepted
    if vocab is not None:  # ids outside the draft vocabulary came from the residual
        assert np.isin(draws[:, 1:], np.setdiff1d(np.arange(VOCAB), vocab)).any()
    result = fit(draws, joint)
    for p_value, _, impossible in result.values():
        assert impossible == 0, _describe(result)
        assert p_value > 1e-3, _describe(result)
    pair = joint.sum(axis=2)
    assert result["pair"][1] < tvd_bound(pair, DRAWS), _describe(result)


def _flattened(sample_chain):
    """``sample_chain`` reporting ``log_q`` at twice the temperature it sampled from."""

    def flattened(self, context, depth):
        chain, log_q = sample_chain(self, context, depth)
        flat = 0.5 * log_q
        return chain, flat - mx.logsumexp(flat, axis=-1, keepdims=True)

    return flattened


def test_a_misreported_proposal_fails_the_same_test(setup, law, tokenizer, monkeypatch):
    """Power: a drafter that samples from ``q`` but reports a flattened ``q`` fails (same
    seeds, same number of draws)."""
    monkeypatch.setattr(EagleDrafter, "sample_chain", _flattened(EagleDrafter.sample_chain))
    params = SETTINGS["plain"]
    draws, _, _ = first_tokens(setup, law, tokenizer, params)
    result = fit(draws, law.joint(params))
    assert min(p for p, _, _ in result.values()) < 1e-3, _describe(result)


def test_a_broken_residual_fails_the_same_test(setup, law, tokenizer, monkeypatch):
    """Power: the walk drawing from ``p`` after rejecting the sampled child, instead of
    from ``max(0, p - q)``, fails (same seeds, same number of draws).

    (``naive_residual``, the mutant the dynamic-tree test uses, leaves the rejected
    children unmasked at the stop node. On a chain that is no bug: the only child was
    drawn from ``q`` and rejected only where ``q > p``, where ``max(0, p - q)`` is zero
    already, so the draws are identical.)"""
    monkeypatch.setattr(accept, "_compiled_walk", walk_mutant("sampled_residual_is_p"))
    params = SETTINGS["plain"]
    draws, _, _ = first_tokens(setup, law, tokenizer, params)
    result = fit(draws, law.joint(params))
    assert min(p for p, _, _ in result.values()) < 1e-3, _describe(result)


def test_sample_false_drafts_beam_search_at_t1(setup, tokenizer, monkeypatch):
    """``sample=False`` at T = 1: the chain is the head's best path (beam search, no
    proposal) whatever the seed; ``sample=True`` draws chains that vary with it."""
    params = SETTINGS["plain"]
    case = Case("gqa_bias_full", seed=5)
    chains = {}
    for sample in (False, True):
        drafter = EagleDrafter(case.head, case.rows, case.embed, case.vocab, sample=sample)
        seen = set()
        for seed in range(8):
            context = dataclasses.replace(case.context(drafter, 6), params=params)
            mx.random.seed(seed)
            draft = drafter.propose(context, 1, 5)
            assert (draft.proposal is None) == (not sample)
            seen.add(tuple(np.array(draft.beams)[0].tolist()))
        chains[sample] = seen
    drafter = EagleDrafter(case.head, case.rows, case.embed, case.vocab, sample=False)
    best = drafter.grow(dataclasses.replace(case.context(drafter, 6), params=params), 1, 4)
    root = int(case.tokens[case.n])
    assert chains[False] == {(root, *np.array(best.last)[0].tolist())}
    assert len(chains[True]) > 1

    # through the engine: every draft of a T = 1 run is deterministic
    model = setup.model
    drafter = EagleDrafter(
        random_head(model, 1), lm_head_rows(model, None), model.model.embed_tokens, sample=False
    )
    proposals = []
    propose = drafter.propose

    def spy(context, width, length):
        draft = propose(context, width, length)
        proposals.append(draft.proposal)
        return draft

    monkeypatch.setattr(drafter, "propose", spy)
    mx.random.seed(0)
    out = stream_generate(
        model, tokenizer, PROMPT, max_tokens=12, sampler=params, drafter=drafter, beam_width=1
    )
    assert len(list(out)) == 12
    assert proposals and all(p is None for p in proposals)
