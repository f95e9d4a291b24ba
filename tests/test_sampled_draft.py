"""A ReDrafter head's *sampled* chain (``temp > 0``, ``W = 1``), alone or beside prompt lookup.

The chain's tokens must be draws from the ``q`` the draft reports (``Draft.proposal``),
and the exact walk, which tests that beam with ``min(1, p/q)`` and the deterministic
beams as before, must keep the target's law. That law is checked as in
``test_exact_sampling.py``: the two tokens after a root, drawn 200,000 times through
drafts -> pack -> tree forward -> walk, against the enumerated joint. Each draw needs a
fresh draft, so draws are grouped by the drafted chain: the chain counts are multinomial
under ``q``, and every chain's tree is walked as many times as it was drawn.

Beside the chain, every tree holds six deterministic beams of the target's likeliest tokens
(``fake_drafters.probable_beams``: three siblings after the root, two after each), so after
the sampled child's rejection several siblings are tested against ``max(0, p - q)`` and the
renormalisation by their mass matters; each bug planted in a copy of the walk
(``tests/mutants.py``) fails the very same test.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fake_drafters import ProbableDrafter, probable_beams
from mutants import walk_mutant
from scipy import stats
from test_exact_sampling import (
    PROMPT,
    SAMPLES,
    SETTINGS,
    VOCAB,
    Setup,
    _emitted,
    engine_joint,
    engine_tokens,
    exact_joint,
    goodness_of_fit,
    tvd_bound,
)

from mlx_redrafter import accept
from mlx_redrafter.accept import children_table, exact_randomness, exact_walk
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.drafters.combined import CombinedDrafter
from mlx_redrafter.drafters.redrafter import ReDrafter
from mlx_redrafter.drafters.sampled_chain import sample_chain
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import pack

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

LENGTH = 3


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(seed=0)


def _sampling_drafter(setup: Setup) -> ReDrafter:
    return ReDrafter(setup.drafter.head, setup.target.embed)


def _prompt_hidden(setup: Setup) -> mx.array:
    _, hidden = setup.target.forward(mx.array(PROMPT), setup.target.make_cache())
    return hidden[-1]


def _context(setup: Setup, root: int, params: SamplingParams) -> DraftContext:
    return DraftContext(
        _prompt_hidden(setup),
        mx.array(root, dtype=mx.int32),
        mx.array(len(PROMPT)),
        PROMPT + [root],
        params,
    )


def _head_log_q(setup: Setup, params: SamplingParams, root: int, drafted: list[int]) -> np.ndarray:
    """``(V,)`` log q of the token after ``root, *drafted``, straight from the head."""
    head = setup.drafter.head
    hidden = _prompt_hidden(setup)[None]
    state = head.initial_state((1,))
    for token in [root, *drafted]:
        state = head.rnn_step(state, setup.target.embed(mx.array([token])))
    weights = params.logits(head.logits(hidden, state).astype(mx.float32))[0]
    return np.array(weights - mx.logsumexp(weights))


# ----------------------------------------------------------------------------- the drafter


def test_greedy_and_wide_drafts_stay_beam_search(setup):
    drafter = _sampling_drafter(setup)
    greedy = drafter.propose(_context(setup, 7, SamplingParams()), 1, LENGTH)
    wide = drafter.propose(_context(setup, 7, SETTINGS["plain"]), 2, LENGTH)
    assert greedy.proposal is None and wide.proposal is None
    sampled = drafter.propose(_context(setup, 7, SETTINGS["plain"]), 1, LENGTH)
    assert sampled.proposal is not None and sampled.proposal.shape == (LENGTH - 1, VOCAB)
    with pytest.raises(ValueError, match="sample=False"):
        ReDrafter(setup.drafter.head, setup.target.embed, keep_logprobs=True, sample=True)
    assert not ReDrafter(setup.drafter.head, setup.target.embed, keep_logprobs=True).sample


def test_top_k_beyond_the_head_vocabulary_keeps_every_id(setup):
    drafter = _sampling_drafter(setup)
    wide = SamplingParams(temp=1.0, top_k=VOCAB + 5)
    draft = drafter.propose(_context(setup, 7, wide), 1, LENGTH)
    plain = drafter.propose(_context(setup, 7, SETTINGS["plain"]), 1, LENGTH)
    np.testing.assert_allclose(np.array(draft.proposal[0]), np.array(plain.proposal[0]))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_chain_follows_its_proposal(setup, name):
    """The proposal is the head's distribution under the target's transforms, and the
    drafted tokens are draws from it (chi-square on the first token over 3,000 drafts)."""
    params = SETTINGS[name]
    drafter = _sampling_drafter(setup)
    context = _context(setup, 7, params)
    mx.random.seed(5)
    first = []
    for _ in range(3000):
        draft = drafter.propose(context, 1, LENGTH)
        beams = np.array(draft.beams)[0]
        first.append(int(beams[1]))
    log_q0 = _head_log_q(setup, params, 7, [])
    np.testing.assert_allclose(np.exp(np.array(draft.proposal[0])), np.exp(log_q0), atol=1e-6)
    log_q1 = _head_log_q(setup, params, 7, [int(beams[1])])
    np.testing.assert_allclose(np.exp(np.array(draft.proposal[1])), np.exp(log_q1), atol=1e-6)
    q0 = np.exp(log_q0.astype(np.float64))
    q0 /= q0.sum()
    counts = np.bincount(first, minlength=VOCAB)
    assert counts[q0 == 0].sum() == 0
    big = q0 * len(first) >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(q0[big], q0[~big].sum()) * len(first)
    keep = expected > 0
    expected = expected[keep] * observed[keep].sum() / expected[keep].sum()
    assert stats.chisquare(observed[keep], expected).pvalue > 1e-3


# ----------------------------------------------------------------------------- exactness


def _chains(setup: Setup, params, root: int, rng: np.random.Generator) -> dict[tuple, tuple]:
    """``{(x1, x2): (count, log_q (2, V))}``: SAMPLES sampled chains, grouped.

    The proposal rows come from the compiled-graph function the drafter uses, with the
    first draw forced to ``x1`` by its noise row.
    """
    head, embed = setup.drafter.head, setup.target.embed
    hidden = _prompt_hidden(setup)
    root_arr = mx.array(root, dtype=mx.int32)
    groups = {}
    _, log_q = sample_chain(head, embed, params, hidden, root_arr, mx.zeros((2, VOCAB)))
    q1 = np.exp(np.array(log_q[0], dtype=np.float64))
    for x1, n1 in enumerate(rng.multinomial(SAMPLES, q1 / q1.sum())):
        if n1 == 0:
            continue
        force = mx.zeros((2, VOCAB)).at[0, x1].add(1e9)
        _, log_q = sample_chain(head, embed, params, hidden, root_arr, force)
        q2 = np.exp(np.array(log_q[1], dtype=np.float64))
        for x2, n2 in enumerate(rng.multinomial(n1, q2 / q2.sum())):
            if n2:
                groups[(x1, x2)] = (n2, log_q)
    return groups


def _tree_log_weights(setup: Setup, params, beams: np.ndarray):
    cache = setup.target.make_cache()
    setup.target.forward(mx.array(PROMPT), cache)
    tree = pack(beams)
    logits, _ = setup.target.tree_forward(tree, cache)
    return tree, params.log_weights(logits)


def sample_with_sampled_chain(setup: Setup, params, seed: int, walk=exact_walk):
    """``(root, (S, 2))``: the two tokens after the root, each draw with its own chain
    beside the :func:`probable_beams` (``walk``: the exact walk or a planted-bug copy)."""
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    root = int(np.argmax(setup.next_probs(PROMPT, params)))
    # the target's favourites: often equal to the sampled x1 (merged with it)
    lookup = probable_beams(lambda c: setup.next_probs(c, params), PROMPT + [root], LENGTH)
    outs = []
    for (x1, x2), (count, log_q) in _chains(setup, params, root, rng).items():
        beams = [[root, x1, x2], *lookup]
        tree, log_weights = _tree_log_weights(setup, params, np.array(beams))
        table = children_table(tree)
        uniforms, gumbel = exact_randomness(tree, VOCAB, count, children=table)
        rows = accept.sampled_rows(tree, log_q)
        num, last, nxt = walk(
            mx.array(table), mx.array(tree.tokens), log_weights, uniforms, gumbel, log_q[:rows]
        )
        mx.eval(num, last, nxt)
        outs.append(_emitted(tree, np.array(num), np.array(last), np.array(nxt), 2))
    out = np.concatenate(outs)
    # a step that accepted nothing emitted one token: draw the second from the target
    short = out[:, 1] < 0
    for x1 in np.unique(out[short, 0]):
        rows = np.nonzero(short & (out[:, 0] == x1))[0]
        p = setup.next_probs(PROMPT + [root, int(x1)], params)
        out[rows, 1] = rng.choice(VOCAB, size=rows.size, p=p / p.sum())
    return root, out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_chain_walk_preserves_the_distribution(setup, name):
    params = SETTINGS[name]
    root, draws = sample_with_sampled_chain(setup, params, seed=1)
    joint = exact_joint(setup, params, root)
    p_value, tvd, impossible = goodness_of_fit(draws, joint)
    assert impossible == 0
    assert p_value > 1e-3, f"p={p_value:.2e}, tvd={tvd:.4f}"
    assert tvd < tvd_bound(joint, len(draws))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize(
    "bug",
    [
        "sampled_branch_mass",  # siblings after the sampled child's rejection not renormalised
        "sampled_residual_is_p",  # after that rejection, the law left taken as p
        "sampled_child_point_mass",  # the sampled child tested with u < p, not u < p / q
        "naive_residual",  # the stop node's draw with the rejected children left in
    ],
)
def test_a_planted_bug_fails_the_same_test(setup, bug, name):
    """Power: each planted bug fails every parametrisation of the test above (same trees,
    sample size and seed)."""
    params = SETTINGS[name]
    root, draws = sample_with_sampled_chain(setup, params, seed=1, walk=walk_mutant(bug))
    joint = exact_joint(setup, params, root)
    p_value, tvd, impossible = goodness_of_fit(draws, joint)
    assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"
    assert tvd > tvd_bound(joint, len(draws))  # the TVD check fails it too


# ----------------------------------------------------------------------------- engine


def _engine_tokens(setup: Setup, drafter, seed: int, params, n: int) -> list[int]:
    return engine_tokens(setup, seed, params, n, drafter, width=1, length=LENGTH)


def _with_lookup(setup: Setup) -> CombinedDrafter:
    from mlx_redrafter.drafters import PromptLookupDrafter

    return CombinedDrafter(_sampling_drafter(setup), [(PromptLookupDrafter(ngram=2), 1)])


def test_engine_uses_the_proposal_and_is_seeded(setup, monkeypatch):
    """The engine hands the sampled chain's proposal to the walk; seeds reproduce."""
    seen = []
    exact = accept.accept_exact

    def spy(tree, tokens, log_weights, proposal=None):
        seen.append(proposal is not None)
        return exact(tree, tokens, log_weights, proposal)

    from mlx_redrafter import engine

    monkeypatch.setattr(engine, "accept_exact", spy)
    params = SETTINGS["top_p_top_k"]
    drafter = _with_lookup(setup)
    a = _engine_tokens(setup, drafter, 11, params, 40)
    assert seen and all(seen)
    assert a == _engine_tokens(setup, drafter, 11, params, 40)
    assert a != _engine_tokens(setup, drafter, 12, params, 40)


@pytest.mark.slow
def test_engine_first_tokens_follow_the_target(setup):
    """End to end through ``stream_generate`` with the sampled head + four probable beams:
    the first two tokens' joint law (the second from the first speculative step)."""
    params = SETTINGS["plain"]
    drafter = CombinedDrafter(_sampling_drafter(setup), [(ProbableDrafter(setup.model), 4)])
    draws = np.array([_engine_tokens(setup, drafter, 2000 + i, params, 2) for i in range(1500)])
    p_value, tvd, _ = goodness_of_fit(draws, engine_joint(setup, params))
    assert p_value > 1e-3, f"p={p_value:.2e} tvd={tvd:.4f}"


# ----------------------------------------------------------------------------- evaluation


def test_expected_run_of_per_depth_rates():
    from mlx_redrafter.train.evaluate import chain_acceptance, expected_run

    p = mx.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    q = mx.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(np.array(chain_acceptance(p, q)), [0.7, 0.0], atol=1e-7)
    rates = np.array([[1.0, 1.0, 1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(expected_run(rates), [3.0, 0.75, 0.0])


def test_chain_rule_accepts_at_the_evaluated_rate():
    """What ``train evaluate --temp`` counts per depth, ``sum min(p, q)``, is the rate at which
    the engine's chain rule accepts a draft sampled from ``q`` (40,000 draws)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(VOCAB, 0.3))
    q = rng.dirichlet(np.full(VOCAB, 0.3))
    draws = 40_000
    drafted = rng.choice(VOCAB, size=(draws, 1), p=q)
    p_both = mx.array(np.stack([p, p]).astype(np.float32))[None]  # (1, 2, V)
    num, _ = accept.chain_walk(
        mx.array(drafted.astype(np.int32)),
        mx.broadcast_to(p_both, (draws, 2, VOCAB)),
        mx.broadcast_to(mx.array(q.astype(np.float32))[None, None], (draws, 1, VOCAB)),
        mx.random.uniform(shape=(draws, 1), key=mx.random.key(1)),
        mx.random.gumbel(shape=(draws, VOCAB), key=mx.random.key(2)),
    )
    rate = float(np.minimum(p, q).sum())
    assert abs(np.array(num).mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / draws)
