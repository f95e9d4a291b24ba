"""Greedy speculative decoding equals AR decoding token for token (fp32).

Across 3 architectures x 20 prompts x 200 tokens, with an oracle drafter (long accepted
blocks, real branching), an untrained (random) ReDrafter head and random beams, including
EOS and max_tokens landing inside an accepted block. The last tests show the check has teeth: a single wrong tree-mask entry,
or tree positions off by one, break it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fake_drafters import OracleDrafter, RandomDrafter
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter import target as target_module
from mlx_redrafter.drafters.redrafter import (
    ReDrafter,
    ReDrafterConfig,
    ReDrafterHead,
    find_input_embedding,
)

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

ARCHS = ["llama", "qwen3", "gemma3_text"]
NUM_PROMPTS = 20
NUM_TOKENS = 200


def _prompts(seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(3, vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(NUM_PROMPTS)
    ]


def _tokens(model, tok, prompt, max_tokens, **kw) -> list[int]:
    return [r.token for r in gen.stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(byte_tokenizer())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_speculative_equals_ar(arch, tokenizer, monkeypatch):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=3, scale=2.0, vocab_size=vocab)
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})  # no EOS: run the full length
    total_accepted = 0
    for i, prompt in enumerate(_prompts(ARCHS.index(arch), vocab)):
        ar = _tokens(model, tokenizer, prompt, NUM_TOKENS)
        assert len(ar) == NUM_TOKENS
        oracle = OracleDrafter(prompt + ar, vocab, seed=i, wrong_every=3)
        width, length = [(1, 4), (2, 5), (4, 3), (3, 6)][i % 4]
        stats = gen.StepStats()
        spec = _tokens(
            model,
            tokenizer,
            prompt,
            NUM_TOKENS,
            drafter=oracle,
            beam_width=width,
            beam_length=length,
            stats=stats,
        )
        assert spec == ar, f"{arch} prompt {i}: first mismatch at {_first_diff(spec, ar)}"
        total_accepted += sum(stats.accepted)
        head = random_head(model, seed=i)
        rand = _tokens(
            model, tokenizer, prompt, NUM_TOKENS, drafter=head, beam_width=3, beam_length=4
        )
        assert rand == ar
        beams = _tokens(
            model,
            tokenizer,
            prompt,
            60,
            drafter=RandomDrafter(vocab, seed=i),
            beam_width=4,
            beam_length=3,
        )
        assert beams == ar[:60]
    # the oracle must really produce long accepted blocks, or this test proves little
    assert total_accepted > NUM_PROMPTS * NUM_TOKENS // 3


def test_cache_moves_only_paths_that_leave_the_first_beam(tokenizer, monkeypatch):
    """The accepted path's K/V is moved (``gather_path``) only when the path leaves the
    first beam: never for a chain, often when the truth sits in the last beam; the output
    equals AR either way."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=3, scale=2.0, vocab_size=vocab)
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    moved: list[int] = []
    real = gen.gather_path

    def counting(cache, path, num_prefix):
        moved.append(int(path.shape[0]))
        real(cache, path, num_prefix)

    monkeypatch.setattr(gen, "gather_path", counting)
    for i, prompt in enumerate(_prompts(7, vocab)[:6]):
        ar = _tokens(model, tokenizer, prompt, 80)
        chain = OracleDrafter(prompt + ar, vocab, seed=i, wrong_every=3)
        out = _tokens(model, tokenizer, prompt, 80, drafter=chain, beam_width=1, beam_length=5)
        assert out == ar and moved == []
        last = OracleDrafter(prompt + ar, vocab, seed=i, wrong_every=3, truth_beam=2)
        stats = gen.StepStats()
        out = _tokens(
            model, tokenizer, prompt, 80, drafter=last, beam_width=3, beam_length=5, stats=stats
        )
        assert out == ar, f"prompt {i}"
        assert 0 < len(moved) <= stats.steps and sum(stats.accepted) > 80 // 3
        moved.clear()


def random_head(model, seed: int) -> ReDrafter:
    """An untrained ReDrafter head (random weights) for ``model``."""
    mx.random.seed(seed)
    config = ReDrafterConfig(
        model.args.vocab_size, model.args.hidden_size, 96, 2, rnn=seed % 2 == 0
    )
    return ReDrafter(ReDrafterHead(config), find_input_embedding(model))


def _first_diff(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_eos_and_max_tokens_inside_accepted_blocks(arch, tokenizer, monkeypatch):
    """The output ends where AR's does when EOS or ``max_tokens`` falls on an accepted
    drafted token (the rest of that step's block, its own token at least, is dropped)."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=5, scale=2.0, vocab_size=vocab)
    inside = {"stop": 0, "length": 0}  # runs ended on an accepted draft, by EOS / max_tokens
    for i, prompt in enumerate(_prompts(11, vocab)[:10]):
        monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})  # restored after the test
        ar_full = _tokens(model, tokenizer, prompt, 80)
        # an EOS id that AR emits somewhere in the middle of its output
        eos = ar_full[20 + i]
        monkeypatch.setattr(tokenizer, "eos_token_ids", {eos})
        # with L = 6 and full acceptance, token 6k is a step's own token: 5 and 16 are not
        for max_tokens in (5, 16, 80):
            ar = _tokens(model, tokenizer, prompt, max_tokens)
            responses = list(
                gen.stream_generate(
                    model,
                    tokenizer,
                    prompt,
                    max_tokens=max_tokens,
                    drafter=OracleDrafter(prompt + ar_full, vocab, seed=i),
                    beam_width=2,
                    beam_length=6,
                )
            )
            assert [r.token for r in responses] == ar
            last = responses[-1]
            assert last.finish_reason == ("stop" if ar[-1] == eos else "length")
            inside[last.finish_reason] += last.from_draft
    assert inside["stop"] >= 3 and inside["length"] >= 3, inside


_ORIGINAL_BUILD = target_module._TreeLayout.build.__func__


def _sibling_visible(cls, tree, num_cached):
    """One wrong mask entry: node 1 also sees node 2 (a sibling or a descendant)."""
    layout = _ORIGINAL_BUILD(cls, tree, num_cached)
    if tree.size < 3:
        return layout
    visible = np.array(layout.visible)
    visible[1, num_cached + 2] = True
    return cls(layout.positions, mx.array(visible), layout.key_positions)


def _positions_off_by_one(cls, tree, num_cached):
    layout = _ORIGINAL_BUILD(cls, tree, num_cached)
    return cls(layout.positions + 1, layout.visible, layout.key_positions)


@pytest.mark.parametrize("broken", [_sibling_visible, _positions_off_by_one])
def test_the_check_has_teeth(broken, tokenizer, monkeypatch):
    """The same comparison fails with one wrong mask entry, or positions off by one."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=3, scale=2.0, vocab_size=vocab)
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    prompts = _prompts(5, vocab)[:6]
    expected = [_tokens(model, tokenizer, p, 60) for p in prompts]
    monkeypatch.setattr(target_module._TreeLayout, "build", classmethod(broken))
    mismatches = 0
    for i, (prompt, ar) in enumerate(zip(prompts, expected, strict=True)):
        drafter = OracleDrafter(prompt + ar, vocab, seed=i)
        spec = _tokens(model, tokenizer, prompt, 60, drafter=drafter, beam_width=4, beam_length=4)
        mismatches += spec != ar
    assert mismatches > 0
