"""Beam search over the ReDrafter head: brute force, determinism, distinct beams, drafter."""

from __future__ import annotations

from itertools import product

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_head import make_config, random_checkpoint, to_mx
from tiny_models import tiny_model

from mlx_redrafter.drafters.base import DraftContext, Drafter
from mlx_redrafter.drafters.beam_search import BeamSearcher, beam_search, sorted_top
from mlx_redrafter.drafters.redrafter import (
    ReDrafter,
    ReDrafterConfig,
    ReDrafterHead,
    head_from_weights,
)

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

D = 6


def make_head(
    vocab: int = 8,
    rnn: bool = True,
    draft_vocab: list[int] | None = None,
    seed: int = 0,
    scale: float = 1.0,
) -> ReDrafterHead:
    """A random head for a ``vocab``-token target with hidden size ``D``."""
    config = make_config(
        d=D,
        vocab=vocab,
        exit_dim=10,
        layers=2,
        rnn=rnn,
        draft_vocab_size=None if draft_vocab is None else len(draft_vocab),
    )
    weights = random_checkpoint(config, seed=seed, draft_vocab=draft_vocab)
    weights = {k: v * scale if v.dtype == np.float32 else v for k, v in weights.items()}
    return head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))


def make_embedding(vocab: int = 8, seed: int = 0) -> nn.Embedding:
    """A random target input embedding ``(vocab, D)``."""
    emb = nn.Embedding(vocab, D)
    emb.weight = mx.array(np.random.default_rng(seed).standard_normal((vocab, D)), mx.float32)
    return emb


def log_softmax64(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def brute_force(
    head: ReDrafterHead, emb: nn.Embedding, hidden: mx.array, root: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every draft sequence with its cumulative log-prob, best first (ties by index).

    Returns:
        ``(beams (N, L) target ids, scores (N,))`` with ``N = K ** (L - 1)``.
    """
    k = head.config.output_size
    seqs = np.array(list(product(range(k), repeat=length - 1)), dtype=np.int32)
    n = len(seqs)
    targets = np.array(head.to_target_ids(mx.array(seqs)))
    state = head.initial_state((n,))
    prev = mx.full((n,), root, dtype=mx.int32)
    score = np.zeros(n)
    for t in range(length - 1):
        state = head.rnn_step(state, emb(prev))
        lp = log_softmax64(np.array(head.logits(hidden[None], state)))
        score += lp[np.arange(n), seqs[:, t]]
        prev = mx.array(targets[:, t])
    order = np.lexsort((np.arange(n), -score))
    beams = np.concatenate([np.full((n, 1), root), targets], axis=1)
    return beams[order], score[order]


@pytest.mark.parametrize(
    ("rnn", "draft_vocab", "length", "seed"),
    [
        (True, None, 3, 0),
        (True, None, 3, 1),
        (False, None, 3, 2),
        (True, None, 4, 3),
        (True, [6, 1, 3, 0, 7], 3, 4),
        (False, [2, 5, 4, 7], 4, 5),
    ],
)
def test_beams_are_the_top_sequences(rnn: bool, draft_vocab, length: int, seed: int):
    width = 3
    head = make_head(rnn=rnn, draft_vocab=draft_vocab, seed=seed, scale=2.0)
    emb = make_embedding(seed=seed)
    hidden = mx.array(np.random.default_rng(seed).standard_normal(D), mx.float32)
    root = 5
    want_beams, want_scores = brute_force(head, emb, hidden, root, length)
    assert want_scores[width - 1] - want_scores[width] > 1e-4  # no tie at the cut-off
    result = BeamSearcher(head, emb)(hidden, mx.array(root), width, length)
    assert result.beams.dtype == mx.int32 and result.beams.shape == (width, length)
    assert result.valid is None
    np.testing.assert_array_equal(np.array(result.beams), want_beams[:width])
    np.testing.assert_allclose(np.array(result.scores), want_scores[:width], atol=1e-5)


def test_width_one_is_greedy():
    head, emb = make_head(vocab=12, seed=7), make_embedding(vocab=12, seed=7)
    hidden = mx.array(np.random.default_rng(7).standard_normal(D), mx.float32)
    beams = BeamSearcher(head, emb)(hidden, mx.array(3), 1, 5).beams
    state, token, greedy = head.initial_state((1,)), mx.array([3]), [3]
    for _ in range(4):
        state = head.rnn_step(state, emb(token))
        token = mx.argmax(head.logits(hidden[None], state), axis=-1)
        greedy.append(int(token.item()))
    assert beams.tolist() == [greedy]


def test_deterministic_and_compiled_equals_eager():
    head, emb = make_head(vocab=40, seed=8), make_embedding(vocab=40, seed=8)
    hidden = mx.array(np.random.default_rng(8).standard_normal(D), mx.float32)
    root = mx.array(11)
    first = BeamSearcher(head, emb)(hidden, root, 6, 5)
    again = BeamSearcher(head, emb)(hidden, root, 6, 5)
    eager = BeamSearcher(head, emb, compile=False)(hidden, root, 6, 5)
    for other in (again, eager):
        assert mx.array_equal(first.beams, other.beams).item()
        assert mx.allclose(first.scores, other.scores, atol=1e-6).item()


@pytest.mark.parametrize("seed", range(4))
def test_beams_are_distinct_and_sorted(seed: int):
    head = make_head(vocab=32, seed=seed, scale=4.0)  # peaky: many near-duplicate paths
    emb = make_embedding(vocab=32, seed=seed)
    hidden = mx.array(np.random.default_rng(seed).standard_normal(D), mx.float32)
    result = BeamSearcher(head, emb)(hidden, mx.array(0), 8, 5)
    rows = [tuple(r) for r in result.beams.tolist()]
    assert len(set(rows)) == 8
    assert all(r[0] == 0 for r in rows)
    scores = np.array(result.scores)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) <= 0)


def test_equal_scores_give_distinct_deterministic_beams():
    head = make_head(vocab=16, seed=9)
    head.lm_head[-1].weight = mx.zeros_like(head.lm_head[-1].weight)  # uniform draft
    emb = make_embedding(vocab=16)
    hidden = mx.zeros((D,))
    searcher = BeamSearcher(head, emb)
    first = searcher(hidden, mx.array(1), 5, 3).beams.tolist()
    assert len({tuple(r) for r in first}) == 5
    assert searcher(hidden, mx.array(1), 5, 3).beams.tolist() == first


def test_sorted_top_orders_by_score_then_index():
    scores = mx.array([0.5, 2.0, -mx.inf, 2.0, 1.0, 0.5, 3.0])
    assert sorted_top(scores, 4).tolist() == [6, 1, 3, 4]
    assert sorted_top(scores, 1).tolist() == [6]
    assert sorted_top(mx.array([-mx.inf, -mx.inf, 0.0]), 3).tolist() == [2, 0, 1]


def test_more_beams_than_draft_tokens_marks_duplicates_invalid():
    head = make_head(vocab=8, draft_vocab=[4, 2, 6], seed=10)
    emb = make_embedding(vocab=8)
    hidden = mx.array(np.random.default_rng(10).standard_normal(D), mx.float32)
    short = BeamSearcher(head, emb)(hidden, mx.array(1), 5, 2)  # only 3 one-token drafts
    valid = np.array(short.valid)
    assert valid[:, 0].all() and valid[:, 1].tolist() == [True, True, True, False, False]
    assert sorted(short.beams[:3, 1].tolist()) == [2, 4, 6]
    longer = BeamSearcher(head, emb)(hidden, mx.array(1), 5, 3)  # 9 two-token drafts
    assert np.array(longer.valid).all()
    assert len({tuple(r) for r in longer.beams.tolist()}) == 5


def test_logprobs_follow_each_beam_and_map_to_target_vocab():
    draft_vocab = [9, 0, 4, 7, 2]
    head = make_head(vocab=10, draft_vocab=draft_vocab, seed=11)
    emb = make_embedding(vocab=10, seed=11)
    hidden = mx.array(np.random.default_rng(11).standard_normal(D), mx.float32)
    result = BeamSearcher(head, emb)(hidden, mx.array(3), 3, 4, with_logprobs=True)
    assert result.logprobs.shape == (3, 3, 5)
    beams = np.array(result.beams)
    back = np.array(head.target_to_draft())
    for w in range(3):
        state = head.initial_state((1,))
        for t in range(3):
            state = head.rnn_step(state, emb(mx.array(beams[w, t : t + 1])))
            want = log_softmax64(np.array(head.logits(hidden[None], state)))[0]
            np.testing.assert_allclose(np.array(result.logprobs[w, t]), want, atol=1e-5)
        chosen = np.array(result.logprobs)[w, np.arange(3), back[beams[w, 1:]]]
        np.testing.assert_allclose(chosen.sum(), np.array(result.scores)[w], atol=1e-5)
    full = np.array(result.target_logprobs(10))
    assert full.shape == (3, 3, 10)
    off = [i for i in range(10) if i not in draft_vocab]
    assert np.isneginf(full[..., off]).all()
    np.testing.assert_array_equal(full[..., draft_vocab], np.array(result.logprobs))
    with pytest.raises(ValueError, match="with_logprobs"):
        BeamSearcher(head, emb)(hidden, mx.array(3), 3, 4).target_logprobs(10)


def test_one_compiled_function_per_shape_sees_weight_updates():
    head, emb = make_head(vocab=16, seed=12), make_embedding(vocab=16, seed=12)
    hidden = mx.array(np.random.default_rng(12).standard_normal(D), mx.float32)
    searcher = BeamSearcher(head, emb)
    assert searcher.function(4, 3) is searcher.function(4, 3)
    assert searcher.function(4, 3) is not searcher.function(4, 4)
    before = searcher(hidden, mx.array(2), 4, 3).beams
    last = head.lm_head[-1]
    last.weight = -last.weight  # reverses every ranking
    updated = searcher(hidden, mx.array(2), 4, 3).beams
    eager = BeamSearcher(head, emb, compile=False)(hidden, mx.array(2), 4, 3).beams
    assert mx.array_equal(updated, eager).item()
    assert not mx.array_equal(updated, before).item()
    with pytest.raises(ValueError, match="length >= 2"):
        searcher.function(4, 1)


def test_search_is_a_pure_graph():
    head, emb = make_head(seed=13), make_embedding(seed=13)
    graph = mx.compile(lambda h, r: beam_search(head, emb, h, r, 3, 4))
    beams, scores = graph(mx.ones((D,)), mx.array(1))  # would raise on a host sync
    assert beams.shape == (3, 4) and scores.shape == (3,)


@pytest.mark.parametrize("quantized", [False, True])
def test_redrafter_proposes_for_a_tiny_target(quantized: bool):
    model = tiny_model("llama")
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    config = ReDrafterConfig.from_dict(make_config(d=64, vocab=96, exit_dim=100, layers=2))
    mx.random.seed(0)
    drafter = ReDrafter.from_model(model, ReDrafterHead(config))
    assert isinstance(drafter, Drafter) and drafter.stochastic is False
    drafter.reset([1, 2, 3])
    context = DraftContext(
        hidden=mx.random.normal((64,)), root=mx.array(17), position=mx.array(3), tokens=[1, 2, 3]
    )
    draft = drafter.propose(context, 4, 5)
    assert draft.beams.shape == (4, 5) and draft.beams.dtype == mx.int32
    assert draft.draft_logprobs is None and draft.valid is None
    assert draft.beams[:, 0].tolist() == [17] * 4
    assert len({tuple(r) for r in draft.beams.tolist()}) == 4
    eager = BeamSearcher(drafter.head, model.model.embed_tokens, compile=False)
    assert mx.array_equal(draft.beams, eager(context.hidden, context.root, 4, 5).beams).item()
    drafter.accepted([5, 6])
