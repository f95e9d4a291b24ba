"""Exact sampling: the speculative output has the target's distribution, provably and measurably.

The joint law of the two tokens after a root, ``P(x1, x2) = p(x1 | C) p(x2 | C, x1)``, is
enumerated with plain forwards of a tiny target (vocabulary 32) after the user's sampling
transforms. The same two tokens are drawn 200,000 times through the real pipeline pieces
(drafter beams -> pack -> tree forward -> acceptance walk, and a second step when the first
accepts nothing). A chi-square goodness-of-fit test and the total-variation distance must
accept the exact rule and reject ReDrafter's published rule (the test has power).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from scipy import stats
from tiny_models import tiny_model

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

    def step(self, context: list[int], root: int, width: int, length: int, params):
        """One speculative step's tree: ``(tree, logits (N, V), q (W, L-1, V))``."""
        cache = self.target.make_cache()
        _, hidden = self.target.forward(mx.array(context), cache)
        draft = _propose(self.drafter, hidden[-1], root, width, length)
        tree = pack(np.array(draft.beams))
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


def _walk(rule: str, tree, logits, q, samples: int, params: SamplingParams):
    """Run ``samples`` acceptance draws of ``rule`` on one tree -> (num, last, next_root)."""
    tokens = mx.array(tree.tokens)
    if rule == "exact":
        uniforms, gumbel = exact_randomness(tree, VOCAB, samples)
        log_weights = params.log_weights(logits)
        children = mx.array(children_table(tree))
        num, last, nxt = exact_walk(children, tokens, log_weights, uniforms, gumbel)
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


def sample_two_tokens(setup: Setup, rule: str, params, width: int, length: int, seed: int):
    """``(S, 2)`` draws of the two tokens after the root, through the pipeline pieces."""
    mx.random.seed(seed)
    root = int(np.argmax(setup.next_probs(PROMPT, params)))
    tree, logits, q = setup.step(PROMPT, root, width, length, params)
    num, last, nxt = _walk(rule, tree, logits, q, SAMPLES, params)
    out = _emitted(tree, num, last, nxt, 2)
    # a step that accepted nothing emitted one token: the second comes from the next step
    for x1 in np.unique(out[out[:, 1] < 0, 0]):
        rows = np.nonzero((out[:, 1] < 0) & (out[:, 0] == x1))[0]
        tree2, logits2, q2 = setup.step(PROMPT + [root], int(x1), width, length, params)
        num2, last2, nxt2 = _walk(rule, tree2, logits2, q2, len(rows), params)
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


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("shape", [(3, 3), (2, 4)])
def test_exact_rule_preserves_the_distribution(setup, name, shape):
    params = SETTINGS[name]
    root, draws = sample_two_tokens(setup, "exact", params, *shape, seed=1)
    p_value, tvd, impossible = goodness_of_fit(draws, exact_joint(setup, params, root))
    assert impossible == 0
    assert p_value > 1e-3, f"chi-square rejects the exact rule: p={p_value:.2e}, tvd={tvd:.4f}"
    assert tvd < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_redrafter_rule_fails_the_same_test(setup, name):
    """Power: ReDrafter's published rule is rejected by the very same test."""
    params = SETTINGS[name]
    root, draws = sample_two_tokens(setup, "redrafter", params, 3, 3, seed=1)
    p_value, tvd, impossible = goodness_of_fit(draws, exact_joint(setup, params, root))
    assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"


@pytest.mark.slow
def test_walk_without_the_residual_mask_fails_the_same_test(setup, monkeypatch):
    """Power: drawing the stop node's token from ``p`` instead of the residual (the rejected
    children left in) is rejected by the very same test."""
    from mlx_redrafter import accept

    masked = accept.residual_draw

    def unmasked(log_weights, gumbel, rejected, live):
        return masked(log_weights, gumbel, rejected, mx.zeros_like(live))

    monkeypatch.setattr(accept, "residual_draw", unmasked)
    params = SETTINGS["plain"]
    root, draws = sample_two_tokens(setup, "exact", params, 3, 3, seed=1)
    p_value, tvd, _ = goodness_of_fit(draws, exact_joint(setup, params, root))
    assert p_value < 1e-3, f"p={p_value:.3f} tvd={tvd:.4f}"


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
    num, _, _ = _walk("exact", tree, logits, None, 20_000, params)
    p = setup.next_probs(context, params)
    # P(accept some child) = p(c1) + p(c2): the walk accepts exactly that often
    want = p[greedy[0]] + p[(greedy[0] + 1) % VOCAB]
    assert abs(num.mean() - want) < 0.015


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

    logits = mx.random.normal((1, VOCAB)) * 3
    params = SamplingParams(temp=0.7, top_p=0.8, top_k=6)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    sampler = make_sampler(temp=0.7, top_p=0.8, top_k=6)
    mx.random.seed(5)
    draws = np.array(mx.concatenate([sampler(logprobs) for _ in range(4000)]))
    freq = np.bincount(draws, minlength=VOCAB) / len(draws)
    probs = np.array(params.probs(logits))[0]
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(probs > 0)[0])
    assert 0.5 * np.abs(freq - probs).sum() < 0.03


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


@pytest.mark.slow
def test_engine_first_tokens_follow_the_target(setup):
    """End to end through ``stream_generate``: the first two tokens' joint law."""
    params = SETTINGS["plain"]
    draws = np.array([engine_tokens(setup, 1000 + i, params, 2) for i in range(1500)])
    p_value, _, _ = goodness_of_fit(draws, engine_joint(setup, params))
    assert p_value > 1e-3
