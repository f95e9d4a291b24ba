"""Exact sampling: the speculative output has the target's distribution, provably and measurably.

The joint law of the two tokens after a root, ``P(x1, x2) = p(x1 | C) p(x2 | C, x1)``, is
enumerated with plain forwards of a tiny target (vocabulary 32) after the user's sampling
transforms. The same two tokens are drawn 200,000 times through the real pipeline pieces
(drafter beams -> pack -> tree forward -> acceptance walk, and a second step when the first
accepts nothing). A chi-square goodness-of-fit test and the total-variation distance must
accept the exact rule.

Every tree stacks the head's beams with beams of the target's most probable tokens (three
siblings after the root, two after each of them): every term of the walk changes what it
emits there (the renormalisation by the rejected siblings' mass, the residual with the
rejected children removed), so the very same test rejects ReDrafter's published rule and
each bug planted in a copy of the walk (``tests/mutants.py``): the test has power.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fake_drafters import ProbableDrafter, probable_beams
from mlx.utils import tree_flatten, tree_unflatten
from mutants import walk_mutant
from scipy import stats
from tiny_models import tiny_model

from mlx_redrafter import accept
from mlx_redrafter.accept import (
    accept_exact,
    accept_greedy,
    children_table,
    exact_randomness,
    exact_walk,
    redrafter_walk,
)
from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.redrafter import ReDrafter, ReDrafterConfig, ReDrafterHead
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.target import Target
from mlx_redrafter.tree import pack

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

VOCAB = 32
SAMPLES = 200_000
PROMPT = [3, 17, 5, 9]
SETTINGS = {
    "plain": SamplingParams(temp=1.0),
    "top_p_top_k": SamplingParams(temp=0.8, top_p=0.9, top_k=8),
}


class Setup:
    """A tiny target, its wrapper, and an untrained (random) ReDrafter head."""

    def __init__(self, seed: int = 0, head_scale: float = 4.0):
        self.model = tiny_model("llama", seed=seed, scale=2.5, vocab_size=VOCAB)
        self.target = Target(self.model)
        mx.random.seed(seed + 1)
        head = ReDrafterHead(ReDrafterConfig(VOCAB, 64, 128, 1, rnn=True))
        scaled = [(k, v * head_scale) for k, v in tree_flatten(head.parameters())]
        head.update(tree_unflatten(scaled))
        mx.eval(head.parameters())
        self.drafter = ReDrafter(head, self.target.embed, keep_logprobs=True)

    def next_probs(self, context: list[int], params: SamplingParams) -> np.ndarray:
        """``(V,)`` the sampling distribution after ``context`` (plain forward, no cache)."""
        logits = self.model(mx.array(context)[None])[0, -1]
        return np.array(params.probs(logits))

    def step(self, context: list[int], root: int, width: int, length: int, params, probable=True):
        """One speculative step's tree: ``(tree, logits (N, V), q (W, L-1, V))``.

        ``probable``: the head's ``W`` beams are followed by :func:`probable_beams` (six
        beams of the target's likeliest tokens; ``q`` then covers the head's beams only).
        """
        cache = self.target.make_cache()
        _, hidden = self.target.forward(mx.array(context), cache)
        draft = _propose(self.drafter, hidden[-1], root, width, length)
        beams = np.array(draft.beams)
        if probable:
            extra = probable_beams(lambda c: self.next_probs(c, params), [*context, root], length)
            beams = np.concatenate([beams, np.array(extra, dtype=beams.dtype)])
        tree = pack(beams)
        logits, _ = self.target.tree_forward(tree, cache)
        return tree, logits, draft.draft_logprobs


def _propose(drafter: ReDrafter, hidden: mx.array, root: int, width: int, length: int) -> Draft:
    """The drafter's proposal with the head's log-probs in target space ``(W, L-1, V)``."""
    ctx = DraftContext(hidden, mx.array(root, dtype=mx.int32), mx.array(0), [])
    draft = drafter.propose(ctx, width, length)
    if draft.draft_logprobs is None:
        draft.draft_logprobs = drafter.last_search.target_logprobs(VOCAB)
    return draft


def _emitted(tree, num: np.ndarray, last: np.ndarray, root_next: np.ndarray, k: int) -> np.ndarray:
    """``(S, k)`` first ``k`` emitted tokens (-1 where the step emitted fewer)."""
    paths = []
    for node in range(tree.size):
        path, at = [], node
        while at > 0:
            path.append(int(tree.tokens[at]))
            at = int(tree.parent[at])
        paths.append(path[::-1])
    out = np.full((len(num), k), -1, dtype=np.int64)
    for s in range(len(num)):
        seq = paths[last[s]] + [int(root_next[s])]
        out[s, : min(k, len(seq))] = seq[:k]
    return out


def _walk(rule: str, tree, logits, q, samples: int, params: SamplingParams, walk=exact_walk):
    """Run ``samples`` acceptance draws of ``rule`` on one tree -> (num, last, next_root).

    ``walk``: the exact rule's walk (a planted-bug copy in the power tests)."""
    tokens = mx.array(tree.tokens)
    if rule == "exact":
        uniforms, gumbel = exact_randomness(tree, VOCAB, samples)
        log_weights = params.log_weights(logits)
        children = mx.array(children_table(tree))
        num, last, nxt = walk(children, tokens, log_weights, uniforms, gumbel)
    else:
        probs = params.probs(logits)
        width, length = tree.unpack.shape
        q_t = mx.softmax(q.astype(mx.float32) / params.temp, axis=-1)
        uniforms = mx.random.uniform(shape=(samples, width, length - 1))
        gumbel = mx.random.gumbel(shape=(samples, VOCAB))
        unpack = mx.array(tree.unpack)
        num, best, nxt = redrafter_walk(unpack, tokens, probs, q_t, uniforms, gumbel)
        last = unpack[best, num]
    mx.eval(num, last, nxt)
    return np.array(num), np.array(last), np.array(nxt)


def sample_two_tokens(
    setup: Setup,
    rule: str,
    params,
    width: int,
    length: int,
    seed: int,
    probable: bool = True,
    walk=exact_walk,
):
    """``(S, 2)`` draws of the two tokens after the root, through the pipeline pieces
    (``probable``: with :func:`probable_beams` beside the head's; ``walk``: the exact walk)."""
    mx.random.seed(seed)
    root = int(np.argmax(setup.next_probs(PROMPT, params)))
    tree, logits, q = setup.step(PROMPT, root, width, length, params, probable)
    num, last, nxt = _walk(rule, tree, logits, q, SAMPLES, params, walk)
    out = _emitted(tree, num, last, nxt, 2)
    # a step that accepted nothing emitted one token: the second comes from the next step
    for x1 in np.unique(out[out[:, 1] < 0, 0]):
        rows = np.nonzero((out[:, 1] < 0) & (out[:, 0] == x1))[0]
        tree2, logits2, q2 = setup.step(PROMPT + [root], int(x1), width, length, params, probable)
        num2, last2, nxt2 = _walk(rule, tree2, logits2, q2, len(rows), params, walk)
        out[rows, 1] = _emitted(tree2, num2, last2, nxt2, 1)[:, 0]
    return root, out


def exact_joint(setup: Setup, params, root: int) -> np.ndarray:
    """``(V, V)`` enumerated ``P(x1, x2)`` after ``PROMPT + [root]``."""
    first = setup.next_probs(PROMPT + [root], params)
    joint = np.zeros((VOCAB, VOCAB))
    for x1 in np.nonzero(first > 0)[0]:
        joint[x1] = first[x1] * setup.next_probs(PROMPT + [root, int(x1)], params)
    return joint


def goodness_of_fit(draws: np.ndarray, joint: np.ndarray) -> tuple[float, float, int]:
    """``(chi-square p-value, total variation distance, draws in zero-probability cells)``."""
    counts = np.zeros_like(joint)
    np.add.at(counts, (draws[:, 0], draws[:, 1]), 1)
    expected = joint.ravel() * len(draws)
    observed = counts.ravel()
    impossible = int(observed[expected == 0].sum())
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    p_value = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    tvd = 0.5 * np.abs(counts / len(draws) - joint).sum()
    return float(p_value), float(tvd), impossible


def tvd_bound(probs: np.ndarray, samples: int, trials: int = 200) -> float:
    """A total-variation distance that ``samples`` exact draws from ``probs`` exceed with
    negligible probability: the mean plus 6 standard deviations of the distance's law,
    simulated with ``trials`` multinomial samples (a sum of many cells' deviations, close
    to normal). It shrinks like ``1 / sqrt(samples)``, so a biased sampler fails it."""
    p = probs.ravel().astype(np.float64)
    p /= p.sum()
    rng = np.random.default_rng(0)
    tvds = 0.5 * np.abs(rng.multinomial(samples, p, size=trials) / samples - p).sum(axis=1)
    return float(tvds.mean() + 6 * tvds.std())


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("shape", [(3, 3), (2, 4)])
def test_exact_rule_preserves_the_distribution(setup, name, shape):
    params = SETTINGS[name]
    root, draws = sample_two_tokens(setup, "exact", params, *shape, seed=1)
    joint = exact_joint(setup, params, root)
    p_value, tvd, impossible = goodness_of_fit(draws, joint)
    assert impossible == 0
    assert p_value > 1e-3, f"chi-square rejects the exact rule: p={p_value:.2e}, tvd={tvd:.4f}"
    assert tvd < tvd_bound(joint, len(draws))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_redrafter_rule_fails_the_same_test(setup, name):
    """Power: ReDrafter's published rule is rejected by the very same test."""
    params = SETTINGS[name]
    # the rule needs the head's q for every beam: the head's tree alone
    root, draws = sample_two_tokens(setup, "redrafter", params, 3, 3, seed=1, probable=False)
    p_value, tvd, impossible = goodness_of_fit(draws, exact_joint(setup, params, root))
    assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("shape", [(3, 3), (2, 4)])
@pytest.mark.parametrize("bug", ["deterministic_ratio", "naive_residual"])
def test_a_planted_bug_fails_the_same_test(setup, bug, shape, name):
    """Power: the walk with ``p(c)`` in place of ``p(c) / (1 - rejected mass)``, or with the
    stop node's token drawn from ``p`` (rejected children left in), fails every
    parametrisation of the test above (same trees, sample size and seed)."""
    params = SETTINGS[name]
    broken = walk_mutant(bug)
    root, draws = sample_two_tokens(setup, "exact", params, *shape, seed=1, walk=broken)
    joint = exact_joint(setup, params, root)
    p_value, tvd, impossible = goodness_of_fit(draws, joint)
    assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"
    assert tvd > tvd_bound(joint, len(draws))  # the TVD check fails it too


def test_the_trees_have_probable_siblings_at_every_level(setup):
    """What gives the tests above their power: after the root, three drafted siblings carry
    most of the target's mass, and two siblings carry real mass after each of them."""
    params = SETTINGS["plain"]
    root = int(np.argmax(setup.next_probs(PROMPT, params)))
    tree, _, _ = setup.step(PROMPT, root, 3, 3, params)
    table = children_table(tree)
    kids = [int(tree.tokens[c]) for c in table[0] if c >= 0]
    first = setup.next_probs(PROMPT + [root], params)
    assert len(kids) >= 4 and first[kids].sum() > 0.5
    assert np.sort(first[kids])[-2] > 0.1  # rejecting the first still leaves a likely second
    for child in table[0]:
        if child >= 0 and first[tree.tokens[child]] > 0.1:
            grand = [int(tree.tokens[c]) for c in table[child] if c >= 0]
            after = setup.next_probs(PROMPT + [root, int(tree.tokens[child])], params)
            assert len(grand) >= 2 and np.sort(after[grand])[-2] > 0.02


def test_log_weights_are_the_sampling_distribution():
    """``log_weights`` (no normaliser when no transform needs one) gives ``probs`` exactly."""
    logits = mx.random.normal((3, VOCAB), key=mx.random.key(2)) * 4
    for params in [
        *SETTINGS.values(),
        SamplingParams(temp=0.3),
        SamplingParams(temp=1.0, min_p=0.1),
    ]:
        got = np.array(mx.softmax(params.log_weights(logits), axis=-1))
        np.testing.assert_allclose(got, np.array(params.probs(logits)), atol=1e-6)


def test_exact_walk_accepts_often_with_a_good_draft(setup):
    """The statistical test exercises acceptance, not just residual draws."""
    params = SETTINGS["plain"]
    root = int(np.argmax(setup.next_probs(PROMPT, params)))
    context = PROMPT + [root]
    greedy = [int(np.argmax(setup.next_probs(context, params)))]
    beams = np.array([[root, greedy[0]], [root, (greedy[0] + 1) % VOCAB]])
    cache = setup.target.make_cache()
    setup.target.forward(mx.array(PROMPT), cache)
    tree = pack(beams)
    logits, _ = setup.target.tree_forward(tree, cache)
    mx.random.seed(4)
    samples = 20_000
    num, _, _ = _walk("exact", tree, logits, None, samples, params)
    p = setup.next_probs(context, params)
    # P(accept some child) = p(c1) + p(c2): the walk accepts exactly that often
    want = p[greedy[0]] + p[(greedy[0] + 1) % VOCAB]
    assert abs(num.mean() - want) < 5 * np.sqrt(want * (1 - want) / samples)


def test_low_temperature_exact_equals_greedy():
    """As T -> 0 the exact rule becomes argmax matching (the greedy rule)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        beams = np.concatenate([np.full((3, 1), 7), rng.integers(0, 4, size=(3, 3))], axis=1)
        tree = pack(beams)
        logits = mx.array(rng.standard_normal((tree.size, 6)).astype(np.float32) * 3)
        logits = mx.concatenate([logits, mx.full((tree.size, VOCAB - 6), -1e9)], axis=1)
        greedy = accept_greedy(tree, mx.array(tree.tokens), logits)
        cold = accept_exact(
            tree, mx.array(tree.tokens), SamplingParams(temp=1e-4).log_weights(logits)
        )
        mx.eval(greedy.num_accepted, cold.num_accepted)
        assert greedy.num_accepted.item() == cold.num_accepted.item()
        assert greedy.next_root.item() == cold.next_root.item()
        assert greedy.path.tolist() == cold.path.tolist()


def test_sampling_params_match_mlx_lm_sampler():
    """The distribution used by acceptance is the one mlx-lm's sampler draws from."""
    from mlx_lm.sample_utils import make_sampler

    logits = mx.random.normal((1, VOCAB), key=mx.random.key(3)) * 3
    params = SamplingParams(temp=0.7, top_p=0.8, top_k=6)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    sampler = make_sampler(temp=0.7, top_p=0.8, top_k=6)
    mx.random.seed(5)
    draws = np.array(mx.concatenate([sampler(logprobs) for _ in range(4000)]))
    freq = np.bincount(draws, minlength=VOCAB) / len(draws)
    probs = np.array(params.probs(logits))[0]
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(probs > 0)[0])
    live = probs > 0
    counts = np.bincount(draws, minlength=VOCAB)[live]
    expected = probs[live].astype(np.float64) / probs[live].astype(np.float64).sum()
    assert stats.chisquare(counts, expected * counts.sum()).pvalue > 1e-3
    assert 0.5 * np.abs(freq - probs).sum() < tvd_bound(probs, len(draws))


def engine_tokens(
    setup: Setup,
    seed: int,
    params: SamplingParams,
    n: int,
    drafter=None,
    width: int = 2,
    length: int = 3,
) -> list[int]:
    """The first ``n`` tokens ``stream_generate`` emits after ``PROMPT`` with ``drafter``
    (default: the setup's head) under ``seed``."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tiny_models import byte_tokenizer

    from mlx_redrafter.engine import stream_generate

    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}
    mx.random.seed(seed)
    return [
        r.token
        for r in stream_generate(
            setup.model,
            tok,
            PROMPT,
            max_tokens=n,
            sampler=params,
            drafter=setup.drafter if drafter is None else drafter,
            beam_width=width,
            beam_length=length,
        )
    ]


def engine_joint(setup: Setup, params: SamplingParams) -> np.ndarray:
    """``(V, V)`` enumerated law of the first two tokens after ``PROMPT`` (the prefill's
    sample, then the first speculative step's first token)."""
    first = setup.next_probs(PROMPT, params)
    joint = np.zeros((VOCAB, VOCAB))
    for x0 in np.nonzero(first > 1e-4)[0]:
        joint[x0] = first[x0] * setup.next_probs(PROMPT + [int(x0)], params)
    return joint / joint.sum()


def test_seeded_determinism(setup):
    params = SETTINGS["top_p_top_k"]
    a = engine_tokens(setup, 11, params, 40)
    b = engine_tokens(setup, 11, params, 40)
    c = engine_tokens(setup, 12, params, 40)
    assert a == b and a != c


def probable_drafter(setup: Setup):
    """The setup's head (engine width) plus four :class:`ProbableDrafter` beams."""
    from mlx_redrafter.drafters.combined import CombinedDrafter

    return CombinedDrafter(setup.drafter, [(ProbableDrafter(setup.model), 4)])


def engine_draws(setup: Setup, params: SamplingParams, seed: int, count: int = 1500):
    """``(count, 2)`` first two tokens from ``stream_generate`` (head + probable beams)."""
    drafter = probable_drafter(setup)
    return np.array([engine_tokens(setup, seed + i, params, 2, drafter) for i in range(count)])


@pytest.mark.slow
def test_engine_first_tokens_follow_the_target(setup):
    """End to end through ``stream_generate``: the first two tokens' joint law (the second
    from the first speculative step, over a tree whose siblings carry the target's mass)."""
    params = SETTINGS["plain"]
    draws = engine_draws(setup, params, 1000)
    p_value, tvd, _ = goodness_of_fit(draws, engine_joint(setup, params))
    assert p_value > 1e-3, f"p={p_value:.2e} tvd={tvd:.4f}"


@pytest.mark.slow
def test_engine_with_a_planted_bug_fails_the_same_test(setup, monkeypatch):
    """Power: the engine's walk testing each child with ``p(c)`` instead of
    ``p(c) / (1 - rejected mass)`` fails the end-to-end test (same seeds, same draws)."""
    monkeypatch.setattr(accept, "_compiled_walk", walk_mutant("deterministic_ratio"))
    params = SETTINGS["plain"]
    draws = engine_draws(setup, params, 1000)
    p_value, tvd, _ = goodness_of_fit(draws, engine_joint(setup, params))
    assert p_value < 1e-3, f"p={p_value:.3f} tvd={tvd:.4f}"
