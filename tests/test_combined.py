"""A draft head and prompt lookup in one tree: stacking, the engine's complete hook, lossless.

Exactness of the combined tree is the exact walk's (it verifies any candidate tree). The
lookup member proposes six beams of the target's likeliest tokens, so siblings from both
members carry mass. The statistical test has teeth: the tempting alternative, verifying
each drafter's beams on their own and keeping the longest accepted run, and each bug
planted in a copy of the walk (``tests/mutants.py``) fail the very same test.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from engine_walks import assert_engine_follows_walks
from fake_drafters import OracleDrafter, probable_beams
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import walk_mutant
from test_exact_sampling import (
    PROMPT,
    SAMPLES,
    SETTINGS,
    VOCAB,
    Setup,
    _emitted,
    exact_joint,
    goodness_of_fit,
    tvd_bound,
)
from test_prompt_lookup import _tokens
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter.accept import children_table, exact_randomness, exact_walk
from mlx_redrafter.cli import CLIError, lookup_beams_for, with_lookup
from mlx_redrafter.drafters import CombinedDrafter, PromptLookupDrafter, ReDrafter
from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.combined import stack_drafts
from mlx_redrafter.drafters.redrafter import ReDrafterConfig, ReDrafterHead
from mlx_redrafter.tree import pack

ARCHS = ["llama", "qwen3", "gemma3_text"]


class FixedDrafter:
    """Proposes the same beams (after the context's root) and records how it was asked."""

    stochastic = False

    def __init__(self, rows: list[list[int]], needs_host_tokens: bool, valid=None):
        self.rows = rows
        self.needs_host_tokens = needs_host_tokens
        self.valid = valid
        self.asked: list[tuple[list[int], int]] = []
        self.told: list[list[int]] = []

    def reset(self, prompt_tokens: list[int]) -> None:
        self.asked.clear()

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        self.asked.append((list(context.tokens), width))
        rows = mx.array(self.rows[:width], dtype=mx.int32)
        roots = mx.broadcast_to(context.root.reshape(1, 1), (rows.shape[0], 1))
        beams = mx.concatenate([roots.astype(mx.int32), rows[:, 1:]], axis=1)
        valid = None if self.valid is None else mx.array(self.valid[:width])
        return Draft(beams=beams, valid=valid)

    def accepted(self, tokens: list[int]) -> None:
        self.told.append(list(tokens))


def _context(tokens: list[int]) -> DraftContext:
    root = mx.array(tokens[-1], dtype=mx.int32)
    return DraftContext(mx.zeros((4,)), root, mx.array(len(tokens) - 1), tokens)


# ----------------------------------------------------------------------------- stacking


def test_stack_drafts_concatenates_beams_and_masks():
    a = Draft(beams=mx.array([[7, 1, 2], [7, 3, 4]]))
    b = Draft(beams=mx.array([[7, 5, 5]]), valid=mx.array([[True, True, False]]))
    both = stack_drafts([a, b])
    assert np.array(both.beams).tolist() == [[7, 1, 2], [7, 3, 4], [7, 5, 5]]
    assert np.array(both.valid).tolist() == [[True] * 3, [True] * 3, [True, True, False]]
    assert both.draft_logprobs is None
    assert stack_drafts([a, a]).valid is None
    with pytest.raises(ValueError, match="beam lengths"):
        stack_drafts([a, Draft(beams=mx.array([[7, 1]]))])


def test_pipelined_part_before_the_sync_host_part_after():
    head = FixedDrafter([[9, 1, 2], [9, 3, 4], [9, 5, 6]], needs_host_tokens=False)
    lookup = FixedDrafter([[9, 8, 8]], needs_host_tokens=True, valid=[[True, True, False]])
    combined = CombinedDrafter(head, [(lookup, 1)])
    assert combined.needs_host_tokens is False and combined.stochastic is False
    early = combined.propose(_context([4, 9]), 2, 3)  # the engine's W goes to the head
    assert np.array(early.beams).tolist() == [[9, 1, 2], [9, 3, 4]] and not lookup.asked
    full = combined.complete(early, _context([4, 5, 6, 9]), 2, 3)
    assert lookup.asked == [([4, 5, 6, 9], 1)]  # the fixed width, the complete tokens
    assert np.array(full.beams).tolist() == [[9, 1, 2], [9, 3, 4], [9, 8, 8]]
    assert np.array(full.valid)[-1].tolist() == [True, True, False]
    combined.accepted([1, 2])
    assert head.told == lookup.told == [[1, 2]]


def test_all_host_members_propose_together():
    a = FixedDrafter([[9, 1]], needs_host_tokens=True)
    b = FixedDrafter([[9, 2], [9, 3]], needs_host_tokens=True)
    combined = CombinedDrafter(a, [(b, 2)])
    assert combined.needs_host_tokens is True
    draft = combined.propose(_context([9]), 1, 2)
    assert np.array(draft.beams).tolist() == [[9, 1], [9, 2], [9, 3]]
    assert combined.complete(draft, _context([9]), 1, 2) is draft


def test_bad_configurations_are_refused():
    head = FixedDrafter([[1, 2]], needs_host_tokens=False)
    with pytest.raises(ValueError, match="at least one extra"):
        CombinedDrafter(head, [])
    with pytest.raises(ValueError, match="widths >= 1"):
        CombinedDrafter(head, [(PromptLookupDrafter(), 0)])
    with pytest.raises(CLIError, match="lookup-beams 0"):
        lookup_beams_for(1, "redrafter")
    assert lookup_beams_for(None, "redrafter") == 0 and lookup_beams_for(None, "exact") == 1
    assert with_lookup(head, 0, 3) is head
    assert isinstance(with_lookup(head, 2, 3), CombinedDrafter)


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def tokenizer():
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}  # no EOS: run the full length
    return tok


def _random_head(vocab: int, hidden: int, seed: int) -> ReDrafterHead:
    mx.random.seed(seed)
    head = ReDrafterHead(ReDrafterConfig(vocab, hidden, 2 * hidden, 1, rnn=True))
    mx.eval(head.parameters())
    return head


def _prompts(seed: int, vocab: int, count: int) -> list[list[int]]:
    """Prompts with a repeated span (what prompt lookup feeds on)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        span = rng.integers(3, vocab, size=int(rng.integers(5, 12))).tolist()
        noise = rng.integers(3, vocab, size=int(rng.integers(1, 6))).tolist()
        out.append(span + noise + span[: len(span) // 2])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_head_plus_lookup_greedy_equals_ar(arch, tokenizer):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=4, scale=2.0, vocab_size=vocab)
    head = ReDrafter.from_model(model, _random_head(vocab, model.args.hidden_size, seed=1))
    gained = 0
    for i, prompt in enumerate(_prompts(ARCHS.index(arch), vocab, 4)):
        ar = _tokens(model, tokenizer, prompt, 48)
        width, length = [(1, 4), (2, 5)][i % 2]
        alone, both = gen.StepStats(), gen.StepStats()
        spec_alone = _tokens(
            model, tokenizer, prompt, 48, drafter=head, beam_width=width, beam_length=length,
            stats=alone,
        )  # fmt: skip
        combined = CombinedDrafter(head, [(PromptLookupDrafter(ngram=3), 1)])
        spec = _tokens(
            model, tokenizer, prompt, 48, drafter=combined, beam_width=width, beam_length=length,
            stats=both,
        )  # fmt: skip
        assert spec == ar == spec_alone, f"{arch} prompt {i}"
        gained += sum(both.accepted) - sum(alone.accepted)
    assert gained > 0  # the lookup beams really got accepted where the head's did not


def test_engine_asks_complete_with_the_tokens_up_to_the_root(tokenizer):
    """``complete`` sees every emitted token, the root last (``len == position + 1``)."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=4, scale=2.0, vocab_size=vocab)
    head = ReDrafter.from_model(model, _random_head(vocab, model.args.hidden_size, seed=1))
    lookup = FixedDrafter([[0, 0, 0]], needs_host_tokens=True, valid=[[True, False, False]])
    prompt = _prompts(0, vocab, 1)[0]
    out = _tokens(
        model,
        tokenizer,
        prompt,
        20,
        drafter=CombinedDrafter(head, [(lookup, 1)]),
        beam_width=1,
        beam_length=3,
    )
    seen = [tokens for tokens, _ in lookup.asked]
    assert seen[0] == prompt + out[:1]
    for before, after in zip(seen, seen[1:], strict=False):
        assert after[: len(before)] == before and len(after) > len(before)
    assert (prompt + out)[: len(seen[-1])] == seen[-1]


# ----------------------------------------------------------------------------- exactness


def _prompt_state(setup: Setup) -> tuple[list, mx.array]:
    """A fresh cache holding ``PROMPT`` and the ``(d,)`` hidden state of its last position."""
    cache = setup.target.make_cache()
    _, hidden = setup.target.forward(mx.array(PROMPT), cache)
    return cache, hidden[-1]


def _tree_weights(setup: Setup, params, beams: np.ndarray):
    """The packed tree of ``beams`` and the target's ``(N, V)`` sampling log-weights."""
    cache, _ = _prompt_state(setup)
    tree = pack(beams)
    logits, _ = setup.target.tree_forward(tree, cache)
    return tree, params.log_weights(logits)


LOOKUP_WIDTH = 6


def _combined_beams(setup: Setup, params, root: int) -> np.ndarray:
    """Head beams (W=2, L=3) + six lookup-like beams after ``PROMPT + [root]``, stacked
    ``(8, 3)``: the target's three likeliest tokens, each with its two likeliest successors
    (:func:`probable_beams`), so it matters which member's beams the walk accepts.
    """
    _, hidden = _prompt_state(setup)
    context = DraftContext(
        hidden, mx.array(root, dtype=mx.int32), mx.array(len(PROMPT)), PROMPT + [root]
    )
    rows = probable_beams(lambda c: setup.next_probs(c, params), PROMPT + [root], 3)
    lookup = FixedDrafter(rows, needs_host_tokens=True)
    combined = CombinedDrafter(setup.drafter, [(lookup, LOOKUP_WIDTH)])
    draft = combined.complete(combined.propose(context, 2, 3), context, 2, 3)
    return np.array(draft.beams)


def _walk_tree(tree, log_weights, samples: int, walk=exact_walk):
    uniforms, gumbel = exact_randomness(tree, VOCAB, samples)
    tokens = mx.array(tree.tokens)
    num, last, nxt = walk(mx.array(children_table(tree)), tokens, log_weights, uniforms, gumbel)
    mx.eval(num, last, nxt)
    return np.array(num), np.array(last), np.array(nxt)


def _two_tokens(setup: Setup, params, per_member: bool, walk=exact_walk) -> tuple[int, np.ndarray]:
    """``(S, 2)`` draws of the two tokens after the root through the combined tree.

    ``per_member``: the wrong rule, each drafter's beams walked on their own (independent
    randomness) and the longest accepted run kept. ``walk``: the exact walk (or a copy with
    a planted bug).
    """
    mx.random.seed(3)
    root = int(np.argmax(setup.next_probs(PROMPT, params)))
    beams = _combined_beams(setup, params, root)
    parts = [beams[:2], beams[2:]] if per_member else [beams]
    outs, nums = [], []
    for rows in parts:
        tree, log_weights = _tree_weights(setup, params, rows)
        num, last, nxt = _walk_tree(tree, log_weights, SAMPLES, walk)
        outs.append(_emitted(tree, num, last, nxt, 2))
        nums.append(num)
    out = outs[0]
    if per_member:
        out = np.where((nums[1] > nums[0])[:, None], outs[1], outs[0])
    # a step that accepted nothing emitted one token: draw the second from the target
    short = out[:, 1] < 0
    for x1 in np.unique(out[short, 0]):
        rows = np.nonzero(short & (out[:, 0] == x1))[0]
        p = setup.next_probs(PROMPT + [root, int(x1)], params)
        out[rows, 1] = np.random.default_rng(int(x1)).choice(VOCAB, size=rows.size, p=p / p.sum())
    return root, out


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_combined_tree_preserves_the_distribution(setup, name):
    params = SETTINGS[name]
    root, draws = _two_tokens(setup, params, per_member=False)
    joint = exact_joint(setup, params, root)
    p_value, tvd, impossible = goodness_of_fit(draws, joint)
    assert impossible == 0
    assert p_value > 1e-3, f"p={p_value:.2e}, tvd={tvd:.4f}"
    assert tvd < tvd_bound(joint, len(draws))


@pytest.mark.slow
def test_longest_of_separate_walks_fails_the_same_test(setup):
    """Power: walking each drafter's beams separately and keeping the longest is biased."""
    params = SETTINGS["plain"]
    root, draws = _two_tokens(setup, params, per_member=True)
    p_value, tvd, _ = goodness_of_fit(draws, exact_joint(setup, params, root))
    assert p_value < 1e-3, f"p={p_value:.3f} tvd={tvd:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("bug", ["deterministic_ratio", "naive_residual"])
def test_a_planted_bug_fails_the_same_test(setup, bug, name):
    """Power: the combined tree's walk without the renormalisation by rejected siblings, or
    with the rejected children left in the stop node's draw, fails the test above."""
    params = SETTINGS[name]
    root, draws = _two_tokens(setup, params, per_member=False, walk=walk_mutant(bug))
    joint = exact_joint(setup, params, root)
    p_value, tvd, impossible = goodness_of_fit(draws, joint)
    assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"
    assert tvd > tvd_bound(joint, len(draws))  # the TVD check fails it too


# ----------------------------------------------------------------------------- simulation


def test_simulated_head_plus_lookup_matches_the_engine_step_for_step():
    """``train evaluate --lookup-beams 1`` simulates what the engine does: greedy decoding
    of a tiny target's own responses with a random head + one lookup beam (W = 1, L = 4)
    accepts, at every step, the longer of the head's and the lookup's simulated runs."""
    from test_train import greedy_responses

    from mlx_redrafter.target import Target
    from mlx_redrafter.train.evaluate import beam_accepted, decode_walks, lookup_accepted
    from mlx_redrafter.train.score import teacher_forced

    model = tiny_model("llama", seed=7)
    target = Target(model)
    data = greedy_responses(target, 6, 40)  # tiny random targets loop: lookup finds repeats
    head = ReDrafter.from_model(
        model, _random_head(model.args.vocab_size, model.args.hidden_size, seed=2)
    )
    table, features = teacher_forced(model, data, 4)
    rows = np.flatnonzero(table.at_inference)
    heads = np.zeros(table.size, dtype=np.int64)
    heads[rows] = beam_accepted(
        head.head, head.searcher.embedding, mx.array(features[rows]), table.windows[rows],
        table.in_loss[rows], 1,
    )  # fmt: skip
    lookup = lookup_accepted(table, [t for t, _ in data], ngram=3, width=1)
    assert (lookup > heads).any()  # the lookup beam wins somewhere: the max matters
    walks = decode_walks(table, np.maximum(heads, lookup))
    combined = CombinedDrafter(head, [(PromptLookupDrafter(ngram=3), 1)])
    assert_engine_follows_walks(target, combined, data, walks, 4)


def test_parallel_head_plus_lookup_keeps_its_hidden_window(tokenizer):
    """A parallel head (which reads the last ``C`` hidden states) in a combined tree."""
    from test_parallel_head import random_head

    from mlx_redrafter.drafters import ParallelDrafter

    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=3, scale=2.0, vocab_size=vocab)
    head = ParallelDrafter.from_model(model, random_head(vocab, k=3, context=4, seed=1))
    accepted = []
    for i, prompt in enumerate(_prompts(5, vocab, 2)):
        ar = _tokens(model, tokenizer, prompt, 40)
        # an oracle member makes long accepted blocks: the window advances by several rows
        oracle = OracleDrafter(prompt + ar, vocab, seed=i, wrong_every=3)
        combined = CombinedDrafter(head, [(PromptLookupDrafter(ngram=3), 1), (oracle, 1)])
        assert combined.hidden_window == 4
        stats = gen.StepStats()
        spec = _tokens(
            model, tokenizer, prompt, 40, drafter=combined, beam_width=2, beam_length=4,
            stats=stats,
        )  # fmt: skip
        assert spec == ar
        accepted += stats.accepted
    assert max(accepted) == 3 and sum(accepted) >= 20, accepted
