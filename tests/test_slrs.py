"""String-level rejection sampling (SLRS, Timor et al. 2025, Algorithm 3).

Two hand-made tokenizers over the letters ``a b c d`` with deliberately overlapping
vocabularies: the target has ``cd bcd abcd`` (not ``ab``, ``abc``), the draft has
``ab abc cd``. The draft writes a string until it is no prefix of a longer target token
(or the depth bound); its first target token is the longest target token it starts with.
``abcd`` then has several draft tokenizations (``ab|cd``, ``abc|d``, ``ab|c|d``,
``a|b|cd``, ...), and so do ``a`` and the others, so ``ψ`` is a sum of paths. The walk's
``ψ`` equals a brute-force enumeration of all draft sequences (a wrong tree mask is
caught); through the engine the first two output tokens keep the target's law
(chi-square), and the same test fails when ``ψ`` is taken from one tokenization only;
greedy output equals AR, also for byte-level BPE pairs.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import mutant
from test_slem import bpe
from test_tli import TEXTS, engine_pairs, pair_law
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import SlrsDrafter, draft_model_drafter, slrs
from mlx_redrafter.drafters.string_trie import StringTrie
from mlx_redrafter.sampling import SamplingParams

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

TARGET_VOCAB = ["a", "b", "c", "d", "cd", "bcd", "abcd"]
TARGET_MERGES = [("c", "d"), ("b", "cd"), ("a", "bcd")]
DRAFT_VOCAB = ["a", "b", "c", "d", "ab", "abc", "cd"]
DRAFT_MERGES = [("a", "b"), ("ab", "c"), ("c", "d")]
PROMPT = "abcdab"


def letter_tokenizer(vocab: list[str], merges: list[tuple[str, str]]):
    """A BPE over whole strings (no pre-tokenizer) with exactly ``vocab``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(vocab)}, merges))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def pair():
    target_tok = TokenizerWrapper(letter_tokenizer(TARGET_VOCAB, TARGET_MERGES))
    target_tok.eos_token_ids = {10**6}  # no EOS: run the full length
    draft_tok = letter_tokenizer(DRAFT_VOCAB, DRAFT_MERGES)
    target = tiny_model("llama", seed=3, vocab_size=len(TARGET_VOCAB))
    draft = tiny_model("qwen3", seed=1, vocab_size=len(DRAFT_VOCAB))
    return target, target_tok, draft, draft_tok


def test_trie_maps_strings_to_their_first_target_token(pair):
    _, target_tok, _, draft_tok = pair
    trie = StringTrie.from_tokenizers(target_tok, draft_tok, len(DRAFT_VOCAB))
    name, target = DRAFT_VOCAB.index, TARGET_VOCAB.index
    assert [DRAFT_VOCAB[d] for d in np.nonzero(trie.root_open)[0]] == ["a", "b", "c", "ab", "abc"]
    assert [TARGET_VOCAB[t] for t in trie.root_target] == ["a", "b", "c", "d", "a", "a", "cd"]
    kids = trie.children(b"ab")
    assert kids.base == target("a")
    assert kids.longer.tolist() == [name("cd")] and kids.longer_targets.tolist() == [target("abcd")]
    assert kids.open_ids.tolist() == [name("c")]
    kids = trie.children(b"abc")
    assert kids.longer.tolist() == [name("d")] and kids.open_ids.tolist() == []
    assert trie.spell(target("abcd")) == (name("abc"), name("d"))


def brute_force_law(draft, context: list[int], params: SamplingParams, depth: int) -> np.ndarray:
    """``ψ`` by enumerating every draft sequence of at most ``depth`` tokens, each scored
    by a plain forward of the whole context (no cache, no tree): a sequence counts when
    the stop rule stops it at its last token, for the longest target token its string
    starts with."""
    strings = [w.encode() for w in DRAFT_VOCAB]
    targets = {w.encode(): i for i, w in enumerate(TARGET_VOCAB)}

    def is_open(s: bytes) -> bool:
        return any(t.startswith(s) and t != s for t in targets)

    def first_token(s: bytes) -> int:
        return targets[max((t for t in targets if s.startswith(t)), key=len)]

    psi = np.zeros(len(TARGET_VOCAB))
    for k in range(1, depth + 1):
        for path in itertools.product(range(len(strings)), repeat=k):
            spelled = [b"".join(strings[d] for d in path[:i]) for i in range(1, k + 1)]
            if not all(is_open(s) for s in spelled[:-1]):
                continue  # stopped earlier
            if k < depth and is_open(spelled[-1]):
                continue  # goes on
            mass = 1.0
            for i, d in enumerate(path):
                logits = draft(mx.array([[*context, *path[:i]]]))[0, -1]
                mass *= float(params.probs(logits)[d])
            psi[first_token(spelled[-1])] += mass
    return psi


@pytest.mark.parametrize("depth", [2, 3])
def test_walk_equals_brute_force_enumeration(pair, depth):
    target, target_tok, draft, draft_tok = pair
    params = SamplingParams(temp=0.8)
    drafter = SlrsDrafter(draft, target_tok, draft_tok, len(TARGET_VOCAB), width=64, depth=depth)
    context = draft_tok.encode(PROMPT)
    logits = drafter.runner.start(context, stable=False)
    law = slrs.string_law(
        drafter.runner, drafter.trie, logits, params, len(TARGET_VOCAB), 64, depth, 0.0
    )
    expected = brute_force_law(draft, context, params, depth)
    np.testing.assert_allclose(law.psi, expected, rtol=1e-4, atol=1e-7)
    abcd = TARGET_VOCAB.index("abcd")
    assert law.psi[abcd] > law.single[abcd] > 0  # several tokenizations count
    assert (law.psi - law.single).max() > 0.1  # and carry real mass
    assert abs(law.psi.sum() - 1) < 1e-5  # every stopped string has a first target token
    # the cache is back where it was: the next logits are the context's
    again = drafter.runner.start(context, stable=False)
    np.testing.assert_allclose(np.array(again), np.array(logits), rtol=1e-5, atol=1e-5)


#: Planted bugs in the walk: ``name -> (module attribute, original, broken)``.
WALK_MUTANTS = {
    # the expanded strings' tree mask lets them attend to each other
    "siblings_see_each_other": (
        "_tree",
        "mask = np.eye(n, dtype=bool)",
        "mask = np.ones((n, n), bool)",
    ),
    # an expanded open string also counted as stopped at its level (double counting)
    "expanded_also_stopped": (
        "string_law",
        "stopped[[node.path[0] for node in frontier]] = 0.0",
        "pass",
    ),
    # T(u + d)[0] taken as T(u)[0]: longer target tokens reached inside d ignored
    "first_token_of_prefix": (
        "string_law",
        "law.add_children(kid, stopped)",
        "law.add(np.full(len(stopped), kid.base), stopped)",
    ),
}


@pytest.mark.parametrize("name", sorted(WALK_MUTANTS))
def test_walk_mutants_are_caught(pair, monkeypatch, name):
    """The check's power: each planted bug changes ``ψ`` away from the enumeration."""
    _, target_tok, draft, draft_tok = pair
    attribute, original, broken = WALK_MUTANTS[name]
    monkeypatch.setattr(slrs, attribute, mutant(getattr(slrs, attribute), original, broken))
    params = SamplingParams(temp=0.8)
    drafter = SlrsDrafter(draft, target_tok, draft_tok, len(TARGET_VOCAB), width=64, depth=3)
    context = draft_tok.encode(PROMPT)
    logits = drafter.runner.start(context, stable=False)
    law = slrs.string_law(
        drafter.runner, drafter.trie, logits, params, len(TARGET_VOCAB), 64, 3, 0.0
    )
    assert not np.allclose(law.psi, brute_force_law(draft, context, params, 3), rtol=1e-3)


def test_greedy_equals_ar(pair):
    target, target_tok, draft, draft_tok = pair
    drafter = draft_model_drafter(target, draft, target_tok, draft_tok, method="slrs")
    assert isinstance(drafter, SlrsDrafter)
    for i, text in enumerate(["abcdab", "dcba", "abcabcd"]):
        prompt = target_tok.encode(text)
        ar = [r.token for r in gen.stream_generate(target, target_tok, prompt, max_tokens=30)]
        stats = gen.StepStats()
        spec = [
            r.token
            for r in gen.stream_generate(
                target, target_tok, prompt, max_tokens=30, drafter=drafter,
                beam_length=2 + i, stats=stats,
            )
        ]  # fmt: skip
        assert spec == ar, text
        assert stats.steps < 29  # some drafts were accepted
    assert drafter.forwards > 0  # the walk expanded open strings


@pytest.mark.parametrize(("arch", "other"), [("llama", "qwen3"), ("gemma3_text", "llama")])
def test_greedy_equals_ar_for_byte_level_pairs(arch, other):
    target_tok = TokenizerWrapper(byte_tokenizer(300))
    target_tok.eos_token_ids = {10**6}
    draft_tok = bpe(200)
    target = tiny_model(arch, seed=3, scale=2.0, vocab_size=len(target_tok._tokenizer))
    draft = tiny_model(other, seed=9, scale=2.0, vocab_size=len(draft_tok))
    drafter = SlrsDrafter(draft, target_tok, draft_tok, len(target_tok._tokenizer), depth=3)
    for i, text in enumerate(TEXTS[:2]):
        prompt = target_tok.encode(text)
        ar = [r.token for r in gen.stream_generate(target, target_tok, prompt, max_tokens=24)]
        spec = [
            r.token
            for r in gen.stream_generate(
                target, target_tok, prompt, max_tokens=24, drafter=drafter, beam_length=3 + i
            )
        ]
        assert spec == ar, f"{arch} text {i}"


ONE_SPELLING = ("reported = law.psi", "reported = law.single")


def bigram_model(rows: dict[int, list[float]], default: list[float]):
    """A tiny mlx-lm model whose next-token law depends on the last token only: row
    ``rows.get(x, default)`` after token ``x`` (the layers' outputs are zeroed, the
    embeddings are one-hot and the head holds the log-probabilities)."""
    from mlx.utils import tree_flatten, tree_unflatten

    size = len(default)
    model = tiny_model("mistral", vocab_size=size)
    table = np.log(np.array([rows.get(x, default) for x in range(size)], dtype=np.float32))
    embed = np.zeros((size, 64), dtype=np.float32)
    embed[np.arange(size), np.arange(size)] = 1.0
    head = np.zeros((size, 64), dtype=np.float32)
    head[:, :size] = table.T / 8.0  # the final norm scales a one-hot row by sqrt(64)
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    new = []
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(("o_proj.weight", "down_proj.weight")):
            value = mx.zeros_like(value)
        elif key.endswith("norm.weight"):
            value = mx.ones_like(value)
        new.append((key, mx.array(weights[key]) if key in weights else value))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def rows(pairs: dict[str, float], vocab: list[str]) -> list[float]:
    """A probability row over ``vocab`` from ``{token: mass}``, the rest spread evenly."""
    rest = [w for w in vocab if w not in pairs]
    left = (1.0 - sum(pairs.values())) / max(len(rest), 1)
    return [pairs.get(w, left) for w in vocab]


@pytest.fixture(scope="module")
def bigram_pair(pair):
    """Bigram models: the draft writes ``ab`` / ``abc`` and completes them (``abcd`` gets
    about half of ``Q``, its three spellings close in mass); the target wants ``abcd``
    less often, so its acceptance depends on ``Q(abcd)`` being right."""
    _, target_tok, _, draft_tok = pair
    d = DRAFT_VOCAB.index
    draft = bigram_model(
        {
            d("ab"): rows({"cd": 0.5, "c": 0.3}, DRAFT_VOCAB),
            d("abc"): rows({"d": 0.8}, DRAFT_VOCAB),
            d("c"): rows({"d": 0.8}, DRAFT_VOCAB),
        },
        rows({"ab": 0.3, "abc": 0.3, "d": 0.05, "cd": 0.05}, DRAFT_VOCAB),
    )
    target = bigram_model(
        {TARGET_VOCAB.index("abcd"): rows({"b": 0.3, "cd": 0.3}, TARGET_VOCAB)},
        rows({"abcd": 0.25, "a": 0.2}, TARGET_VOCAB),
    )
    return target, target_tok, draft, draft_tok


@pytest.mark.slow
@pytest.mark.parametrize("broken", [False, True], ids=["all_spellings", "one_spelling"])
def test_sampling_keeps_the_target_law(bigram_pair, broken, monkeypatch):
    """Through the engine, the first two tokens follow the target's law; reporting ``q``
    of the most probable spelling only (the draws unchanged) fails the same test."""
    from test_exact_sampling import goodness_of_fit

    target, target_tok, draft, draft_tok = bigram_pair
    if broken:
        monkeypatch.setattr(SlrsDrafter, "_draw", mutant(SlrsDrafter._draw, *ONE_SPELLING))
    drafter = SlrsDrafter(draft, target_tok, draft_tok, len(TARGET_VOCAB), depth=3, min_mass=0)
    params = SamplingParams(temp=1.0)
    prompt = target_tok.encode("abcd")  # the draft's context ends in d: its first row
    draws, from_draft = engine_pairs(target, target_tok, prompt, drafter, params, 300, 100)
    p_value, tvd, impossible = goodness_of_fit(draws, pair_law(target, prompt, params))
    assert from_draft > 30
    if broken:
        assert p_value < 1e-3 or impossible > 0, f"p={p_value:.3f} tvd={tvd:.4f}"
    else:
        assert impossible == 0 and p_value > 1e-3, f"p={p_value:.2e} tvd={tvd:.4f}"
