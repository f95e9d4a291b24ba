"""Training a ReDrafter head: alignment, vocabulary, features, learning, checkpoints, export."""

from __future__ import annotations

import ctypes
import json
from dataclasses import replace
from pathlib import Path

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from engine_walks import assert_engine_follows_walks
from mlx.utils import tree_flatten
from tiny_models import tiny_model

from convert.drafter import convert_drafter
from mlx_redrafter.drafters.redrafter import (
    ReDrafter,
    ReDrafterConfig,
    ReDrafterHead,
    find_input_embedding,
    load_drafter,
)
from mlx_redrafter.target import Target
from mlx_redrafter.train.evaluate import (
    decode_tokens_per_step,
    decode_walks,
    evaluate,
    leading_run,
)
from mlx_redrafter.train.features import (
    FeatureCache,
    HiddenExtractor,
    StreamingFeatures,
    extraction_groups,
)
from mlx_redrafter.train.fit import trainer_class
from mlx_redrafter.train.fit_data import epoch_batches
from mlx_redrafter.train.fit_options import STREAMED_SHUFFLE_POOL, FitOptions
from mlx_redrafter.train.objective import (
    PAD,
    build_position_table,
    depth_logits,
    draft_labels,
    sequence_positions,
)
from mlx_redrafter.train.score import score, teacher_forced
from mlx_redrafter.train.trainer import Trainer
from mlx_redrafter.train.vocab import (
    DraftVocab,
    build_draft_vocab,
    coverage_of,
    response_token_counts,
    size_for_coverage,
)

VOCAB = 96


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """Tiny matmuls on a shared machine: one OpenBLAS thread is much faster (restored after)."""
    path = mlx_redrafter.BLAS.path
    if path is None:
        yield
        return
    lib = ctypes.CDLL(path)
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(1)
    yield
    lib.openblas_set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """A frozen tiny llama (d = 64, V = 96)."""
    m = tiny_model("llama", seed=3)
    m.freeze()
    return m


def second_order_language(n: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Sequences of a deterministic language whose next token depends on the last *two*.

    Each of four cycles repeats a word of period 6 over 3 tokens, ``a b a c b c``: every token
    has two possible successors, and every pair of tokens exactly one. So depth 1
    (predicting ``x_{t+2}`` after ``g0 = x_{t+1}``) needs ``x_t``, which only ``h_t`` carries.
    """
    rng = np.random.default_rng(1234)
    alphabet = rng.permutation(np.arange(3, VOCAB))[:12].reshape(4, 3)
    shape = np.array([0, 1, 0, 2, 1, 2])
    words = [letters[shape] for letters in alphabet]
    draw = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = words[draw.integers(len(words))]
        length = int(draw.integers(28, 44))
        tokens = word[(draw.integers(6) + np.arange(length)) % 6].astype(np.int32)
        out.append((tokens, int(draw.integers(2, 8))))
    return out


def base_options(tmp_path: Path, **overrides) -> FitOptions:
    """Small, fast options for the tiny model."""
    defaults = dict(
        out=str(tmp_path / "head"),
        exit_dim=96,
        beam_length=4,
        batch_size=64,
        lr=3e-3,
        epochs=2,
        checkpoint_every=0,
        extract_tokens=512,
        shuffle_pool=2,
    )
    defaults.update(overrides)
    return FitOptions(**defaults)


# ----------------------------------------------------------------------------- alignment


def test_alignment_table_matches_hand_computed_answer():
    """T = 8, L = 4, r = 3 (the table in objective.py's docstring), x_j = 10 + j."""
    tokens = np.arange(10, 18, dtype=np.int32)
    positions, windows, in_loss = sequence_positions(tokens, response_start=3, length=4)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5]
    assert windows.tolist() == [
        [11, 12, 13, 14],
        [12, 13, 14, 15],
        [13, 14, 15, 16],
        [14, 15, 16, 17],
        [15, 16, 17, PAD],
        [16, 17, PAD, PAD],
    ]
    assert in_loss.astype(int).tolist() == [
        [0, 1, 1],
        [1, 1, 1],
        [1, 1, 1],
        [1, 1, 1],
        [1, 1, 0],
        [1, 0, 0],
    ]
    table = build_position_table([(tokens, 3)], length=4)
    assert table.at_inference.tolist() == [False, False, True, True, True, True]
    # A long prompt: only positions within L of the response are kept.
    table = build_position_table([(np.arange(20, 40, dtype=np.int32), 12)], length=4)
    assert table.position.tolist() == list(range(8, 18))


def test_vectorised_depths_equal_one_step_at_a_time_recurrence(model):
    """depth_logits over all (t, k) equals the engine's step-by-step use of the head."""
    mx.random.seed(0)
    head = ReDrafterHead(ReDrafterConfig(VOCAB, 64, 80, 2))
    embed = find_input_embedding(model)
    tokens = np.array([5, 9, 14, 3, 7, 22, 8, 31, 4], dtype=np.int32)
    table = build_position_table([(tokens, 3)], length=4)
    hidden = Target(model).forward(mx.array(tokens), Target(model).make_cache())[1]
    h = hidden[mx.array(table.position)]
    fed = embed(mx.array(np.where(table.windows[:, :-1] == PAD, 0, table.windows[:, :-1])))
    got = np.array(depth_logits(head, h, fed))
    for row, t in enumerate(table.position):
        state = head.initial_state()
        for k in range(1, 4):
            if t + k >= tokens.size:
                break
            state = head.rnn_step(state, embed(mx.array(tokens[t + k])))
            want = np.array(head.logits(hidden[int(t)], state))
            np.testing.assert_allclose(got[row, k - 1], want, rtol=1e-5, atol=1e-5)


def test_labels_mask_out_of_vocabulary_or_use_the_slot():
    windows = np.array([[3, 4, 5, PAD], [4, 5, 6, 7]], dtype=np.int32)
    in_loss = np.array([[True, True, False], [True, True, True]])
    counts = np.zeros(10, np.int64)
    counts[[4, 5, 6, 7]] = [9, 8, 7, 1]
    masked = build_draft_vocab(counts, size=3, oov="mask")  # ids 4, 5, 6
    labels, mask = draft_labels(windows, in_loss, masked.target_to_draft())
    assert mask.tolist() == [[True, True, False], [True, True, False]]
    assert labels.tolist() == [[0, 1, 0], [1, 2, 0]]
    slot = build_draft_vocab(counts, size=3, oov="slot")  # 4, 5 + slot (stored as 6)
    labels, mask = draft_labels(windows, in_loss, slot.target_to_draft())
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert labels.tolist() == [[0, 1, 0], [1, 2, 2]]


def test_leading_run_counts_only_the_prefix():
    correct = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)
    assert leading_run(correct).tolist() == [2, 0, 4]


def test_decoding_walk_emits_every_response_token():
    """T = 10, r = 3, L = 4: calls at t = 2 (accepts 3), t = 6 (accepts 1), t = 8 (last)."""
    table = build_position_table([(np.arange(10, dtype=np.int32), 3)], length=4)
    rows = np.flatnonzero(table.at_inference)
    assert table.position[rows].tolist() == [2, 3, 4, 5, 6, 7]
    accepted = np.zeros(table.size, dtype=np.int64)
    accepted[rows] = [3, 0, 2, 2, 1, 1]
    # 4 + 2 + 1 = 7 tokens (x_3 .. x_9, the whole response) in 3 calls.
    assert decode_tokens_per_step(table, accepted) == pytest.approx(7 / 3)
    assert decode_tokens_per_step(table, np.zeros(table.size, np.int64)) == 1.0


# ----------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("share", [0.5, 0.9, 0.99, 1.0])
def test_coverage_vocabulary_covers_the_requested_share(share):
    rng = np.random.default_rng(0)
    sequences = [
        (np.minimum(rng.zipf(1.3, size=60), 500).astype(np.int32), int(rng.integers(0, 20)))
        for _ in range(50)
    ]
    counts = response_token_counts(sequences, 512)
    vocab = build_draft_vocab(counts, coverage=share)
    assert coverage_of(vocab.ids, counts) >= share
    # Minimal: one token fewer misses the share.
    assert coverage_of(vocab.ids[:-1], counts) < share
    assert vocab.size == size_for_coverage(counts, share)
    # Counted tokens are response tokens only.
    response = np.concatenate([t[s:] for t, s in sequences])
    assert counts.sum() == response.size
    slot = build_draft_vocab(counts, coverage=share, oov="slot")
    assert slot.size == min(512, vocab.size + 1)
    assert np.array_equal(slot.ids[: vocab.size], vocab.ids)


# ------------------------------------------------------------------------------- features


def test_batched_features_equal_target_forward_and_cache_equals_streaming(model, tmp_path):
    data = second_order_language(10, seed=5)
    tokens = [t for t, _ in data]
    extractor = HiddenExtractor(model)
    assert extractor.backbone is not None  # the batched (split) path is the one tested
    target = Target(model)
    for seq, h in zip(tokens[:4], extractor(tokens[:4]), strict=True):
        want = target.forward(mx.array(seq), target.make_cache())[1]
        np.testing.assert_allclose(h, np.array(want), rtol=1e-4, atol=1e-4)
    table = build_position_table(data, length=4)
    groups = extraction_groups([len(t) for t in tokens], max_tokens=128)
    assert len(groups) > 1
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(tokens)))
    cache = FeatureCache(tmp_path / "f", extractor, tokens, table, groups, progress=False)
    assert cache.built
    streaming = StreamingFeatures(extractor, tokens, table, groups, keep=1)
    rows = np.random.default_rng(0).permutation(table.size)[:50]
    assert np.array_equal(np.array(cache.rows(rows)), np.array(streaming.rows(rows)))
    reopened = FeatureCache(tmp_path / "f", extractor, tokens, table, groups, progress=False)
    assert not reopened.built
    row = int(table.sequence.searchsorted(2))
    want = target.forward(mx.array(tokens[2]), target.make_cache())[1][int(table.position[row])]
    np.testing.assert_allclose(np.array(reopened.rows(np.array([row])))[0], want, atol=2e-2)


class CountingExtractor(HiddenExtractor):
    """A :class:`HiddenExtractor` that counts the tokens it runs."""

    tokens = 0

    def __call__(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        self.tokens += sum(len(s) for s in sequences)
        return super().__call__(sequences)


def test_feature_cache_grows_by_the_new_sequences_only(model, tmp_path):
    data = second_order_language(16, seed=8)
    tokens = [t for t, _ in data]
    extractor = CountingExtractor(model)
    first = data[:10]
    table = build_position_table(first, length=4)
    groups = extraction_groups([len(t) for t in tokens[:10]], max_tokens=128)
    FeatureCache(tmp_path / "f", extractor, tokens[:10], table, groups, progress=False)
    # An interrupted chunk (data without its keys file) is ignored.
    np.save(tmp_path / "f" / "chunk-00099.npy", np.zeros((3, 64), np.float16))
    extractor.tokens = 0
    table = build_position_table(data, length=4)
    groups = extraction_groups([len(t) for t in tokens], max_tokens=128)
    grown = FeatureCache(tmp_path / "f", extractor, tokens, table, groups, progress=False)
    probe = 16 + 1  # the target fingerprint's probe and the one-token width check
    assert grown.built
    assert extractor.tokens - probe == sum(len(t) for t in tokens[10:])
    streaming = StreamingFeatures(extractor, tokens, table, groups, keep=1)
    rows = np.arange(table.size)
    np.testing.assert_allclose(
        np.array(grown.rows(rows)), np.array(streaming.rows(rows)), atol=2e-3
    )
    extractor.tokens = 0
    again = FeatureCache(tmp_path / "f", extractor, tokens, table, groups, progress=False)
    assert not again.built and extractor.tokens == probe


def test_epoch_batches_cover_every_row_once():
    groups = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 13)]
    batches = epoch_batches(groups, batch_size=4, pool=2, seed=0, epoch=1)
    assert batches.shape == (4, 4)
    real = batches[batches >= 0]
    assert sorted(real.tolist()) == list(range(13))
    assert np.array_equal(batches, epoch_batches(groups, 4, 2, 0, 1))
    assert not np.array_equal(batches, epoch_batches(groups, 4, 2, 0, 2))


def _groups_per_batch(batches: np.ndarray, group_of: np.ndarray) -> list[int]:
    return [len(set(group_of[b[b >= 0]].tolist())) for b in batches]


def test_whole_set_pool_mixes_every_batch_and_windows_do_not():
    """Pool = all groups: each batch draws from many groups; windows of 2 (20 rows): a
    batch of 32 spans at most three windows, 6 groups."""
    groups = [np.arange(10 * g, 10 * g + 10) for g in range(40)]
    group_of = np.repeat(np.arange(40), 10)
    iid = epoch_batches(groups, batch_size=32, pool=len(groups), seed=0, epoch=0)
    windowed = epoch_batches(groups, batch_size=32, pool=2, seed=0, epoch=0)
    assert sorted(iid[iid >= 0].tolist()) == list(range(400))
    assert min(_groups_per_batch(iid[:-1], group_of)) >= 12
    assert max(_groups_per_batch(windowed, group_of)) <= 6


def test_shuffle_pool_zero_is_the_whole_set_when_stored_and_a_window_when_streamed(model, tmp_path):
    data = second_order_language(40, seed=3)
    small = dict(shuffle_pool=0, extract_tokens=64)
    stored = base_options(tmp_path / "a", feature_cache=str(tmp_path / "c"), **small)
    streamed = base_options(tmp_path / "b", **small)
    stored_trainer = Trainer(model, data, [], stored, progress=False)
    assert len(stored_trainer.data.train_groups) > STREAMED_SHUFFLE_POOL
    assert stored_trainer.shuffle_pool == len(stored_trainer.data.train_groups)
    assert Trainer(model, data, [], streamed, progress=False).shuffle_pool == 8
    explicit = replace(stored, shuffle_pool=3)
    assert Trainer(model, data, [], explicit, progress=False).shuffle_pool == 3
    with pytest.raises(ValueError, match="--shuffle-pool"):
        replace(stored, shuffle_pool=-1).check()


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """A head trained on the second-order language (full vocabulary)."""
    tmp = tmp_path_factory.mktemp("fit")
    data = second_order_language(80)
    options = base_options(tmp, epochs=6)
    trainer = Trainer(model, data[:64], data[64:], options, progress=False)
    result = trainer.fit()
    trainer.write_outputs(result)
    return trainer, result


def test_training_learns_the_language(trained):
    trainer, result = trained
    assert result.finished
    assert trainer.state.step == trainer.total_steps >= 200
    history = [e["loss"] for e in trainer.state.history]
    assert np.mean(history[-10:]) < 0.1 * np.mean(history[:5])
    final = result.final_eval
    assert final.topk[0, 0] >= 0.9, final.summary()
    assert final.topk[1, 0] >= 0.8, final.summary()
    assert final.tokens_per_step[1] > 3.0
    assert 3.0 < final.decode_tokens_per_step[1] <= 4.0
    assert np.all(np.diff(final.topk, axis=1) >= 0)  # top-m accuracy grows with m
    assert len(trainer.state.evals) == trainer.options.epochs


def test_h_matters_for_the_second_order_language(model, trained):
    """With a zeroed h_t, depth 1 cannot know x_t: accuracy drops well below the trained one."""
    trainer, result = trained
    zero = np.zeros_like(trainer.heldout_features)
    blind = evaluate(trainer.head, trainer.embedding, trainer.data.heldout_table, zero, None)
    assert blind.topk[0, 0] < result.final_eval.topk[0, 0] - 0.2


def greedy_responses(target: Target, count: int, length: int) -> list[tuple[np.ndarray, int]]:
    """The target's own greedy continuations of random prompts (self-distilled data)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        prompt = rng.integers(1, VOCAB, size=int(rng.integers(4, 9))).astype(np.int32)
        cache = target.make_cache()
        logits, _ = target.forward(mx.array(prompt), cache)
        response = []
        for _ in range(length):
            response.append(int(mx.argmax(logits[-1]).item()))
            logits, _ = target.forward(mx.array(response[-1:]), cache)
        out.append((np.concatenate([prompt, np.array(response, np.int32)]), prompt.size))
    return out


def test_simulated_decoding_matches_the_engine_step_for_step(tmp_path):
    """Self-distil a tiny target, train a head, then decode the held-out prompts with the
    engine (greedy, W = 1, L = 4): its accepted count at every step is the simulated one."""
    model = tiny_model("llama", seed=7)
    model.freeze()
    target = Target(model)
    data = greedy_responses(target, 56, 24)
    options = base_options(tmp_path, epochs=4, feature_dtype="float32")
    trainer = Trainer(model, data[:48], data[48:], options, progress=False)
    trainer.fit()
    table = trainer.data.heldout_table
    accepted = np.zeros(table.size, dtype=np.int64)
    accepted[:] = leading_run((top1_ids(trainer, table) == table.windows[:, 1:]) & table.in_loss)
    walks = decode_walks(table, accepted)
    assert_engine_follows_walks(
        target, ReDrafter.from_model(model, trainer.head), data[48:], walks, 4
    )
    assert sum(map(sum, walks)) >= 10  # the head does get drafts accepted


def top1_ids(trainer: Trainer, table) -> np.ndarray:
    """``(N, L-1)`` the head's top-1 target id at every held-out position and depth."""
    fed = trainer.embedding(mx.array(np.maximum(table.windows[:, :-1], 0)))
    logits = depth_logits(trainer.head, mx.array(trainer.heldout_features), fed)
    return np.array(trainer.head.to_target_ids(mx.argmax(logits, axis=-1)))


def assert_groups_match_rescoring(model, head, length: int) -> None:
    """``train evaluate``'s category rows read the per-row outcomes of one run: a group of
    sequences scores exactly what scoring those sequences alone gives (and is not trivial)."""
    rng = np.random.default_rng(31)
    sequences = []
    for tokens, start in second_order_language(12, seed=31):  # a quarter of the tokens noise
        noisy = np.where(
            rng.random(tokens.size) < 0.25, rng.integers(3, VOCAB, tokens.size), tokens
        )
        sequences.append((noisy.astype(tokens.dtype), start))
    embedding = find_input_embedding(model)
    table, features = teacher_forced(model, sequences, length)
    scoring = score(head, embedding, sequences, table, features, (2,), lookup_beams=1)
    picked = np.array([1, 4, 5, 9])
    part = [sequences[i] for i in picked]
    part_table, part_features = teacher_forced(model, part, length)
    alone = score(head, embedding, part, part_table, part_features, (2,), lookup_beams=1)
    got, want = scoring.group("g", picked).to_dict(), alone.group("g").to_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict):
            assert got[key].keys() == value.keys(), key
            got[key], value = list(got[key].values()), list(value.values())
        if isinstance(value, str):
            assert got[key] == value
        else:
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert want["decode_tokens_per_step"]["1"] > 1.5 and want["sequences"] == 4
    other = scoring.group("h", np.array([0, 2, 3])).to_dict()
    assert other["response_tokens"] != want["response_tokens"] or other != want


def test_category_groups_equal_scoring_their_sequences_alone(model, trained):
    trainer, _ = trained
    assert_groups_match_rescoring(model, trainer.head, trainer.options.beam_length)


def test_written_head_loads_and_round_trips_apple_format(model, trained, tmp_path):
    trainer, _ = trained
    out = Path(trainer.options.out)
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == trainer.state.step
    head = load_drafter(out, model=model)
    want = dict(tree_flatten(trainer.head.parameters()))
    got = dict(tree_flatten(head.parameters()))
    assert want.keys() == got.keys()
    assert all(mx.array_equal(want[k], got[k]).item() for k in want)
    apple = convert_drafter(out, tmp_path / "apple", to="apple")
    back = convert_drafter(apple, tmp_path / "back", to="mlx")
    original = mx.load(str(out / "model.safetensors"))
    returned = mx.load(str(back / "model.safetensors"))
    assert original.keys() == returned.keys()
    for key in original:
        assert original[key].dtype == returned[key].dtype
        assert np.array(original[key]).tobytes() == np.array(returned[key]).tobytes(), key
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text()
    )


def test_reduced_vocabulary_head_trains_and_round_trips(model, tmp_path):
    data = second_order_language(40, seed=9)
    options = base_options(tmp_path, epochs=1, draft_coverage=0.9, oov="slot")
    trainer = Trainer(model, data[:32], data[32:], options, progress=False)
    result = trainer.fit()
    trainer.write_outputs(result)
    counts = response_token_counts(((t, s) for t, s in data[:32]), VOCAB)
    assert trainer.coverage >= 0.9
    head = load_drafter(options.out, model=model)
    assert head.config.draft_vocab_size == trainer.vocab.size < VOCAB
    assert np.array_equal(np.array(head.draft_vocab), trainer.vocab.ids)
    assert coverage_of(trainer.vocab.ids[:-1], counts) >= 0.9
    back = convert_drafter(options.out, tmp_path / "again", to="mlx")
    for key, value in mx.load(str(Path(options.out) / "model.safetensors")).items():
        assert mx.array_equal(value, mx.load(str(back / "model.safetensors"))[key]).item()
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        convert_drafter(options.out, tmp_path / "apple", to="apple")


def test_resume_continues_the_same_loss_curve(model, tmp_path):
    data = second_order_language(40, seed=11)
    train, heldout = data[:32], data[32:]
    full_opts = base_options(tmp_path / "a", epochs=2, checkpoint_every=5, grad_accum=2)
    full = Trainer(model, train, heldout, full_opts, progress=False).fit()
    total = full.state.step
    assert total >= 12
    stop = 10
    part_opts = replace(full_opts, out=str(tmp_path / "b"))
    part = Trainer(model, train, heldout, part_opts, progress=False)
    stopped = part.fit(stop_at_step=stop)
    assert not stopped.finished and part.state.step == stop
    saved = mx.load(str(tmp_path / "b" / "checkpoint" / "optimizer.safetensors"))
    resumed = Trainer(model, train, heldout, replace(part_opts, resume=True), progress=False)
    assert resumed.state.step == stop
    restored = dict(tree_flatten(resumed.optimizer.state))
    assert restored["step"].item() == stop
    assert all(mx.array_equal(restored[k], v).item() for k, v in saved.items())
    assert any(float(mx.abs(v).max().item()) > 0 for k, v in saved.items() if k.endswith(".v"))
    result = resumed.fit()
    assert result.finished and resumed.state.step == total
    want = [e["loss"] for e in full.state.history]
    got = [e["loss"] for e in result.state.history]
    assert len(got) == len(want) == total
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [e["lr"] for e in result.state.history] == pytest.approx(
        [e["lr"] for e in full.state.history]
    )
    for (k, a), (_, b) in zip(
        tree_flatten(full.head.parameters()), tree_flatten(result.head.parameters()), strict=True
    ):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=k)


def test_init_head_fine_tunes_the_saved_head(model, trained, tmp_path):
    """``--init-head``: the saved weights are the start (already accurate, unlike a fresh
    head), the architecture options come from the head, and training goes on from there."""
    old, _ = trained
    data = second_order_language(40, seed=21)
    options = base_options(tmp_path, epochs=1, exit_dim=None, init_head=old.options.out)
    trainer = Trainer(model, data[:32], data[32:], options, progress=False)
    assert trainer.options.exit_dim == old.head.config.exit_dim == 96
    saved = load_drafter(old.options.out, model=model, dtype=mx.float32)
    for (k, a), (_, b) in zip(
        tree_flatten(trainer.head.parameters()), tree_flatten(saved.parameters()), strict=True
    ):
        assert mx.array_equal(a, b).item(), k
    trainer.fit(stop_at_step=0)
    start = trainer.evaluate()
    fresh = Trainer(model, data[:32], data[32:], replace(options, init_head=None, exit_dim=96))
    fresh.fit(stop_at_step=0)
    assert start.topk[0, 0] >= 0.9 > fresh.evaluate().topk[0, 0] + 0.3
    result = trainer.fit()
    assert result.finished and result.final_eval.topk[0, 0] >= 0.9


def test_init_head_keeps_its_draft_vocabulary_and_refuses_contradictions(model, tmp_path):
    first = second_order_language(24, seed=5)
    options = base_options(tmp_path / "a", epochs=1, draft_vocab=20)
    old = Trainer(model, first, [], options, progress=False)
    old.write_outputs(old.fit())
    other = second_order_language(24, seed=6)
    init = base_options(tmp_path / "b", epochs=1, init_head=options.out)
    trainer = Trainer(model, other, [], init, progress=False)
    assert np.array_equal(trainer.vocab.ids, old.vocab.ids)
    counts = response_token_counts(((t, s) for t, s in other), VOCAB)
    assert trainer.coverage == pytest.approx(coverage_of(old.vocab.ids, counts))
    with pytest.raises(ValueError, match="num-draft-layers 2, but --num-draft-layers 3"):
        Trainer(model, other, [], replace(init, num_draft_layers=3), progress=False)
    with pytest.raises(ValueError, match="fixes the draft vocabulary"):
        Trainer(model, other, [], replace(init, draft_vocab=20), progress=False)
    with pytest.raises(ValueError, match="not a head directory"):
        Trainer(model, other, [], replace(init, init_head=str(tmp_path / "none")))
    parallel = replace(init, head="parallel", k=3, exit_dim=None)
    with pytest.raises(ValueError, match="--init-head .* must be 'parallel_spec_drafter'"):
        trainer_class(parallel)(model, other, [], parallel, progress=False)


def test_resume_refuses_changed_options(model, tmp_path):
    data = second_order_language(12, seed=2)
    options = base_options(tmp_path, epochs=1, checkpoint_every=1)
    Trainer(model, data, [], options, progress=False).fit(stop_at_step=1)
    with pytest.raises(ValueError, match="lr"):
        Trainer(model, data, [], replace(options, resume=True, lr=1.0), progress=False)


def test_cached_and_streamed_features_train_identically(model, tmp_path):
    """The same loss curve from cached and streamed features.

    Equal up to float32 rounding, not bit for bit: OpenBLAS on some CPUs (seen on AMD Zen)
    rounds the same product differently depending on its buffers' alignment, so two runs
    of the same forward can differ in the last bits. Wrong rows would differ by far more.
    """
    data = second_order_language(24, seed=4)
    losses = []
    for cache in (None, str(tmp_path / "cache")):
        options = base_options(tmp_path / str(cache is None), epochs=1, feature_cache=cache)
        result = Trainer(model, data, [], options, progress=False).fit()
        losses.append([e["loss"] for e in result.state.history])
    assert len(losses[0]) == len(losses[1]) > 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ------------------------------------------------------------------------------------ CLI


def parse_fit(argv: list[str]):
    """Parse ``fit`` arguments with the sub-command's own parser."""
    import argparse

    from mlx_redrafter.train import fit

    parser = argparse.ArgumentParser()
    fit.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fit", *argv])
    assert args.handler is fit.run
    return args


def test_cli_options_and_feature_cache_default(tmp_path):
    from mlx_redrafter.train.fit import options_from_args

    args = parse_fit(["--data", "d", "--out", str(tmp_path), "--no-rnn", "--draft-vocab", "512"])
    options = options_from_args(args)
    assert (options.rnn, options.draft_vocab, options.epochs) == (False, 512, 1)
    assert options.feature_cache is None  # one epoch: nothing to reuse
    options = options_from_args(parse_fit(["--data", "d", "--out", "o", "--epochs", "3"]))
    assert options.feature_cache == str(Path("o") / "features")
    args = parse_fit(["--data", "d", "--out", "o", "--epochs", "3", "--no-feature-cache"])
    assert options_from_args(args).feature_cache is None
    args = parse_fit(["--data", "d", "--out", "o", "--eval-beams", "2,4", "--draft-coverage", ".9"])
    options = options_from_args(args)
    assert (options.eval_beams, options.draft_coverage) == ([2, 4], 0.9)
    with pytest.raises(SystemExit):
        parse_fit(["--data", "d", "--out", "o", "--draft-vocab", "5", "--draft-coverage", ".9"])
    with pytest.raises(ValueError, match="beam-length"):
        replace(options, beam_length=1).check()
    args = parse_fit(["--data", "d", "--out", "o", "--init-head", "h"])
    assert options_from_args(args).init_head == "h"


def write_distilled(path: Path, sequences: list[tuple[np.ndarray, int]]) -> Path:
    """A ``distill`` data directory holding ``sequences`` (one sample per prompt)."""
    from mlx_redrafter.train.data import Sequence, ShardWriter

    writer = ShardWriter(path, shard_size=16)
    for i, (tokens, start) in enumerate(sequences):
        writer.add(Sequence(tokens, start, prompt_index=i, sample_index=0, finish_reason="length"))
    writer.flush()
    return path


def test_cli_fit_trains_and_writes_a_loadable_head(tiny_model_dir, tmp_path, capsys):
    from mlx_redrafter.train.__main__ import main

    data = write_distilled(tmp_path / "data", second_order_language(48, seed=3))
    out = tmp_path / "head"
    argv = ["fit", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
    argv += ["--epochs", "2", "--batch-size", "64", "--beam-length", "4", "--exit-dim", "64"]
    argv += ["--draft-vocab", "20", "--heldout-fraction", "0.25", "--checkpoint-every", "3"]
    argv += ["--quiet"]
    assert main(argv) == 0
    assert "wrote head to" in capsys.readouterr().out
    report = json.loads((out / "training.json").read_text())
    assert report["data"]["heldout_sequences"] > 0
    assert report["data"]["train_sequences"] + report["data"]["heldout_sequences"] == 48
    assert report["draft_vocab"]["size"] == 20
    assert (out / "features" / "train" / "chunk-00000.keys.json").is_file()  # 2 epochs: cached
    assert (out / "checkpoint" / "state.json").is_file()
    head = load_drafter(out)
    assert head.config.draft_vocab_size == 20 and head.config.exit_dim == 64
    assert main([*argv[:3], "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_evaluate_scores_every_sequence_and_each_category(tiny_model_dir, tmp_path, capsys):
    from mlx_redrafter.models import load
    from mlx_redrafter.train.__main__ import main
    from mlx_redrafter.train.data import write_meta

    sequences = second_order_language(24, seed=5)
    data = write_distilled(tmp_path / "data", sequences)
    prompts = tmp_path / "prompts.jsonl"
    cats = ["writing" if i % 3 else "math" for i in range(len(sequences))]
    prompts.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "category": c}) + "\n" for i, c in enumerate(cats))
    )
    write_meta(data, {"prompts": str(prompts), "model": str(tiny_model_dir)})
    head = tmp_path / "head"
    fit = ["fit", "--data", str(data), "--out", str(head), "--epochs", "1", "--batch-size", "64"]
    fit += ["--beam-length", "4", "--exit-dim", "64", "--draft-vocab", "12", "--quiet"]
    assert main(fit) == 0
    capsys.readouterr()
    report = tmp_path / "scores.json"
    argv = ["evaluate", "--head", str(head), "--data", str(data), "--beam-length", "4"]
    argv += ["--temp", "1.0"]
    assert main([*argv, "--beam-widths", "1,2", "--lookup-beams", "1", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "| math |" in out and "W2 + lookup 1" in out and "sampled chain T=1" in out
    rows = {r["name"]: r for r in json.loads(report.read_text())}
    assert all(1.0 <= r["sampled_chain_tokens_per_step"] <= 4.0 for r in rows.values())
    # with lookup beams too, the categories' decoding walks add up to the total's
    for key in ("decode_tokens_per_step_with_lookup", "decode_tokens_per_step_lookup_only"):
        steps = {
            k: r["response_tokens"] / (r[key]["2"] if isinstance(r[key], dict) else r[key])
            for k, r in rows.items()
        }
        assert steps["math"] + steps["writing"] == pytest.approx(steps["all"], rel=1e-6)
    assert set(rows) == {"all", "math", "writing"}
    assert rows["math"]["sequences"] == cats.count("math") and rows["all"]["sequences"] == 24
    # categories partition the decoding walks: their tokens and steps add up to the total
    for w in ("1", "2"):
        steps = {k: r["response_tokens"] / r["decode_tokens_per_step"][w] for k, r in rows.items()}
        assert steps["math"] + steps["writing"] == pytest.approx(steps["all"], rel=1e-6)
    vocab = np.array(load_drafter(head).draft_vocab)
    responses = np.concatenate([t[s:] for t, s in sequences])
    assert rows["all"]["coverage"] == pytest.approx(np.isin(responses, vocab).mean())
    # the loss is over the head's draft vocabulary (out-of-vocabulary targets left out)
    model, _ = load(str(tiny_model_dir))
    table, features = teacher_forced(model, sequences, 4)
    labels = DraftVocab(vocab, "mask", VOCAB).target_to_draft()
    want = evaluate(load_drafter(head), find_input_embedding(model), table, features, labels)
    assert rows["all"]["loss"] == pytest.approx(want.loss, rel=1e-4)
    assert main([*argv[:3], "--data", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- soft targets


def teacher_check(trainer: Trainer, offset: int) -> float:
    """Largest gap between the trainer's teacher distributions and the target's own.

    ``offset`` shifts the row read for depth ``k`` (0 = the trainer's rule, ``row + k``).
    """
    trainer._setup_features()
    table = trainer.data.train_table
    rows = np.arange(min(64, table.size))
    mask = np.ones((rows.size, table.length - 1), bool)
    teacher_hidden, soft_mask, projection = trainer._teacher_inputs(rows + offset, mask)
    got = mx.softmax(teacher_hidden @ projection, axis=-1)
    gap = 0.0
    ids = mx.array(trainer.vocab.ids, dtype=mx.int32)
    for i, row in enumerate(rows.tolist()):
        seq, t = int(table.sequence[row]), int(table.position[row])
        tokens = trainer.data.train_tokens[seq]
        logits = trainer.extractor.model(mx.array(tokens)[None])[0].astype(mx.float32)
        for k in range(1, table.length):
            if not soft_mask[i, k - 1].item():
                continue
            want = mx.softmax(mx.take(logits[t + k], ids), axis=-1)
            gap = max(gap, mx.abs(got[i, k - 1] - want).max().item())
    return gap


def test_soft_targets_are_the_targets_own_distribution_at_t_plus_k(model, tmp_path):
    data = second_order_language(6, seed=5)
    options = base_options(tmp_path, draft_vocab=40, soft_targets=0.5, feature_dtype="float32")
    trainer = Trainer(model, data, [], options, progress=False)
    assert teacher_check(trainer, 0) < 1e-4
    # Reading row t + k - 1 (the distribution of the *fed* token) is caught.
    assert teacher_check(trainer, -1) > 1e-2


def test_soft_loss_with_one_hot_teacher_equals_hard_loss(model):
    from mlx_redrafter.train.objective import loss_sums, soft_loss_sums

    head = ReDrafterHead(
        ReDrafterConfig(vocab_size=VOCAB, hidden_size=64, exit_dim=96, num_draft_layers=1)
    )
    n, depths = 5, 3
    hidden = mx.random.normal((n, 64), key=mx.random.key(0))
    fed = mx.random.normal((n, depths, 64), key=mx.random.key(1))
    labels = mx.random.randint(0, VOCAB, (n, depths), key=mx.random.key(2))
    mask = mx.array(np.random.default_rng(0).random((n, depths)) < 0.7)
    # A teacher whose distribution is (numerically) one-hot on the label.
    projection = mx.eye(VOCAB) * 200.0
    teacher_hidden = mx.eye(VOCAB)[labels]
    soft_mask = mx.ones((n, depths), dtype=mx.bool_)
    hard_total, hard_depth = loss_sums(head, hidden, fed, labels, mask)
    for weight in (0.0, 0.5, 1.0):
        total, per_depth = soft_loss_sums(
            head, hidden, fed, labels, mask, teacher_hidden, soft_mask, projection, weight
        )
        assert abs(total.item() - hard_total.item()) < 1e-3 * max(1.0, hard_total.item())
        assert mx.allclose(per_depth, hard_depth).item()
    # A uniform teacher moves the loss at weight 1.
    flat, _ = soft_loss_sums(
        head, hidden, fed, labels, mask, teacher_hidden, soft_mask, projection * 0, 1.0
    )
    assert abs(flat.item() - hard_total.item()) > 1e-2


def test_soft_targets_refuse_a_catch_all_slot(model, tmp_path):
    data = second_order_language(4, seed=7)
    options = base_options(tmp_path, draft_vocab=40, oov="slot", soft_targets=0.5)
    with pytest.raises(ValueError, match="soft-targets"):
        Trainer(model, data, [], options, progress=False)
