"""Prompt-cache reuse: a second turn on the cache of the first prefills only its new tokens
and decodes exactly what a fresh run over the whole conversation decodes.

For every drafter kind, turn 2's tokens and every draft it verifies equal a fresh run's
(the drafter's own state followed the cache: the same proposals), and the target read only
the new tokens (counted at ``Target.forward``, which only the prompt pass calls)."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import mutant
from test_draft_model import noisy_copy
from test_eagle import random_head as random_eagle_head
from test_lossless import random_head as random_redrafter
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import DraftModelDrafter, PromptLookupDrafter
from mlx_redrafter.drafters.eagle import EagleDrafter, lm_head_rows
from mlx_redrafter.prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_redrafter.target import Target

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

MAX_TOKENS = 21


@pytest.fixture(scope="module")
def tokenizer():
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}  # no EOS: run the full length
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", seed=7, scale=3.0, vocab_size=len(tokenizer._tokenizer))


def _turns(vocab: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(0)
    first = rng.integers(3, vocab, size=9).tolist()
    return first * 2 + [5, 6], rng.integers(3, vocab, size=7).tolist() + first[:4]


def _drafter(kind: str, model, vocab: int):
    if kind == "redrafter":
        return random_redrafter(model, 1), {"beam_width": 3, "beam_length": 4}
    if kind == "eagle":
        head = random_eagle_head(model, 2)
        drafter = EagleDrafter(head, lm_head_rows(model, None), model.model.embed_tokens)
        return drafter, {"beam_width": 2, "beam_length": 4}
    if kind == "lookup":
        return PromptLookupDrafter(3), {"beam_width": 2, "beam_length": 5}
    draft = noisy_copy("llama", seed=7, noise=0.02, scale=3.0, vocab_size=vocab)
    return DraftModelDrafter.from_models(model, draft), {"beam_width": 1, "beam_length": 4}


class Recorder:
    """Counts the tokens the target's prompt pass reads and keeps every verified draft."""

    def __init__(self, model, drafter, monkeypatch):
        self.fed: list[int] = []
        self.drafts: list[np.ndarray] = []
        forward = Target.forward

        def counting(target, tokens, cache):
            if target.model is model:
                self.fed.append(int(tokens.size))
            return forward(target, tokens, cache)

        monkeypatch.setattr(Target, "forward", counting)
        if drafter is not None:
            propose = drafter.propose

            def recording(context, width, length):
                draft = propose(context, width, length)
                self.drafts.append(draft.beams)
                return draft

            monkeypatch.setattr(drafter, "propose", recording)

    def take(self) -> tuple[int, list[np.ndarray]]:
        fed, drafts = sum(self.fed), [np.array(d) for d in self.drafts]
        self.fed, self.drafts = [], []
        return fed, drafts


def _run(model, tok, prompt, **kw) -> list[int]:
    return [r.token for r in gen.stream_generate(model, tok, prompt, max_tokens=MAX_TOKENS, **kw)]


@pytest.mark.parametrize("kind", ["redrafter", "eagle", "lookup", "draft_model"])
def test_second_turn_on_the_cache_equals_a_fresh_run(kind, model, tokenizer, monkeypatch):
    vocab = len(tokenizer._tokenizer)
    drafter, shape = _drafter(kind, model, vocab)
    first, second = _turns(vocab)
    rec = Recorder(model, drafter, monkeypatch)
    cache = make_prompt_cache(model)
    out1 = _run(model, tokenizer, first, drafter=drafter, prompt_cache=cache, **shape)
    assert rec.take()[0] == len(first) and cache.tokens == first + out1
    stats = gen.StepStats()
    out2 = _run(model, tokenizer, second, drafter=drafter, prompt_cache=cache, stats=stats, **shape)
    fed, drafts = rec.take()
    # new tokens only: turn 1's last token is read again when it never went through the
    # target (it was the last root), and a window of recent states (EAGLE: 8) re-reads
    # C - 1 tokens of turn 1
    extra = int(getattr(drafter, "hidden_window", 1)) - 1
    assert fed == stats.prefill_tokens and fed - extra in (len(second), len(second) + 1)
    assert stats.cached_tokens + fed == len(first) + len(out1) + len(second)
    fresh = _run(model, tokenizer, first + out1 + second, drafter=drafter, **shape)
    fresh_fed, fresh_drafts = rec.take()
    assert fresh_fed == len(first + out1 + second)
    assert out2 == fresh
    assert len(drafts) == len(fresh_drafts) and all(
        np.array_equal(a, b) for a, b in zip(drafts, fresh_drafts, strict=True)
    ), kind
    assert out2 == _run(model, tokenizer, first + out1 + second)  # and AR's


def test_ar_reuse_and_a_cache_file(model, tokenizer, tmp_path):
    vocab = len(tokenizer._tokenizer)
    first, second = _turns(vocab)
    cache = make_prompt_cache(model)
    out1 = _run(model, tokenizer, first, prompt_cache=cache)
    save_prompt_cache(tmp_path / "c.safetensors", cache)
    stats = gen.StepStats()
    out2 = _run(model, tokenizer, second, prompt_cache=cache, stats=stats)
    # AR queues the next step before a token is shown: the last one is in the cache too
    assert stats.cached_tokens == len(first) + len(out1)
    assert stats.prefill_tokens == len(second)
    assert out2 == _run(model, tokenizer, first + out1 + second)
    loaded = load_prompt_cache(tmp_path / "c.safetensors")
    drafter = random_redrafter(model, 1)
    stats = gen.StepStats()
    # an AR cache read by speculative decoding starts anew: another kind of cache
    assert _run(model, tokenizer, second, drafter=drafter, prompt_cache=loaded, stats=stats) == out2
    assert stats.cached_tokens == 0
    loaded = load_prompt_cache(tmp_path / "c.safetensors")
    assert _run(model, tokenizer, second, prompt_cache=loaded) == out2


def _diverging(model, tokenizer, kind: str, monkeypatch) -> tuple[list, list, list, list]:
    """Turn 1, then a conversation that edits turn 1's prompt (a server re-renders the
    whole conversation): its tokens and drafts on the cache, and a fresh run's."""
    vocab = len(tokenizer._tokenizer)
    drafter, shape = _drafter(kind, model, vocab)
    rec = Recorder(model, drafter, monkeypatch)
    first, second = _turns(vocab)
    cache = make_prompt_cache(model)
    _run(model, tokenizer, first, drafter=drafter, prompt_cache=cache, **shape)
    # the first turn asked again with its end edited (shorter than what the cache holds)
    edited = first[:14] + [7, 8] + second
    new = cache.continuation(edited)
    assert new == edited[14:]
    rec.take()
    stats = gen.StepStats()
    out = _run(model, tokenizer, new, drafter=drafter, prompt_cache=cache, stats=stats, **shape)
    extra = int(getattr(drafter, "hidden_window", 1)) - 1
    assert stats.cached_tokens == 14 - extra
    drafts = rec.take()[1]
    fresh = _run(model, tokenizer, edited, drafter=drafter, **shape)
    return out, drafts, fresh, rec.take()[1]


@pytest.mark.parametrize("kind", ["eagle", "lookup", "draft_model"])
def test_a_diverging_conversation_rewinds_to_the_shared_prefix(kind, model, tokenizer, monkeypatch):
    out, drafts, fresh, fresh_drafts = _diverging(model, tokenizer, kind, monkeypatch)
    assert out == fresh
    assert len(drafts) == len(fresh_drafts)
    assert all(np.array_equal(a, b) for a, b in zip(drafts, fresh_drafts, strict=True))


#: Planted bugs: ``(function, original, broken, drafter kind)``.
MUTANTS = {
    # the target's cache kept at its longest instead of the prefix shared with the prompt
    "target_not_rewound": (
        gen._reuse,
        "set_length(prompt_cache.cache, keep)",
        "set_length(prompt_cache.cache, len(prompt_cache.held))",
        "lookup",
    ),
    # the feature-level head keeps its entries past the shared prefix
    "eagle_not_rewound": (
        EagleDrafter.restore_sequence,
        "self.cached = mx.array(keep, dtype=mx.int32)",
        "self.cached = cached",
        "eagle",
    ),
    # the lookup index keeps the tokens past the shared prefix
    "lookup_not_rewound": (
        PromptLookupDrafter.restore_sequence,
        "state.size = min(state.size, length)",
        "state.size = state.size",
        "lookup",
    ),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_check_has_teeth(name, model, tokenizer, monkeypatch):
    function, original, broken, kind = MUTANTS[name]
    owner = {"_reuse": gen, "restore_sequence": None}[function.__name__]
    planted = mutant(function, original, broken)
    if owner is None:
        owner = EagleDrafter if kind == "eagle" else PromptLookupDrafter
    monkeypatch.setattr(owner, function.__name__, planted)
    try:
        out, drafts, fresh, fresh_drafts = _diverging(model, tokenizer, kind, monkeypatch)
    except ValueError as error:
        print(f"{name}: caught loudly: {error}")
        return
    same_drafts = len(drafts) == len(fresh_drafts) and all(
        np.array_equal(a, b) for a, b in zip(drafts, fresh_drafts, strict=True)
    )
    print(f"{name}: tokens differ {out != fresh}, drafts differ {not same_drafts}")
    assert out != fresh or not same_drafts
