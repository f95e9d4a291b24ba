"""Training the feature-level head (``train fit-eagle``): hand-written gradients, the unrolled
("training-time test") attention and loss against explicit computations, and a short fit
on distilled sequences that learns.
"""

from __future__ import annotations

import ctypes

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_eagle import Reference, randomize
from tiny_models import tiny_model

from mlx_redrafter.drafters.eagle import EagleDrafter, lm_head_rows
from mlx_redrafter.drafters.eagle_head import EagleConfig, EagleHead, load_head
from mlx_redrafter.train.data import DistillDataset, Sequence, ShardWriter
from mlx_redrafter.train.eagle_fit import (
    Batch,
    EagleFitOptions,
    SequenceFeatures,
    _attend_unrolled,
    cross_entropy,
    fit,
    loss_terms,
    softmax,
    swiglu,
)
from mlx_redrafter.train.features import HiddenExtractor
from mlx_redrafter.train.sequence_features import build_store, open_store

V = 96


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


# ----------------------------------------------------------------------------- gradients


def _close(a: mx.array, b: mx.array, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_softmax_and_its_vjp_equal_mlx():
    """With the training's -1e9 mask entries; the cotangent is arbitrary (a weighted sum)."""
    key = mx.random.key(0)
    x = mx.random.normal((2, 3, 5, 9), key=key) * 4
    x = mx.where(mx.random.uniform(shape=x.shape, key=mx.random.key(1)) < 0.3, -1e9, x)
    x[..., 0] = 1.0  # every row keeps a live entry
    w = mx.random.normal(x.shape, key=mx.random.key(2))
    _close(softmax(x), mx.softmax(x, axis=-1))
    got = mx.grad(lambda a: (softmax(a) * w).sum())(x)
    want = mx.grad(lambda a: (mx.softmax(a, axis=-1) * w).sum())(x)
    _close(got, want)


def test_swiglu_and_its_vjp_equal_mlx():
    gate = mx.random.normal((4, 33), key=mx.random.key(3)) * 5
    gate[0, :4] = mx.array([-60.0, -20.0, 20.0, 60.0])  # saturated sigmoids
    up = mx.random.normal((4, 33), key=mx.random.key(4)) * 2
    w = mx.random.normal((4, 33), key=mx.random.key(5))
    _close(swiglu(gate, up), nn.silu(gate) * up)
    got = mx.grad(lambda g, u: (swiglu(g, u) * w).sum(), argnums=(0, 1))(gate, up)
    want = mx.grad(lambda g, u: (nn.silu(g) * u * w).sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(got, want, strict=True):
        _close(a, b)


def test_cross_entropy_and_its_vjp_equal_mlx():
    logits = mx.random.normal((7, 40), key=mx.random.key(6)) * 6
    labels = mx.array([0, 39, 5, 5, 12, 3, 20])
    w = mx.random.normal((7,), key=mx.random.key(7))

    def plain(z: mx.array) -> mx.array:
        lse = mx.logsumexp(z, axis=-1)
        return lse - mx.take_along_axis(z, labels[:, None], -1)[:, 0]

    _close(cross_entropy(logits, labels), plain(logits))
    got = mx.grad(lambda z: (cross_entropy(z, labels) * w).sum())(logits)
    _close(got, mx.grad(lambda z: (plain(z) * w).sum())(logits))


# ----------------------------------------------------------------------------- unrolled attention


def _head(seed: int = 0, **overrides) -> EagleHead:
    fields = dict(
        hidden_size=64,
        vocab_size=V,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
    )
    return randomize(EagleHead(EagleConfig(**{**fields, **overrides})), seed)


def test_attend_unrolled_equals_explicit_attention():
    """Row ``j``'s depth-2 query attends the true keys ``<= j`` and its own depth-2 key,
    nothing else (GQA: query head ``h`` reads key-value head ``h // 2``)."""
    head = _head()
    b, h, hkv, t, hd = 2, 4, 2, 6, 16
    keys = [mx.random.key(i) for i in range(10, 15)]
    q = mx.random.normal((b, h, t, hd), key=keys[0])
    base_k, base_v = (mx.random.normal((b, hkv, t, hd), key=k) for k in keys[1:3])
    extra_k, extra_v = (mx.random.normal((b, hkv, t, hd), key=k) for k in keys[3:5])
    pos = mx.arange(t)
    bias = mx.where(pos[None, :] <= pos[:, None], 0.0, -1e9)
    got = _attend_unrolled(head, q, base_k, base_v, [(extra_k, extra_v)], bias)
    qn, bk, bv, ek, ev = (
        np.array(a, dtype=np.float64) for a in (q, base_k, base_v, extra_k, extra_v)
    )
    heads = np.zeros((b, t, h, hd))
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)
            for j in range(t):
                k = np.concatenate([bk[bi, g, : j + 1], ek[bi, g, j : j + 1]])
                v = np.concatenate([bv[bi, g, : j + 1], ev[bi, g, j : j + 1]])
                s = k @ qn[bi, hi, j] / np.sqrt(hd)
                p = np.exp(s - s.max())
                heads[bi, j, hi] = (p / p.sum()) @ v
    wo = np.array(head.layer.self_attn.o_proj.weight, dtype=np.float64)
    want = heads.reshape(b, t, h * hd) @ wo.T
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)


def _batch(rng: np.random.Generator, lengths: list[int], starts: list[int], d: int = 64) -> Batch:
    width = 32
    tokens = np.zeros((len(lengths), width), np.int32)
    feats = np.zeros((len(lengths), width, d), np.float32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, V, size=n)
        feats[row, :n] = rng.standard_normal((n, d))
    return Batch(mx.array(tokens), mx.array(feats), np.array(lengths), np.array(starts))


def test_unrolled_loss_equals_the_drafted_nodes_of_the_reference():
    """``loss_terms`` at depths 1 and 2 (no noise) equals the losses computed from the numpy
    reference's drafted nodes: row ``j``'s depth-1 output ``o1_j`` after the true entries
    ``<= j``, its depth-2 output after those plus the node ``(o1_j, x_{j+2})`` at position
    ``j + 1``; labels ``x_{j+d+1}`` and ``f_{j+d}`` on response positions only, tokens outside
    the draft vocabulary skipped by the cross-entropy."""
    rng = np.random.default_rng(0)
    vocab = np.sort(rng.choice(V, size=60, replace=False)).astype(np.int32)
    head = _head(1, draft_vocab_size=int(vocab.size), bias=False)
    embed = nn.Embedding(V, 64)
    embed.weight = mx.array(rng.standard_normal((V, 64)).astype(np.float32))
    rows = mx.array(rng.standard_normal((vocab.size, 64)).astype(np.float32) / 2)
    table = np.full(V, -1, np.int32)
    table[vocab] = np.arange(vocab.size)
    batch = _batch(rng, [13, 9], [4, 2])
    options = EagleFitOptions(depths=2, feature_weight=0.7, token_weight=0.3)
    total, stats = loss_terms(head, embed, rows, mx.array(table), batch, options, None)

    ref = Reference(head, np.array(embed.weight), np.array(rows))
    sums = {d: [0.0, 0.0, 0, 0] for d in (1, 2)}  # feature loss, CE, rows, CE rows
    for row, (n, start) in enumerate(zip(batch.lengths, batch.starts, strict=True)):
        x = np.array(batch.tokens[row, :n])
        f = np.array(batch.features[row, :n], dtype=np.float64)
        for j in range(n - 1):
            lp1, lp2 = None, None
            o1 = ref.layer(ref.entries(x[1 : j + 2], f[: j + 1]), np.arange(j + 1))[-1]
            lp1 = ref.log_probs(o1)
            if j + 2 < n:
                entries = np.concatenate(
                    [ref.entries(x[1 : j + 2], f[: j + 1]), ref.entries(x[j + 2 : j + 3], o1[None])]
                )
                o2 = ref.layer(entries, np.arange(j + 2))[-1]
                lp2 = ref.log_probs(o2)
            for d, out, lp in ((1, o1, lp1), (2, None if lp2 is None else o2, lp2)):
                label = j + d + 1
                if lp is None or not (start <= label < n):
                    continue
                diff = np.abs(out - f[j + d])
                smooth = np.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean()
                sums[d][0] += smooth
                sums[d][2] += 1
                if table[x[label]] >= 0:
                    sums[d][1] -= lp[table[x[label]]]
                    sums[d][3] += 1
    want_total = 0.0
    for d, (tl, _, count) in zip((1, 2), stats, strict=True):
        fl, ce, rows_d, ce_rows = sums[d]
        assert int(count.item()) == rows_d and 0 < ce_rows < rows_d  # some labels skipped
        np.testing.assert_allclose(tl.item(), ce / ce_rows, rtol=1e-4)
        want_total += 0.8 ** (d - 1) * (0.7 * fl / rows_d + 0.3 * ce / ce_rows)
    np.testing.assert_allclose(total.item(), want_total, rtol=1e-4)


# ----------------------------------------------------------------------------- fitting


def cyclic_language(n: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Sequences of four cyclic words (period 6 over 3 tokens): each pair of tokens has one
    successor, so the next-but-one token is predictable from the entries."""
    rng = np.random.default_rng(1234)
    alphabet = rng.permutation(np.arange(3, V))[:12].reshape(4, 3)
    shape = np.array([0, 1, 0, 2, 1, 2])
    words = [letters[shape] for letters in alphabet]
    draw = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = words[draw.integers(len(words))]
        length = int(draw.integers(20, 32))
        tokens = word[(draw.integers(6) + np.arange(length)) % 6].astype(np.int32)
        out.append((tokens, int(draw.integers(2, 6))))
    return out


def test_a_short_fit_learns_and_writes_a_loadable_head(tmp_path):
    model = tiny_model("llama", seed=3)
    model.freeze()
    sequences = cyclic_language(32)
    writer = ShardWriter(tmp_path / "data", shard_size=16)
    for i, (tokens, start) in enumerate(sequences):
        writer.add(Sequence(tokens, start, prompt_index=i, sample_index=0, finish_reason="length"))
    writer.flush()
    data = DistillDataset(tmp_path / "data")
    extractor = HiddenExtractor(model)
    seqs = [np.asarray(t) for t, _ in data]
    store = open_store(tmp_path / "store", extractor, seqs)
    assert build_store(store, extractor, seqs, progress=False) == len(seqs)
    train = SequenceFeatures(data, tmp_path / "store")
    assert len(train) == len(sequences)
    # the store holds the target's states (fp16)
    np.testing.assert_allclose(train.states(0), extractor([train.sequences[0]])[0], atol=2e-2)

    vocab_ids = np.unique(np.concatenate([t for t, _ in sequences])).astype(np.int32)
    options = EagleFitOptions(epochs=30, lr=3e-3, batch_tokens=512, depths=2, warmup=0.05)
    record = fit(model, train, None, options, tmp_path / "head", vocab_ids, log=lambda *a: None)
    assert record["steps"] >= 50

    # the same initial head as fit's (seeded), then the trained one, on every batch
    mx.random.seed(options.seed)
    cfg = EagleConfig.for_target(model, draft_vocab_size=int(vocab_ids.size))
    initial = EagleHead(cfg)
    trained, saved_vocab = load_head(tmp_path / "head")
    np.testing.assert_array_equal(saved_vocab, vocab_ids)
    rows = lm_head_rows(model, vocab_ids)
    table = np.full(V, -1, np.int32)
    table[vocab_ids] = np.arange(vocab_ids.size)
    eval_options = EagleFitOptions(depths=2)

    def metrics(head: EagleHead) -> tuple[float, float]:
        loss, hits, count = 0.0, 0, 0
        for members in train.batches(512, None):
            total, stats = loss_terms(
                head,
                model.model.embed_tokens,
                rows,
                mx.array(table),
                train.batch(members),
                eval_options,
                None,
            )
            loss += total.item()
            hits += int(stats[1][1].item())
            count += int(stats[1][2].item())
        return loss, hits / count

    before, after = metrics(initial), metrics(trained)
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] > 0.6 and after[1] > before[1] + 0.3, (before, after)  # depth-2 top-1
    drafter = EagleDrafter.from_model(model, tmp_path / "head", tree_nodes=6)
    assert drafter.vocab is not None and drafter.head.config.draft_size == vocab_ids.size
