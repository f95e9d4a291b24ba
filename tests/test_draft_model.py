"""Draft models: lossless greedy decoding, exact sampling by the chain rule, clear errors.

Greedy output equals AR for targets of two architectures with a draft model of another
architecture, a noisy copy of the target (partial acceptance: exercises the cache rewind)
and the target itself (everything accepted, which fails if the rewind is off by a token).

The chain rule is checked the way ``test_exact_sampling.py`` checks the tree walk: the
joint law of the two tokens after a root is enumerated from a tiny target (vocabulary 32),
the same two tokens are drawn 200,000 times through :func:`chain_walk` with drafts sampled
from a tiny draft model's ``q`` (a second step when the first accepts nothing), and a
chi-square test must accept the rule and reject a wrong one (rejections resampled from
``p`` instead of ``norm(max(0, p - q))``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from test_exact_sampling import goodness_of_fit, tvd_bound
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import accept as accept_module
from mlx_redrafter import engine as gen
from mlx_redrafter.accept import chain_walk
from mlx_redrafter.drafters import DraftModelDrafter, VocabularyMismatchError
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.sampling import SamplingParams

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

VOCAB = 32
SAMPLES = 200_000
PROMPT = [3, 17, 5, 9]
SETTINGS = {
    "plain": SamplingParams(temp=1.0),
    "top_p_top_k": SamplingParams(temp=0.8, top_p=0.9, top_k=8),
}


def noisy_copy(arch: str, seed: int, noise: float, **kw):
    """The tiny model ``tiny_model(arch, seed)`` with Gaussian noise added to its weights."""
    model = tiny_model(arch, seed=seed, **kw)
    mx.random.seed(seed + 100)
    noisy = [
        (k, v + noise * mx.random.normal(v.shape)) for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(noisy))
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------------------- greedy


@pytest.fixture(scope="module")
def tokenizer():
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}  # no EOS: run the full length
    return tok


def _tokens(model, tok, prompt, max_tokens, **kw) -> list[int]:
    return [r.token for r in gen.stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


def _prompts(seed: int, vocab: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(1, 30))).tolist() for _ in range(count)]


@pytest.mark.parametrize(("arch", "other"), [("llama", "qwen3"), ("gemma3_text", "llama")])
def test_greedy_draft_model_equals_ar(arch, other, tokenizer):
    vocab = len(tokenizer._tokenizer)
    target = tiny_model(arch, seed=3, scale=2.0, vocab_size=vocab)
    drafts = {
        "other": tiny_model(other, seed=8, scale=2.0, vocab_size=vocab),
        "noisy": noisy_copy(arch, 3, 0.02, scale=2.0, vocab_size=vocab),
        "self": target,
    }
    accepted: dict[str, list[int]] = {name: [] for name in drafts}
    for i, prompt in enumerate(_prompts(len(arch), vocab, 4)):
        ar = _tokens(target, tokenizer, prompt, 60)
        for name, draft in drafts.items():
            stats = gen.StepStats()
            drafter = DraftModelDrafter.from_models(target, draft)
            length = 2 + (i % 3)
            spec = _tokens(
                target, tokenizer, prompt, 60, drafter=drafter, beam_length=length, stats=stats
            )
            assert spec == ar, f"{arch} draft {name} prompt {i}"
            # the last step may be cut by max_tokens; every full step of self-drafting
            # accepts all K drafts
            if name == "self":
                assert set(stats.accepted) == {length - 1}, stats.accepted
            accepted[name] += stats.accepted
    noisy = np.asarray(accepted["noisy"])
    assert noisy.mean() > 0 and (noisy < noisy.max()).any()  # partial acceptance happens


def test_sampling_with_itself_as_draft_accepts_almost_everything(tokenizer):
    vocab = len(tokenizer._tokenizer)
    target = tiny_model("llama", seed=3, scale=2.0, vocab_size=vocab)
    stats = gen.StepStats()
    mx.random.seed(0)
    drafter = DraftModelDrafter.from_models(target, target)
    _tokens(target, tokenizer, [5, 6, 7], 80, drafter=drafter, beam_length=4, temp=1.0, stats=stats)
    assert np.mean(stats.accepted) > 2.9  # p == q: min(1, p/q) = 1 up to rounding


def test_errors_name_the_problem(tokenizer):
    vocab = len(tokenizer._tokenizer)
    target = tiny_model("llama", seed=3, vocab_size=vocab)
    small = tiny_model("llama", seed=4, vocab_size=vocab - 5)
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes differ"):
        DraftModelDrafter.from_models(target, small)
    other_tok = byte_tokenizer(vocab_size=120)
    padded = tiny_model("llama", seed=4, vocab_size=len(other_tok))
    with pytest.raises(VocabularyMismatchError, match="tokenizer differs"):
        DraftModelDrafter.from_models(target, padded, tokenizer, other_tok)
    # the same tokenizer with a padded draft table is fine
    wide = tiny_model("llama", seed=4, vocab_size=vocab + 8)
    drafter = DraftModelDrafter.from_models(target, wide, tokenizer, tokenizer)
    drafter.reset([1, 2])
    ctx = DraftContext(mx.zeros(4), mx.array(2), mx.array(1), [1, 2], SamplingParams(temp=1.0))
    draft = drafter.propose(ctx, 1, 3)
    assert draft.draft_logprobs.shape == (1, 2, vocab)
    with pytest.raises(ValueError, match="beam width 1"):
        drafter.propose(ctx, 2, 3)


# ----------------------------------------------------------------------------- chain rule


class Tables:
    """Target ``p`` and draft ``q`` after ``C`` and after ``C + [x]`` for every ``x``."""

    def __init__(self, params: SamplingParams):
        target = tiny_model("llama", seed=0, scale=2.5, vocab_size=VOCAB)
        draft = noisy_copy("llama", 0, 0.06, scale=2.5, vocab_size=VOCAB)
        first = target(mx.array(PROMPT)[None])[0, -1]
        self.root = int(np.argmax(np.array(params.probs(first))))
        self.context = PROMPT + [self.root]
        self.p0, self.p1 = self._tables(target, params)
        self.q0, self.q1 = self._tables(draft, params)

    def _tables(self, model, params) -> tuple[np.ndarray, np.ndarray]:
        """``((V,), (V, V))``: the distribution after ``C``, and after ``C + [x]`` per ``x``."""
        rows = mx.array([self.context + [x] for x in range(VOCAB)])
        logits = model(rows)
        return np.array(params.probs(logits[0, -2])), np.array(params.probs(logits[:, -1]))

    def joint(self) -> np.ndarray:
        """``(V, V)`` the target's ``P(y1, y2) = p(y1 | C) p(y2 | C, y1)``."""
        return self.p0[:, None] * self.p1


def _categorical(probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs (S, V)``."""
    return np.array(mx.random.categorical(mx.log(mx.array(probs)))).astype(np.int64)


def _walk(drafted: np.ndarray, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``chain_walk`` with fresh randomness: ``(num_accepted (S,), next_root (S,))``."""
    samples, k = drafted.shape
    num, nxt = chain_walk(
        mx.array(drafted.astype(np.int32)),
        mx.array(p),
        mx.array(q),
        mx.random.uniform(shape=(samples, k)),
        mx.random.gumbel(shape=(samples, VOCAB)),
    )
    mx.eval(num, nxt)
    return np.array(num), np.array(nxt)


def sample_two_tokens(t: Tables, seed: int, samples: int = SAMPLES) -> tuple[np.ndarray, float]:
    """``(S, 2)`` draws of the two tokens after the root, and the first step's mean accepted.

    Step 1 drafts ``x1 ~ q(. | C)``, ``x2 ~ q(. | C, x1)`` (K = 2); only the first two
    emitted tokens are kept, so the bonus distribution (after ``x2``) is not needed and
    ``p(. | C, x1)`` stands in for it. A step accepting nothing emitted one token; the
    second comes from a step with one draft after ``C + [y1]``.
    """
    mx.random.seed(seed)
    x1 = _categorical(np.broadcast_to(t.q0, (samples, VOCAB)))
    x2 = _categorical(t.q1[x1])
    p = np.stack([np.broadcast_to(t.p0, (samples, VOCAB)), t.p1[x1], t.p1[x1]], axis=1)
    q = np.stack([np.broadcast_to(t.q0, (samples, VOCAB)), t.q1[x1]], axis=1)
    num, nxt = _walk(np.stack([x1, x2], axis=1), p, q)
    y1 = np.where(num >= 1, x1, nxt)
    y2 = np.where(num >= 2, x2, nxt)
    again = num == 0
    z = _categorical(t.q1[y1[again]])
    p2 = np.stack([t.p1[y1[again]], t.p1[y1[again]]], axis=1)
    num2, nxt2 = _walk(z[:, None], p2, t.q1[y1[again]][:, None])
    y2[again] = np.where(num2 >= 1, z, nxt2)
    return np.stack([y1, y2], axis=1), float(num.mean())


@pytest.fixture(scope="module", params=list(SETTINGS))
def tables(request) -> Tables:
    return Tables(SETTINGS[request.param])


def test_chain_walk_accepts_with_the_overlap_probability(tables):
    """P(accept x1) = sum_x min(p, q): the test below exercises acceptance, not just residuals."""
    samples = 40_000
    _, mean_accepted = sample_two_tokens(tables, seed=0, samples=samples)
    want_first = np.minimum(tables.p0, tables.q0).sum()
    assert 0.2 < want_first < 0.95  # the draft is neither useless nor the target
    draws, _ = sample_two_tokens(tables, seed=1, samples=samples)
    first = np.bincount(draws[:, 0], minlength=VOCAB) / len(draws)
    assert 0.5 * np.abs(first - tables.p0).sum() < tvd_bound(tables.p0, samples)
    # the mean of num (0, 1 or 2 per draw) is at least P(accept x1); its spread is < 1
    assert mean_accepted > want_first - 5 / np.sqrt(samples)


@pytest.mark.slow
def test_chain_rule_preserves_the_distribution(tables):
    draws, _ = sample_two_tokens(tables, seed=2)
    p_value, tvd, impossible = goodness_of_fit(draws, tables.joint())
    assert impossible == 0
    assert p_value > 1e-3, f"chi-square rejects the chain rule: p={p_value:.2e}, tvd={tvd:.4f}"
    assert tvd < tvd_bound(tables.joint(), len(draws))


@pytest.mark.slow
def test_a_wrong_residual_fails_the_same_test(tables, monkeypatch):
    """Power: resampling rejections from ``p`` instead of ``norm(max(0, p - q))`` is caught."""
    monkeypatch.setattr(accept_module, "chain_residual", lambda p, q: p)
    draws, _ = sample_two_tokens(tables, seed=2)
    p_value, tvd, impossible = goodness_of_fit(draws, tables.joint())
    assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"


@pytest.mark.slow
def test_engine_first_tokens_follow_the_target(tokenizer):
    """End to end through ``stream_generate`` with a sampling draft model: the first two
    tokens' joint law."""
    target = tiny_model("llama", seed=0, scale=2.5, vocab_size=VOCAB)
    draft = noisy_copy("llama", 0, 0.06, scale=2.5, vocab_size=VOCAB)
    params = SETTINGS["plain"]
    drafter = DraftModelDrafter.from_models(target, draft)
    draws = []
    for i in range(1500):
        mx.random.seed(1000 + i)
        draws.append(
            _tokens(target, tokenizer, PROMPT, 2, drafter=drafter, beam_length=3, sampler=params)
        )
    draws = np.array(draws)

    def probs(context):
        return np.array(params.probs(target(mx.array(context)[None])[0, -1]))

    first = probs(PROMPT)
    joint = np.zeros((VOCAB, VOCAB))
    for x0 in np.nonzero(first > 1e-4)[0]:
        joint[x0] = first[x0] * probs(PROMPT + [int(x0)])
    joint /= joint.sum()
    p_value, _, _ = goodness_of_fit(draws, joint)
    assert p_value > 1e-3
