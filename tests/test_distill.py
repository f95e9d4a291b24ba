"""Self-distillation pipeline: batched generator, fast kernels, data format, resume, CLI."""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: fast BLAS)

# isort: split
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_causal_mask
from mlx_lm.tokenizer_utils import TokenizerWrapper
from scipy import stats
from tiny_models import byte_tokenizer, save_tiny_model_dir, tiny_model

from mlx_redrafter import fast_math
from mlx_redrafter.train import fast_ops
from mlx_redrafter.train.__main__ import build_parser, main
from mlx_redrafter.train.batch_generate import ModelParts, Request, SlotGenerator
from mlx_redrafter.train.data import (
    DistillDataset,
    Sequence,
    ShardWriter,
    completed_keys,
    heldout_mask,
    read_meta,
    read_shard,
    shard_paths,
)
from mlx_redrafter.train.distill import DistillConfig, build_requests, common_prefix, distill

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 24
PROMPT_LENGTHS = (5, 17, 1, 40, 9, 23, 3, 31)


def _prompts(seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(3, 96, size=n)) for n in PROMPT_LENGTHS]


def _reference(model, tokenizer, prompt: tuple[int, ...], max_new: int) -> list[int]:
    """Unbatched greedy ids from mlx-lm's own ``stream_generate`` (EOS included)."""
    return [r.token for r in stream_generate(model, tokenizer, list(prompt), max_tokens=max_new)]


def _pick_eos(model, tokenizer, prompts) -> set[int]:
    """EOS ids that end some references early while others run to ``MAX_NEW``."""
    tokenizer.eos_token_ids = {95}
    free = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    early = [f[3] for f in free[:3]]
    return {t for t in early if all(t not in f for f in free[3:6])} or {early[0]}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize(("batch_size", "streams"), [(1, 1), (3, 1), (8, 1), (3, 2), (8, 2)])
def test_greedy_rows_equal_unbatched_mlx_lm(arch: str, batch_size: int, streams: int) -> None:
    model = tiny_model(arch, scale=3.0)
    tokenizer = TokenizerWrapper(byte_tokenizer())
    prompts = _prompts()
    eos = _pick_eos(model, tokenizer, prompts)
    tokenizer.eos_token_ids = eos
    want = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    assert any(len(w) < MAX_NEW and w[-1] in eos for w in want), "no row ends early"
    assert any(len(w) == MAX_NEW for w in want), "no row reaches max_new_tokens"

    gen = SlotGenerator(
        model, eos, batch_size=batch_size, max_new_tokens=MAX_NEW, prefill_chunk=16, streams=streams
    )
    assert gen.fast_kernels
    got = {c.key: c for c in gen.generate(Request(i, p) for i, p in enumerate(prompts))}

    assert sorted(got) == list(range(len(prompts)))
    for i, w in enumerate(want):
        assert got[i].response.tolist() == w, f"prompt {i} (length {len(prompts[i])})"
        assert got[i].prompt.tolist() == list(prompts[i])
        assert got[i].finish_reason == ("eos" if w[-1] in eos else "length")
    assert gen.stats.generated_tokens == sum(len(w) for w in want)
    assert gen.stats.prefills >= -(-len(prompts) // gen.prefill_rows)


def test_finished_slots_are_dropped_once_the_queue_is_empty() -> None:
    model = tiny_model("llama", scale=3.0)
    tokenizer = TokenizerWrapper(byte_tokenizer())
    prompts = _prompts(3)
    tokenizer.eos_token_ids = {95}
    free = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    eos = {f[i + 1] for i, f in enumerate(free[:5])} - set().union(*map(set, free[5:]))
    tokenizer.eos_token_ids = eos
    want = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    assert sum(len(w) < MAX_NEW for w in want) >= 3

    gen = SlotGenerator(model, eos, batch_size=8, max_new_tokens=MAX_NEW, streams=2)
    got = {
        c.key: c.response.tolist()
        for c in gen.generate(Request(i, p) for i, p in enumerate(prompts))
    }
    assert [got[i] for i in range(len(prompts))] == want
    assert gen.stats.shrinks > 0
    assert gen.stats.slot_steps < 8 * max(len(w) for w in want)


@pytest.mark.parametrize("prefill_rows", [1, 8])
def test_shared_prefix_is_reused_without_changing_outputs(prefill_rows: int) -> None:
    model = tiny_model("qwen3", scale=3.0)
    tokenizer = TokenizerWrapper(byte_tokenizer())
    tokenizer.eos_token_ids = {0}
    prefix = (7, 8, 9, 10, 11, 12, 13)
    prompts = [prefix + p for p in _prompts(4)[:6]] + [(5, 6, 7)]  # the last one does not match
    want = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    gen = SlotGenerator(
        model,
        {0},
        batch_size=3,
        max_new_tokens=MAX_NEW,
        prefill_rows=prefill_rows,
        prefill_chunk=16,
        shared_prefix=prefix,
    )
    got = {
        c.key: c.response.tolist()
        for c in gen.generate(Request(i, p) for i, p in enumerate(prompts))
    }
    assert [got[i] for i in range(len(prompts))] == want
    assert gen.stats.reused_prompt_tokens >= len(prefix) * (3 if prefill_rows == 8 else 6)
    assert gen.stats.reused_prompt_tokens % len(prefix) == 0


def test_common_prefix_leaves_a_token_to_every_prompt() -> None:
    reqs = [Request(0, (1, 2, 3, 4)), Request(1, (1, 2, 3, 9, 9)), Request(2, (1, 2, 3))]
    assert common_prefix(reqs) == (1, 2)
    assert common_prefix(reqs[:2]) == (1, 2, 3)
    assert common_prefix(reqs[:1]) == ()
    assert common_prefix([Request(0, (1, 2)), Request(1, (3, 4))]) == ()


def test_greedy_without_fast_kernels_or_head_split_also_matches() -> None:
    model = tiny_model("llama", scale=3.0)
    tokenizer = TokenizerWrapper(byte_tokenizer())
    tokenizer.eos_token_ids = {0}
    prompts = _prompts(1)[:5]
    want = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    gen = SlotGenerator(model, {0}, batch_size=2, max_new_tokens=MAX_NEW, fast_kernels=False)
    gen.parts = ModelParts(backbone=model, head=lambda x: x, head_split=False)
    got = {
        c.key: c.response.tolist()
        for c in gen.generate(Request(i, p) for i, p in enumerate(prompts))
    }
    assert [got[i] for i in range(len(prompts))] == want


def test_sampling_is_seeded_per_request_not_per_batch() -> None:
    model = tiny_model("llama", scale=1.0)
    prompts = _prompts(2)
    reqs = [Request(i, p, seed=100 + i) for i, p in enumerate(prompts)]

    def run(batch_size: int, seed: int, temperature: float = 1.0, streams: int = 1) -> dict:
        gen = SlotGenerator(
            model,
            {0},
            batch_size=batch_size,
            max_new_tokens=16,
            temperature=temperature,
            seed=seed,
            streams=streams,
        )
        return {c.key: c.response.tolist() for c in gen.generate(reqs)}

    one, five = run(1, seed=7), run(5, seed=7)
    assert one == five == run(5, seed=7, streams=2)
    assert run(5, seed=8) != one
    assert run(5, seed=7, temperature=0.0) != one


def test_compiled_sampling_picks_the_ids_of_the_plain_ops() -> None:
    from mlx_redrafter.train.batch_generate import _gumbel_max_body, choose_tokens

    logits = mx.random.normal((16, 999), key=mx.random.key(3)) * 3
    seeds = mx.arange(16).astype(mx.uint32) * 7919
    for step in range(1, 6):
        steps = mx.full((16,), step, dtype=mx.uint32)
        fused = choose_tokens(logits, 0.7, seeds, steps)
        plain = _gumbel_max_body(logits, seeds, steps, 1.0 / 0.7)
        assert fused.tolist() == plain.tolist()


def test_sampling_follows_the_softmax() -> None:
    model = tiny_model("llama", scale=0.5)
    gen = SlotGenerator(model, {0}, batch_size=64, max_new_tokens=1, temperature=1.0)
    prompt = (5, 6, 7)
    draws = 4000
    firsts = [c.response[0] for c in gen.generate(Request(i, prompt, seed=i) for i in range(draws))]
    logits = model(mx.array([prompt]))[0, -1]
    counts = np.bincount(firsts, minlength=logits.shape[0])

    def p_value(temperature: float) -> float:
        """Chi-square p-value of the counts against the softmax at ``temperature``."""
        probs = np.array(mx.softmax(logits / temperature), dtype=np.float64)
        expected = probs / probs.sum() * draws
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        return stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue

    assert p_value(1.0) > 1e-3
    # power: the same statistic rejects a temperature 10-20% off
    assert p_value(0.9) < 1e-3 and p_value(1.2) < 1e-3


# ------------------------------------------------------------------------------ kernels


def test_fast_exp_within_one_ulp_of_mx_exp() -> None:
    x = mx.concatenate([mx.linspace(-100, 100, 20001), mx.random.normal((4096,)) * 30])
    a, b = np.array(mx.exp(x)), np.array(fast_math.fast_exp(x))
    finite = np.isfinite(a)
    ulps = np.abs(a[finite].view(np.int32).astype(np.int64) - b[finite].view(np.int32))
    assert ulps.max() <= 1
    assert np.array_equal(a[~finite], b[~finite])  # inf above 88, as mx.exp
    assert (a == 0).sum() > 100 and (~finite).sum() > 100


def test_fast_swiglu_matches_mlx_lm() -> None:
    g, u = mx.random.normal((3, 5, 64)) * 6, mx.random.normal((3, 5, 64))
    np.testing.assert_allclose(fast_ops.fast_swiglu(g, u), swiglu(g, u), rtol=2e-6, atol=1e-6)


def test_decode_attention_matches_sdpa_with_per_row_masks() -> None:
    q = mx.random.normal((4, 6, 1, 16))
    k, v = mx.random.normal((4, 2, 40, 16)), mx.random.normal((4, 2, 40, 16))
    lengths = mx.array([40, 7, 1, 23])
    mask = (mx.arange(40)[None] < lengths[:, None])[:, None, None, :]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = fast_ops.decode_attention(q, k, v, 0.25, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    row2 = fast_ops.decode_attention(q[2:3], k[2:3, :, :1], v[2:3, :, :1], 0.25, None)
    np.testing.assert_allclose(got[2:3], row2, rtol=1e-5, atol=1e-6)


class _Recorder:
    """Wraps a function and records the shape of each call's first argument."""

    def __init__(self, fn):
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, *args, **kwargs):
        self.shapes.append(tuple(args[0].shape))
        return self.fn(*args, **kwargs)


def test_decode_steps_use_the_fast_attention(monkeypatch) -> None:
    recorder = _Recorder(fast_ops.decode_attention)
    monkeypatch.setattr(fast_ops, "decode_attention", recorder)
    model = tiny_model("llama")
    gen = SlotGenerator(model, {0}, batch_size=4, max_new_tokens=3, streams=2)
    assert len(list(gen.generate(Request(i, (1, 2, 3 + i)) for i in range(5)))) == 5
    layers = len(model.layers)
    assert len(recorder.shapes) >= layers * gen.stats.decode_steps
    assert {s[0] for s in recorder.shapes} >= {2} and all(s[2] == 1 for s in recorder.shapes)


def test_fast_kernels_are_only_installed_inside_the_block() -> None:
    model = tiny_model("llama")
    module = sys.modules[type(model).__module__]
    before = module.swiglu
    with fast_ops.installed(model):
        assert module.swiglu is fast_ops.fast_swiglu
    assert module.swiglu is before
    with pytest.raises(RuntimeError), fast_ops.installed(model):
        raise RuntimeError
    assert module.swiglu is before


# ------------------------------------------------------------------------------ data


def _seq(pi: int, si: int = 0, n_prompt: int = 3, n_resp: int = 4, reason: str = "eos") -> Sequence:
    tokens = np.arange(n_prompt + n_resp, dtype=np.int32) + 10 * pi
    return Sequence(tokens, n_prompt, pi, si, reason)


def test_shards_round_trip_in_prompt_order(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_size=3)
    order = [5, 2, 9, 0, 7, 1, 3]
    written = [
        writer.add(
            _seq(pi, n_prompt=pi % 4 + 1, n_resp=pi + 1, reason="length" if pi == 9 else "eos")
        )
        for pi in order
    ]
    assert [w is not None for w in written] == [False, False, True, False, False, True, False]
    assert writer.flush() is not None and writer.flush() is None
    assert [p.name for p in shard_paths(tmp_path)] == [f"shard-0000{i}.npz" for i in range(3)]
    assert read_shard(shard_paths(tmp_path)[0])["prompt_index"].tolist() == [5, 2, 9]

    ds = DistillDataset(tmp_path)
    assert len(ds) == 7
    assert ds.prompt_index.tolist() == sorted(order)
    for i, (tokens, start) in enumerate(ds):
        pi = sorted(order)[i]
        assert tokens.tolist() == _seq(pi, n_prompt=pi % 4 + 1, n_resp=pi + 1).tokens.tolist()
        assert start == pi % 4 + 1
        assert ds[i].finish_reason == ("length" if pi == 9 else "eos")
    assert ds.num_response_tokens == sum(pi + 1 for pi in order)
    assert completed_keys(tmp_path) == {(pi, 0) for pi in order}
    assert ShardWriter(tmp_path).next_shard == 3


def test_split_is_by_prompt_and_stable(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_size=50)
    for pi in range(300):
        for si in range(2):
            writer.add(_seq(pi, si))
    writer.flush()
    ds = DistillDataset(tmp_path, heldout_fraction=0.2)
    train, held = ds.train(), ds.heldout()
    assert len(train) + len(held) == 600
    assert not set(train.prompt_index.tolist()) & set(held.prompt_index.tolist())
    assert 0.1 < len(held) / 600 < 0.3
    assert len(held) % 2 == 0
    # the split of a prompt does not depend on which other prompts exist
    some = np.array([3, 77, 150, 299])
    assert heldout_mask(some, 0.2).tolist() == heldout_mask(np.arange(300), 0.2)[some].tolist()
    assert (
        heldout_mask(np.arange(300), 0.2, seed=1).tolist()
        != heldout_mask(np.arange(300), 0.2).tolist()
    )


def test_reader_ignores_partial_temporaries(tmp_path: Path) -> None:
    ShardWriter(tmp_path, shard_size=1).add(_seq(0))
    (tmp_path / ".shard-00001.npz.abc.tmp").write_bytes(b"half a shard")
    assert len(DistillDataset(tmp_path)) == 1


# ------------------------------------------------------------------------------ distill


@pytest.mark.parametrize(("batch_size", "streams", "prefix"), [(3, 2, 7), (8, 1, 0)])
def test_captured_hidden_states_equal_teacher_forcing(batch_size, streams, prefix) -> None:
    """Every position's state, prompt (chunked prefill, copied shared prefix) and response
    (batched decode, slots refilled and dropped), is the teacher-forced one."""
    from mlx_redrafter.train.features import HiddenExtractor

    model = tiny_model("qwen3", scale=3.0)
    shared = tuple(range(7, 7 + prefix))
    prompts = [shared + p for p in _prompts(5)]
    gen = SlotGenerator(
        model,
        {0},
        batch_size=batch_size,
        max_new_tokens=MAX_NEW,
        prefill_chunk=16,
        streams=streams,
        shared_prefix=shared,
        capture_hidden=True,
    )
    done = list(gen.generate(Request(i, p) for i, p in enumerate(prompts)))
    assert len(done) == len(prompts)
    assert gen.stats.shrinks > 0 or batch_size >= len(prompts)
    assert gen.stats.reused_prompt_tokens == prefix * len(prompts)
    extractor = HiddenExtractor(model)
    for c in done:
        tokens = np.concatenate([c.prompt, c.response])
        want = extractor([tokens])[0]
        assert c.hidden.dtype == np.float16 and c.hidden.shape == want.shape
        err = np.abs(c.hidden.astype(np.float32) - want).max(axis=-1)
        scale = np.abs(want).max()
        assert err.max() < 2e-3 * scale, (c.key, int(err.argmax()))
        # one position off would be far away: the states really are per position
        assert np.abs(c.hidden[1:].astype(np.float32) - want[:-1]).max() > 0.1 * scale


def test_hidden_states_need_a_split_model() -> None:
    model = tiny_model("llama")
    gen_parts = ModelParts(backbone=model, head=lambda x: x, head_split=False)
    import mlx_redrafter.train.batch_generate as bg

    original = bg.split_model
    bg.split_model = lambda m: gen_parts
    try:
        with pytest.raises(ValueError, match="splits off"):
            SlotGenerator(model, {0}, capture_hidden=True)
    finally:
        bg.split_model = original


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def _write_prompts(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    words = ["the cat", "sat on", "the mat", "hello world", "123", "a b c", "the end"]
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
            if i % 5 == 4:
                f.write(json.dumps({"question_id": i, "turns": [text, "second turn"]}) + "\n")
            else:
                f.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")
    return path


def _load(model_dir: Path):
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    return model, tokenizer


def _config(prompts: Path, out: Path, **kw) -> DistillConfig:
    base = dict(prompts=str(prompts), out=str(out), max_new_tokens=12, batch_size=4, shard_size=5)
    return DistillConfig(**{**base, **kw})


def test_resume_after_one_shard_gives_every_prompt_once(tmp_path: Path, tiny_dir: Path) -> None:
    model, tok = _load(tiny_dir)
    prompts = _write_prompts(tmp_path / "p.jsonl", 23)
    out = tmp_path / "out"
    first = distill(
        _config(prompts, out), model, tok, str(tiny_dir), progress=False, stop_after_shards=1
    )
    assert first.shards == 1 and len(shard_paths(out)) == 1
    assert len(completed_keys(out)) == 5
    assert read_meta(out)["progress"]["complete"] is False

    second = distill(_config(prompts, out), model, tok, str(tiny_dir), progress=False)
    assert second.sequences == 18
    ds = DistillDataset(out)
    assert ds.prompt_index.tolist() == list(range(23))
    meta = read_meta(out)
    assert meta["progress"]["complete"] is True
    assert meta["progress"]["sequences"] == 23
    assert meta["progress"]["generated_tokens"] == ds.num_response_tokens

    again = distill(_config(prompts, out), model, tok, str(tiny_dir), progress=False)
    assert again.sequences == 0 and len(DistillDataset(out)) == 23

    straight = tmp_path / "straight"
    distill(_config(prompts, straight, batch_size=7), model, tok, str(tiny_dir), progress=False)
    for a, b in zip(DistillDataset(out), DistillDataset(straight), strict=True):
        assert a[0].tolist() == b[0].tolist() and a[1] == b[1]


def test_stored_sequences_are_chat_prompt_plus_greedy_response(
    tmp_path: Path, tiny_dir: Path
) -> None:
    from mlx_redrafter.prompts import chat_tokens, load_prompts

    model, tok = _load(tiny_dir)
    prompts = _write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out"
    distill(_config(prompts, out, max_new_tokens=10), model, tok, str(tiny_dir), progress=False)
    texts = [p.text for p in load_prompts(prompts)]
    assert "second turn" not in texts[4]  # MT-Bench style records: the first turn only
    for seq in (DistillDataset(out)[i] for i in range(6)):
        ids = chat_tokens(tok, texts[seq.prompt_index])
        assert seq.tokens[: seq.response_start].tolist() == ids
        want = _reference(model, tok, tuple(ids), 10)
        assert seq.tokens[seq.response_start :].tolist() == want


def test_saved_features_are_used_by_fit_instead_of_extraction(
    tmp_path: Path, tiny_dir: Path, capsys
) -> None:
    """``distill --save-features`` stores every sequence's states (resumed runs too); ``fit``
    then extracts nothing and trains as it would on extracted features."""
    from mlx_redrafter.train.features import FeatureStore, HiddenExtractor, sequence_key

    model, tok = _load(tiny_dir)
    prompts = _write_prompts(tmp_path / "p.jsonl", 14)
    out = tmp_path / "out"
    config = _config(prompts, out, save_features=True)
    distill(config, model, tok, str(tiny_dir), progress=False, stop_after_shards=1)
    distill(config, model, tok, str(tiny_dir), progress=False)
    meta = json.loads((out / "features" / "meta.json").read_text())
    store = FeatureStore(out / "features", meta)
    extractor = HiddenExtractor(model)
    dataset = DistillDataset(out)
    sequences = [dataset[i] for i in range(len(dataset))]
    assert len(sequences) == 14
    assert set(store.index) == {sequence_key(seq.tokens) for seq in sequences}
    for seq in sequences[:4]:
        chunk, first, length = store.index[sequence_key(seq.tokens)]
        got = np.load(store.chunk_files[chunk])[first : first + length].astype(np.float32)
        want = extractor([seq.tokens])[0]
        assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()

    losses = {}
    for name, extra in (("stored", []), ("extracted", ["--no-feature-cache"])):
        if name == "extracted":
            (out / "features" / "meta.json").rename(out / "features" / "moved.json")
        head = tmp_path / name
        argv = ["fit", "--model", str(tiny_dir), "--data", str(out), "--out", str(head)]
        argv += ["--batch-size", "16", "--beam-length", "3", "--exit-dim", "64", "--quiet"]
        assert main([*argv, *extra]) == 0
        report = json.loads((head / "training.json").read_text())
        losses[name] = [e["loss"] for e in report["history"]]
        if name == "stored":
            assert report["throughput"]["distilled_feature_sequences"] > 0
            assert "cache_build_s" not in report["throughput"]  # nothing was extracted
    np.testing.assert_allclose(losses["stored"], losses["extracted"], rtol=1e-2)
    capsys.readouterr()


def test_resume_refuses_different_parameters(tmp_path: Path, tiny_dir: Path) -> None:
    model, tok = _load(tiny_dir)
    prompts = _write_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    distill(_config(prompts, out), model, tok, str(tiny_dir), progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        distill(_config(prompts, out, max_new_tokens=13), model, tok, str(tiny_dir), progress=False)
    more = distill(
        _config(prompts, out, limit=2, batch_size=2), model, tok, str(tiny_dir), progress=False
    )
    assert more.sequences == 0


def test_meta_names_model_and_prompts_by_hash_not_path(tmp_path: Path, tiny_dir: Path) -> None:
    """Data made in one place resumes from another (model, prompts and data all moved)."""
    import shutil

    model, tok = _load(tiny_dir)
    (tmp_path / "a").mkdir()
    prompts = _write_prompts(tmp_path / "a" / "p.jsonl", 12)
    first = tmp_path / "a" / "out"
    distill(_config(prompts, first), model, tok, str(tiny_dir), progress=False, stop_after_shards=1)
    meta = read_meta(first)
    text = json.dumps({k: v for k, v in meta.items() if k != "prompts"})
    assert str(tmp_path) not in text and "model_path" not in meta
    assert meta["model_name"] == tiny_dir.name and len(meta["model_sha256"]) == 64
    assert meta["model_dtype"] == "float32"

    elsewhere = tmp_path / "b"
    moved = Path(shutil.copytree(tiny_dir, elsewhere / "model"))
    moved_prompts = elsewhere / "prompts.jsonl"
    shutil.copy(prompts, moved_prompts)
    out = elsewhere / "out"
    shutil.copytree(first, out)
    model2, tok2 = _load(moved)
    more = distill(_config(moved_prompts, out), model2, tok2, str(moved), progress=False)
    assert more.sequences == 12 - 5
    assert DistillDataset(out).prompt_index.tolist() == list(range(12))
    assert read_meta(out)["model_sha256"] == meta["model_sha256"]


def test_resume_with_another_model_names_both(tmp_path: Path, tiny_dir: Path) -> None:
    from mlx_redrafter.train.distill import weights_sha256

    model, tok = _load(tiny_dir)
    prompts = _write_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    distill(_config(prompts, out), model, tok, str(tiny_dir), progress=False)
    other_dir = save_tiny_model_dir(tmp_path / "other-model", seed=7)
    other, other_tok = _load(other_dir)
    assert weights_sha256(other) != weights_sha256(model)
    # same path, other weights: still refused (the hash decides, not the path)
    with pytest.raises(ValueError) as err:
        distill(_config(prompts, out), other, other_tok, str(tiny_dir), progress=False)
    message = str(err.value)
    assert "\n" not in message and message.count("weights sha256") == 2
    assert weights_sha256(model)[:12] in message and weights_sha256(other)[:12] in message

    proc = _cli(["--model", str(other_dir), "--prompts", str(prompts), "--out", str(out)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert f"data has {tiny_dir.name} (float32" in stderr
    assert f"run has {other_dir.name} (float32" in stderr


def test_old_meta_with_paths_still_reads_and_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    from mlx_redrafter.train.data import write_meta

    model, tok = _load(tiny_dir)
    prompts = _write_prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out"
    distill(_config(prompts, out), model, tok, str(tiny_dir), progress=False, stop_after_shards=1)
    meta = read_meta(out)
    for key in ("model_name", "model_sha256", "model_dtype"):
        del meta[key]
    write_meta(out, {**meta, "model_path": str(tiny_dir)})  # as distill wrote it before
    assert len(DistillDataset(out)) == 5

    with pytest.raises(ValueError, match="model: data has '/"):
        distill(_config(prompts, out), model, tok, str(tmp_path / "moved"), progress=False)
    more = distill(_config(prompts, out), model, tok, str(tiny_dir), progress=False)
    assert more.sequences == 7
    assert read_meta(out)["model_sha256"]  # upgraded on resume
    assert "model_path" not in read_meta(out)


def test_block_order_is_random_blocks_each_shortest_first() -> None:
    rng = np.random.default_rng(5)
    ids = [list(range(int(n))) for n in rng.integers(1, 300, size=100)]
    ids[7] = None  # a skipped prompt
    reqs = build_requests(ids, 2, done={(3, 0)}, order="blocks", block_size=25, seed=1)
    keys = [r.key for r in reqs]
    assert len(keys) == len(set(keys)) == 99 * 2 - 1 and (3, 0) not in keys
    lengths = [len(r.tokens) for r in reqs]
    descents = [i + 1 for i in range(len(reqs) - 1) if lengths[i + 1] < lengths[i]]
    assert 1 <= len(descents) <= 3  # 4 blocks, each sorted by length
    first = {r.key[0] for r in reqs[: descents[0]]}
    assert len(first) == 25  # with this seed, prompts 3 and 7 are in later blocks
    shortest = set(np.argsort([len(x) if x else 10**6 for x in ids], kind="stable")[:25].tolist())
    assert first != shortest
    again = build_requests(ids, 2, done={(3, 0), *keys[:40]}, order="blocks", block_size=25, seed=1)
    assert [r.key for r in again] == keys[40:]
    by_length = build_requests(ids, 1, set(), order="length")
    assert [len(r.tokens) for r in by_length] == sorted(len(r.tokens) for r in by_length)
    assert [r.key[0] for r in build_requests(ids, 1, set(), order="file")] == [
        i for i in range(100) if i != 7
    ]


def test_shards_are_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = ShardWriter(tmp_path, shard_size=1).add(_seq(0))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlx_redrafter.train", "distill", "--quiet", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_killed_mid_run_then_rerun(tmp_path: Path, tiny_dir: Path) -> None:
    prompts = _write_prompts(tmp_path / "p.jsonl", 60)
    out = tmp_path / "out"
    args = ["--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out)]
    args += ["--max-new-tokens", "48", "--batch-size", "2", "--shard-size", "3"]
    proc = _cli(args)
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.npz").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = completed_keys(out)
    assert 3 <= len(partial) < 60

    term = _cli(args)
    deadline = time.monotonic() + 120
    while len(shard_paths(out)) <= len(partial) // 3 + 1 and term.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    term.send_signal(signal.SIGTERM)
    _, err = term.communicate(timeout=120)
    assert term.returncode == 130 and "interrupted" in err, err
    assert len(completed_keys(out)) > len(partial)

    final = _cli(args)
    stdout, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    ds = DistillDataset(out)
    assert ds.prompt_index.tolist() == list(range(60))
    assert sum(len(read_shard(p)["prompt_index"]) for p in shard_paths(out)) == 60
    assert not list(out.glob(".*.tmp"))
    assert "0 remaining" in stdout


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    proc = _cli(
        [
            "--prompts",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--max-new-tokens",
            "0",
        ]
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error:")


def test_dispatcher_survives_a_broken_fit(monkeypatch, capsys) -> None:
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "mlx_redrafter.train.fit":
            raise ImportError("no fit here")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    parser = build_parser()
    args = parser.parse_args(["distill", "--prompts", "p", "--out", "o"])
    assert args.batch_size == 64 and args.temperature == 0.0
    assert main(["fit", "--data", "d", "--out", "o"]) == 2
    assert "no fit here" in capsys.readouterr().err


def _prefill_inputs(b: int = 3, hq: int = 6, hkv: int = 2, t: int = 5, s: int = 12):
    q = mx.random.normal((b, hq, t, 16), key=mx.random.key(1))
    k = mx.random.normal((b, hkv, s, 16), key=mx.random.key(2))
    v = mx.random.normal((b, hkv, s, 16), key=mx.random.key(3))
    return q, k, v


def _padded_mask(b: int, t: int, s: int) -> mx.array:
    """``(B, 1, T, S)``: causal at offset ``S - T`` and row ``i`` blind to its last ``i`` keys."""
    causal = create_causal_mask(t, offset=s - t)
    keep = mx.arange(s)[None] < (s - mx.arange(b))[:, None]
    return (causal[None] & keep[:, None, :])[:, None] | (mx.arange(s) == 0)


@pytest.mark.parametrize("kind", ["causal", "bool", "per_row"])
def test_prefill_attention_matches_mlx_sdpa(kind: str) -> None:
    q, k, v = _prefill_inputs()
    b, _, t, _ = q.shape
    s = k.shape[2]
    mask = {
        "causal": "causal",
        "bool": create_causal_mask(t, offset=s - t),
        "per_row": _padded_mask(b, t, s),
    }[kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = fast_ops.fast_sdpa(q, k, v, cache=None, scale=0.25, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the comparison has power: one mask entry dropped (query 2 of row 0 blind to its own
    # key) moves the output
    if kind == "per_row":
        wrong = mx.array(np.array(mask))
        wrong[0, 0, 2, s - t + 2] = False
        off = fast_ops.prefill_attention(q, k, v, 0.25, wrong)
        assert np.abs(np.array(off - want)).max() > 1e-2


def test_prefill_forwards_use_the_grouped_attention_and_other_masks_do_not(monkeypatch) -> None:
    recorder = _Recorder(fast_ops.prefill_attention)
    monkeypatch.setattr(fast_ops, "prefill_attention", recorder)
    model = tiny_model("llama")
    gen = SlotGenerator(model, {0}, batch_size=4, max_new_tokens=3)
    assert len(list(gen.generate(Request(i, (1, 2, 3 + i, 4)) for i in range(5)))) == 5
    assert any(s[0] == 4 and s[2] == 4 for s in recorder.shapes)  # the prompts' prefill
    assert all(s[2] > 1 for s in recorder.shapes)
    calls = len(recorder.shapes)
    q, k, v = _prefill_inputs()
    additive = mx.where(create_causal_mask(5, offset=7), 0.0, -1e9)
    got = fast_ops.fast_sdpa(q, k, v, cache=None, scale=0.25, mask=additive)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=additive)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(recorder.shapes) == calls  # an additive mask goes to MLX's own attention


def test_refill_min_groups_prefills_without_changing_outputs() -> None:
    model = tiny_model("qwen3", scale=3.0)
    tokenizer = TokenizerWrapper(byte_tokenizer())
    prompts = _prompts(5)
    eos = _pick_eos(model, tokenizer, prompts)
    tokenizer.eos_token_ids = eos
    want = [_reference(model, tokenizer, p, MAX_NEW) for p in prompts]
    prefills = {}
    for refill_min in (1, 3):
        gen = SlotGenerator(model, eos, batch_size=4, max_new_tokens=MAX_NEW, refill_min=refill_min)
        got = {
            c.key: c.response.tolist()
            for c in gen.generate(Request(i, p) for i, p in enumerate(prompts))
        }
        assert [got[i] for i in range(len(prompts))] == want
        prefills[refill_min] = gen.stats.prefills
    assert prefills[3] < prefills[1]
