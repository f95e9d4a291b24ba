"""String-level exact match (SLEM): re-tokenizing drafted text, lossless decoding.

Tokenizers trained in code: two byte-level BPEs with the full byte alphabet and different
vocabularies (291 and 200 tokens: one has ``Ġ123``, the other splits it), and a
byte-level BPE with a word-start marker on the first word (``add_prefix_space``), where
encoding the drafted text on its own would be wrong and the look-behind fixes it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import walk_mutant
from test_tli import (
    ENGINE_PARAMS,
    TEXTS,
    canonical_prefix,
    engine_pairs,
    pair_law,
    permuted_tokenizer,
    transplant,
)
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import SlemDrafter, draft_model_drafter
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.drafters.slem import retokenize
from mlx_redrafter.drafters.vocab_map import token_intersection

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable


def bpe(vocab_size: int, add_prefix_space: bool = False, corpus: list[str] | None = None):
    """A byte-level BPE over the full byte alphabet (deterministic) with ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    default = ["the cat sat on the mat. " * 4, "hello world 123 456, the end.", "a b c d e f"]
    tok.train_from_iterator(corpus or default * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def target_tok():
    tok = TokenizerWrapper(byte_tokenizer(300))  # full alphabet: deterministic
    tok.eos_token_ids = {10**6}  # no EOS: run the full length
    return tok


def _names(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_clean_boundary_gives_the_canonical_continuation(target_tok):
    hf = target_tok._tokenizer
    window = hf.encode("the cat")
    out = retokenize(target_tok, window, " sat on the mat")
    assert window + out == hf.encode("the cat sat on the mat")


def test_digit_run_merging_into_committed_tokens(target_tok):
    """``"hello 12" + "3 end"`` encodes as ``hello Ġ123 Ġend``: the committed ``Ġ12`` cannot
    become ``Ġ123``, so the drafted text is encoded on its own after it."""
    hf = target_tok._tokenizer
    window = hf.encode("hello 12")
    assert _names(hf, window) == ["hello", "Ġ12"]
    assert "Ġ123" in _names(hf, hf.encode("hello 123 end"))
    out = retokenize(target_tok, window, "3 end")
    assert _names(hf, out) == ["3", "Ġend"]
    assert hf.decode(window + out) == "hello 123 end"
    # the draft tokenizer splits the same digits differently: its text still maps back
    draft = bpe(200)
    assert "Ġ123" not in _names(draft, draft.encode(" 123"))
    drafted = draft.decode(draft.encode("3 end"))
    assert hf.decode(window + retokenize(target_tok, window, drafted)) == "hello 123 end"


def test_space_marker_needs_the_lookbehind():
    """With ``add_prefix_space`` (a word-start marker on the first word), encoding drafted
    text that continues a word on its own would start a new word (``Ġworld``); encoded
    after the look-behind it continues the word, as the whole text encodes."""
    words = bpe(300, add_prefix_space=True, corpus=["hello world, world hello. the cat"] * 8)
    window = words.encode("hello")
    assert _names(words, window) == ["Ġhello"]
    assert _names(words, words.encode("world")) == ["Ġworld"]  # on its own: a new word
    out = retokenize(words, window, "world")
    assert _names(words, out) == ["wor", "ld"]
    assert words.decode(window + out) == words.decode(words.encode("helloworld"))
    out = retokenize(words, window, " world")
    assert _names(words, out) == ["Ġworld"]


def test_empty_text_proposes_nothing(target_tok):
    assert retokenize(target_tok, [5], "") == []


@pytest.mark.parametrize(("arch", "other"), [("llama", "qwen3"), ("gemma3_text", "llama")])
def test_slem_greedy_and_sampling_equal_ar(arch, other, target_tok):
    draft_tok = bpe(200)
    size = len(target_tok._tokenizer)
    target = tiny_model(arch, seed=3, scale=2.0, vocab_size=size)
    draft = tiny_model(other, seed=9, scale=2.0, vocab_size=len(draft_tok))
    drafter = draft_model_drafter(target, draft, target_tok, draft_tok, method="slem")
    assert isinstance(drafter, SlemDrafter)
    for i, text in enumerate(TEXTS):
        prompt = target_tok.encode(text)
        ar = [r.token for r in gen.stream_generate(target, target_tok, prompt, max_tokens=40)]
        spec = [
            r.token
            for r in gen.stream_generate(
                target, target_tok, prompt, max_tokens=40, drafter=drafter, beam_length=2 + i % 3
            )
        ]
        assert spec == ar, f"{arch} text {i}"
    # sampling runs through the exact tree walk (deterministic drafts)
    mx.random.seed(0)
    out = list(
        gen.stream_generate(
            target, target_tok, prompt, max_tokens=30, drafter=drafter, beam_length=4, temp=1.0
        )
    )
    assert len(out) == 30


@pytest.mark.parametrize(("arch", "seed"), [("llama", 5), ("gemma3_text", 5)])
def test_slem_accepts_everything_while_the_text_is_canonical(arch, seed, target_tok):
    """The target's tokenizer under shuffled ids and the target's weights moved to them:
    the draft writes the target's own text, so every step whose context and continuation
    re-encode to themselves accepts all ``K`` drafts."""
    draft_tok = permuted_tokenizer(target_tok)
    size = len(target_tok._tokenizer)
    target = tiny_model(arch, seed=seed, scale=2.0, vocab_size=size)
    vmap = token_intersection(target_tok, draft_tok, size, size)
    draft = transplant(target, arch, vmap, size, seed=4)
    drafter = SlemDrafter(draft, target_tok, draft_tok)
    checked = 0
    for text in TEXTS:
        prompt = target_tok.encode(text)
        ar = [r.token for r in gen.stream_generate(target, target_tok, prompt, max_tokens=40)]
        stats = gen.StepStats()
        spec = [
            r.token
            for r in gen.stream_generate(
                target,
                target_tok,
                prompt,
                max_tokens=40,
                drafter=drafter,
                beam_length=4,
                stats=stats,
            )
        ]
        assert spec == ar
        canonical = canonical_prefix(target_tok, prompt, ar)
        emitted = 1
        for num in stats.accepted:
            if emitted + 4 <= canonical:  # the bonus token's boundary too
                assert num == 3, (text, stats.accepted, canonical)
                checked += 1
            emitted += num + 1
    assert checked >= 1


@pytest.mark.slow
@pytest.mark.parametrize("broken", [False, True], ids=["exact_walk", "naive_residual"])
def test_slem_sampling_keeps_the_target_law(broken, target_tok, monkeypatch):
    """Through the engine, SLEM's drafted chain (the transplanted draft's greedy text,
    often the target's likeliest token) keeps the law of the first two tokens; the walk
    drawing the stop node's token with the rejected child left in fails the same test."""
    from test_exact_sampling import goodness_of_fit

    from mlx_redrafter import accept

    draft_tok = permuted_tokenizer(target_tok)
    size = len(target_tok._tokenizer)
    target = tiny_model("llama", seed=5, scale=2.0, vocab_size=size)
    vmap = token_intersection(target_tok, draft_tok, size, size)
    drafter = SlemDrafter(transplant(target, "llama", vmap, size, seed=4), target_tok, draft_tok)
    if broken:
        monkeypatch.setattr(accept, "_compiled_walk", walk_mutant("naive_residual"))
    prompt = target_tok.encode(TEXTS[3])  # its likely first tokens re-encode canonically
    draws, from_draft = engine_pairs(target, target_tok, prompt, drafter, ENGINE_PARAMS, 600, 200)
    p_value, tvd, impossible = goodness_of_fit(draws, pair_law(target, prompt, ENGINE_PARAMS))
    assert from_draft > 60  # the drafted first token is often accepted
    if broken:
        assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"
    else:
        assert impossible == 0 and p_value > 1e-3, f"p={p_value:.2e} tvd={tvd:.4f}"


def test_slem_checks_width(target_tok):
    size = len(target_tok._tokenizer)
    drafter = SlemDrafter(tiny_model("llama", vocab_size=size), target_tok, target_tok)
    ctx = DraftContext(mx.zeros(4), mx.array(1), mx.array(0), [1, 2])
    with pytest.raises(ValueError, match="beam width 1"):
        drafter.propose(ctx, 2, 3)
    with pytest.raises(ValueError, match="slem method needs both tokenizers"):
        draft_model_drafter(
            tiny_model("llama", vocab_size=size), tiny_model("llama"), method="slem"
        )
    assert np.array(drafter.propose(ctx, 1, 3).valid).shape == (1, 3)
