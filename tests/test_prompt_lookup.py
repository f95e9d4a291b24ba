"""Prompt lookup and the ``valid`` mask: lookup rules, packing, lossless greedy, mask honoured.

The mask tests have teeth: an oracle drafter proposes the target's true continuation but
marks its tail invalid, so a engine that ignored the mask would accept the tail (the last
test shows it does, with the mask dropped before packing).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fake_drafters import OracleDrafter
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import PromptLookupDrafter
from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.prompt_lookup import lookup_beams, match_starts
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import pack

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

ARCHS = ["llama", "qwen3", "gemma3_text"]


# ----------------------------------------------------------------------------- lookup


def test_match_starts_most_recent_first_and_not_the_suffix_itself():
    seq = np.array([5, 1, 2, 9, 1, 2, 7, 1, 2])
    assert match_starts(seq, 2).tolist() == [4, 1]
    assert match_starts(seq, 3).tolist() == []
    assert match_starts(seq, 1).tolist() == [5, 2]
    assert match_starts(np.array([3]), 1).tolist() == []


def test_lookup_prefers_longer_ngrams_then_recency_and_distinct_continuations():
    # suffix (1, 2): matches at 4 ("1 2 7 1") and 1 ("1 2 9 1"); 1-gram "2" adds nothing new
    seq = np.array([5, 1, 2, 9, 1, 2, 7, 1, 2])
    beams, valid = lookup_beams(seq, ngram=3, width=2, length=3)
    assert beams.tolist() == [[2, 7, 1], [2, 9, 1]]
    assert valid.all()
    # the same continuation twice is proposed once
    seq = np.array([1, 2, 3, 1, 2, 3, 1, 2])
    beams, valid = lookup_beams(seq, ngram=2, width=3, length=2)
    assert beams[0].tolist() == [2, 3] and valid[0].all()
    assert not valid[1:, 1:].any()


def test_lookup_marks_missing_positions_invalid():
    # the only match of "4" is followed by three tokens: the fourth drafted position is invalid
    seq = np.array([4, 6, 8, 4])
    beams, valid = lookup_beams(seq, ngram=2, width=1, length=5)
    assert beams[0, :4].tolist() == [4, 6, 8, 4]
    assert valid.tolist() == [[True, True, True, True, False]]
    # no match at all: only the root is valid
    beams, valid = lookup_beams(np.array([1, 2, 3]), ngram=3, width=2, length=4)
    assert (beams[:, 0] == 3).all() and valid.tolist() == [[True, False, False, False]] * 2


def test_drafter_follows_the_growing_sequence_and_checks_input():
    drafter = PromptLookupDrafter(ngram=2)
    drafter.reset([1, 2, 3])
    tokens = [1, 2, 3, 1]
    ctx = DraftContext(mx.zeros(4), mx.array(1), mx.array(3), tokens)
    draft = drafter.propose(ctx, 1, 3)
    assert np.array(draft.beams).tolist() == [[1, 2, 3]]
    tokens += [2]
    draft = drafter.propose(DraftContext(mx.zeros(4), mx.array(2), mx.array(4), tokens), 1, 3)
    assert np.array(draft.beams).tolist() == [[2, 3, 1]]
    with pytest.raises(ValueError, match="ngram"):
        PromptLookupDrafter(ngram=0)
    with pytest.raises(ValueError, match="shrank"):
        drafter.propose(DraftContext(mx.zeros(4), mx.array(1), mx.array(0), [1]), 1, 3)


# ----------------------------------------------------------------------------- pack + valid


def test_pack_drops_unusable_positions():
    beams = np.array([[7, 1, 2, 3], [7, 1, 5, 6], [7, 4, 4, 4]])
    valid = np.array(
        [[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 0, 0]], dtype=bool
    )  # beam 1 stops after "1"; its "6" follows an invalid position
    tree = pack(beams, valid)
    assert tree.size == 4  # root, 1, 2, 3
    assert tree.tokens.tolist() == [7, 1, 2, 3]
    assert tree.usable.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert tree.unpack.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert tree.parent.tolist() == [-1, 0, 1, 2]
    # a prefix invalid in the first beam but valid in a later one still gets its node
    beams = np.array([[7, 1, 2], [7, 1, 2]])
    tree = pack(beams, np.array([[1, 1, 0], [1, 1, 1]], dtype=bool))
    assert tree.tokens.tolist() == [7, 1, 2] and tree.unpack.tolist() == [[0, 1, 1], [0, 1, 2]]
    # columns past the longest usable beam are dropped
    tree = pack(beams, np.array([[1, 1, 0], [1, 0, 1]], dtype=bool))
    assert tree.unpack.shape == (2, 2) and tree.size == 2
    with pytest.raises(ValueError, match="valid has shape"):
        pack(beams, np.ones((2, 4), dtype=bool))


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def tokenizer():
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}  # no EOS: run the full length
    return tok


def _prompts(seed: int, vocab: int, count: int) -> list[list[int]]:
    """Prompts with repeated spans (what prompt lookup feeds on) and plain random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        span = rng.integers(3, vocab, size=int(rng.integers(4, 12))).tolist()
        noise = rng.integers(3, vocab, size=int(rng.integers(1, 8))).tolist()
        out.append(span + noise + span[: len(span) // 2] if i % 3 else noise)
    return out


def _tokens(model, tok, prompt, max_tokens, **kw) -> list[int]:
    return [r.token for r in gen.stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup_greedy_equals_ar(arch, tokenizer):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=4, scale=2.0, vocab_size=vocab)
    accepted = 0
    for i, prompt in enumerate(_prompts(ARCHS.index(arch), vocab, 6)):
        ar = _tokens(model, tokenizer, prompt, 60)
        width, length = [(1, 4), (3, 5), (2, 3)][i % 3]
        stats = gen.StepStats()
        spec = _tokens(
            model,
            tokenizer,
            prompt,
            60,
            drafter=PromptLookupDrafter(ngram=3),
            beam_width=width,
            beam_length=length,
            stats=stats,
        )
        assert spec == ar, f"{arch} prompt {i}"
        accepted += sum(stats.accepted)
    assert accepted > 0  # lookups really got accepted (random tiny models repeat themselves)


class TruncatedOracle(OracleDrafter):
    """The target's true continuation, with every position from ``cut`` on marked invalid.

    The tokens there are right, so only the ``valid`` mask keeps them from being accepted.
    """

    needs_host_tokens = False

    def __init__(self, sequence: list[int], vocab_size: int, cut: int):
        super().__init__(sequence, vocab_size)
        self.cut = cut

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        draft = super().propose(context, width, length)
        position = mx.arange(length)[None, :]
        # an invalid position followed by a valid one: the later one is unusable too
        valid = (position < self.cut) | (position == length - 1)
        return Draft(beams=draft.beams, valid=mx.broadcast_to(valid, draft.beams.shape))


def _truncated_run(model, tokenizer, prompt, params, cut: int) -> tuple[list[int], list[int]]:
    """``(AR tokens, accepted counts)`` of a run whose drafts are valid before ``cut`` only."""
    vocab = len(tokenizer._tokenizer)
    mx.random.seed(0)
    ar = _tokens(model, tokenizer, prompt, 40)
    stats = gen.StepStats()
    mx.random.seed(0)
    spec = _tokens(
        model,
        tokenizer,
        prompt,
        40,
        drafter=TruncatedOracle(prompt + ar, vocab, cut),
        beam_width=2,
        beam_length=5,
        sampler=params,
        stats=stats,
    )
    if params.greedy:
        assert spec == ar
    return ar, stats.accepted


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temp=0.01)])
def test_valid_mask_is_honoured(tokenizer, params):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=3, scale=2.0, vocab_size=vocab)
    for prompt in _prompts(1, vocab, 3):
        _, accepted = _truncated_run(model, tokenizer, prompt, params, cut=2)
        assert max(accepted) <= 1, accepted  # position 2 and on are invalid
        assert max(accepted) == 1  # and the valid position is accepted


def test_ignoring_the_mask_is_detected(tokenizer, monkeypatch):
    """Teeth: with the mask dropped before packing, the same run accepts invalid positions."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=3, scale=2.0, vocab_size=vocab)
    monkeypatch.setattr(gen, "_host_draft", lambda draft: (np.array(draft.beams), None))
    _, accepted = _truncated_run(model, tokenizer, _prompts(1, vocab, 1)[0], SamplingParams(), 2)
    assert max(accepted) > 1
