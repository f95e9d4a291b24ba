"""Train a feature-level (EAGLE-style) head on distilled sequences and their target states.

``python -m mlx_redrafter.train fit-eagle --data DATA --features STORE --out HEAD`` reads a
distillation directory and the feature store ``train features`` rebuilt for it, and fits
an :class:`~mlx_redrafter.drafters.eagle_head.EagleHead` from scratch.

Per sequence ``x_0 .. x_{T-1}`` with target states ``f_0 .. f_{T-1}``, entry ``j`` is
``(f_j + noise, x_{j+1})`` and the head's output ``o_j`` is trained towards ``f_{j+1}``
(smooth L1, weight ``--feature-weight``) and, through the target's frozen LM-head rows of
the draft vocabulary, towards the token ``x_{j+2}`` (cross-entropy, ``--token-weight``),
on response tokens only.

``--depths D > 1`` trains as the head drafts ("training-time test"): depth ``k`` feeds the
head its own depth ``k-1`` outputs, ``(o^{k-1}_j, x_{j+k})`` at position ``j+k-1``,
attending to the true entries ``<= j`` and to row ``j``'s own entries of depths ``2 .. k``,
exactly the keys a depth-``k`` draft node sees; its losses weigh ``0.8^(k-1)``.

Shapes: ``B`` sequences per batch, ``T`` padded length, ``d`` hidden size, ``K`` draft
vocabulary, ``H`` / ``Hkv`` heads, ``hd`` head size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_redrafter.device import on_cpu
from mlx_redrafter.drafters.eagle import lm_head_rows
from mlx_redrafter.drafters.eagle_head import EagleConfig, EagleHead, save_head
from mlx_redrafter.drafters.redrafter import find_input_embedding
from mlx_redrafter.fast_math import exp_ops, fast_exp, logsumexp
from mlx_redrafter.train.data import DistillDataset
from mlx_redrafter.train.features import META_FILE, FeatureStore, sequence_key
from mlx_redrafter.train.vocab import (
    DraftVocab,
    build_draft_vocab,
    coverage_of,
    response_token_counts,
)

DEPTH_DECAY = 0.8


@mx.custom_function
def cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """``(n,)`` cross-entropy of ``logits (n, K)`` at ``labels (n,)`` with the fast CPU exp
    (:mod:`mlx_redrafter.fast_math`) forward and backward."""
    lse = logsumexp(logits)[..., 0]
    return lse - mx.take_along_axis(logits, labels[:, None], -1)[:, 0]


@mx.compile
def _softmax_fwd(x: mx.array) -> mx.array:
    e = exp_ops(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@mx.compile
def _softmax_bwd(p: mx.array, g: mx.array) -> mx.array:
    return p * (g - (g * p).sum(axis=-1, keepdims=True))


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis with the fast CPU exp (MLX's CPU ``exp`` costs ~12 ns per
    element; attention scores dominate a training step otherwise)."""
    return _softmax_fwd(x)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return _softmax_bwd(output, cotangent)


@mx.compile
def _swiglu_fwd(gate: mx.array, up: mx.array) -> mx.array:
    return gate / (1.0 + exp_ops(-gate)) * up


@mx.compile
def _swiglu_bwd(gate: mx.array, up: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    sig = 1.0 / (1.0 + exp_ops(-gate))
    silu = gate * sig
    return g * up * (sig + silu * (1.0 - sig)), g * silu


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` with the fast CPU exp, forward and backward."""
    return _swiglu_fwd(gate, up)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_bwd(*primals, cotangent)


@cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangent, output):
    logits, labels = primals
    probs = fast_exp(logits - logsumexp(logits))
    onehot = mx.arange(logits.shape[-1])[None, :] == labels[:, None]
    return cotangent[:, None] * (probs - onehot), mx.zeros_like(labels)


def _mlx_softmax(x: mx.array) -> mx.array:
    return mx.softmax(x, axis=-1)


def _mlx_cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits, labels)


def device_kernels() -> tuple[Callable, Callable]:
    """``(softmax, cross_entropy)`` for the device: the fast-exp functions above on the CPU,
    MLX's fused ones on a GPU (:func:`mlx_redrafter.device.on_cpu`)."""
    if on_cpu():
        return softmax, cross_entropy
    return _mlx_softmax, _mlx_cross_entropy


@dataclass
class EagleFitOptions:
    """Training options (the ``fit-eagle`` flags)."""

    draft_vocab: int = 8192
    epochs: float = 1.0
    lr: float = 1e-3
    warmup: float = 0.03
    weight_decay: float = 0.01
    batch_tokens: int = 4096
    depths: int = 1
    noise: float = 0.2
    feature_weight: float = 1.0
    token_weight: float = 0.1
    own_head: bool = False
    seed: int = 0
    limit: int | None = None


# --------------------------------------------------------------------------- data


@dataclass
class Batch:
    """One padded batch.

    Attributes:
        tokens: ``(B, T)`` int32 ids (0-padded).
        features: ``(B, T, d)`` float32 target states.
        lengths: ``(B,)`` real lengths.
        starts: ``(B,)`` index of each sequence's first response token.
    """

    tokens: mx.array
    features: mx.array
    lengths: np.ndarray
    starts: np.ndarray


class SequenceFeatures:
    """Distilled sequences with their states in a :class:`FeatureStore` (those it holds)."""

    def __init__(self, data: DistillDataset, store_path: str | Path):
        meta = json.loads((Path(store_path) / META_FILE).read_text())
        self.store = FeatureStore(store_path, meta)
        self.arrays = [np.load(f, mmap_mode="r") for f in self.store.chunk_files]
        self.sequences: list[np.ndarray] = []
        self.starts: list[int] = []
        self.where: list[tuple[int, int]] = []
        for tokens, start in data:
            found = self.store.index.get(sequence_key(tokens))
            if found is not None and len(tokens) >= 3:
                self.sequences.append(np.asarray(tokens, dtype=np.int32))
                self.starts.append(int(start))
                self.where.append((found[0], found[1]))

    def __len__(self) -> int:
        return len(self.sequences)

    def states(self, i: int) -> np.ndarray:
        chunk, first = self.where[i]
        return self.arrays[chunk][first : first + len(self.sequences[i])]

    def batches(self, batch_tokens: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Sequence indices per batch: similar lengths together, ``B * T <= batch_tokens``;
        batch order shuffled by ``rng`` (kept sorted when ``None``)."""
        lengths = np.array([len(s) for s in self.sequences])
        order = np.argsort(lengths + (0 if rng is None else rng.random(len(lengths))))
        out, current = [], []
        for i in order:
            width = -(-lengths[i] // 32) * 32
            if current and (len(current) + 1) * width > batch_tokens:
                out.append(np.array(current))
                current = []
            current.append(int(i))
        if current:
            out.append(np.array(current))
        if rng is not None:
            rng.shuffle(out)
        return out

    def batch(self, members: np.ndarray) -> Batch:
        lengths = np.array([len(self.sequences[i]) for i in members])
        width = int(-(-lengths.max() // 32) * 32)
        d = self.arrays[0].shape[1]
        tokens = np.zeros((len(members), width), np.int32)
        feats = np.zeros((len(members), width, d), np.float32)
        for row, i in enumerate(members):
            n = lengths[row]
            tokens[row, :n] = self.sequences[i]
            feats[row, :n] = self.states(i)
        starts = np.array([self.starts[i] for i in members])
        return Batch(mx.array(tokens), mx.array(feats), lengths, starts)


# --------------------------------------------------------------------------- the objective


def _attend_unrolled(
    head: EagleHead, q: mx.array, base_k: mx.array, base_v: mx.array, extra: list, bias: mx.array
) -> mx.array:
    """Attention of ``q (B, H, T, hd)`` over the true entries ``base_k/v (B, Hkv, T, hd)``
    (additive ``bias`` (T, T): 0 where key ``<=`` row, else -1e9) plus, per row, the row's
    own entries of earlier unrolled depths ``extra`` = ``[(k, v) (B, Hkv, T, hd)]``;
    returns ``(B, T, d)``."""
    attn = head.layer.self_attn
    b, h, t, hd = q.shape
    rep = h // attn.num_kv_heads

    def heads(a: mx.array) -> mx.array:
        return a if rep == 1 else mx.repeat(a, rep, axis=1)

    q = q * hd**-0.5
    cols = [q @ heads(base_k).swapaxes(-1, -2) + bias]
    cols += [mx.sum(q * heads(k), axis=-1, keepdims=True) for k, _ in extra]
    probs = device_kernels()[0](mx.concatenate(cols, axis=-1) if extra else cols[0])
    out = probs[..., :t] @ heads(base_v)
    for i, (_, v) in enumerate(extra):
        out = out + probs[..., t + i : t + i + 1] * heads(v)
    return attn.o_proj(out.swapaxes(1, 2).reshape(b, t, h * hd))


def loss_terms(
    head: EagleHead,
    embed: nn.Module,
    rows: mx.array,
    label_of: mx.array,
    batch: Batch,
    options: EagleFitOptions,
    noise: mx.array | None,
) -> tuple[mx.array, list[tuple[mx.array, mx.array, mx.array]]]:
    """The weighted loss and, per depth, ``(token loss, top-1 hits, count)``."""
    tokens, feats = batch.tokens, batch.features
    b, t = tokens.shape
    inputs = feats[:, :-1] if noise is None else feats[:, :-1] + noise
    nxt = embed(tokens[:, 1:])
    positions = mx.arange(t - 1)
    causal = mx.where(positions[None, :] <= positions[:, None], 0.0, -1e9)
    attn = head.layer.self_attn
    x = head.entries(nxt, inputs)
    q, k1, v1 = attn.qkv(x, positions)
    extra: list[tuple[mx.array, mx.array]] = []
    lengths = mx.array(batch.lengths)[:, None]
    starts = mx.array(batch.starts)[:, None]
    total = mx.array(0.0)
    stats = []
    out = None
    for depth in range(1, options.depths + 1):
        if depth > 1:
            # row j: the previous depth's output with the token x_{j+depth}, at j+depth-1
            shifted = mx.pad(tokens[:, depth:], [(0, 0), (0, depth - 1)])
            x = head.entries(embed(shifted), out)
            q, kd, vd = attn.qkv(x, positions + depth - 1)
            extra.append((kd, vd))
        out = head.layer.finish(x, _attend_unrolled(head, q, k1, v1, extra, causal))
        # row j predicts f_{j+depth} and x_{j+depth+1}
        j = positions[None, :]
        label_pos = j + depth + 1
        mask = (label_pos < lengths) & (label_pos >= starts)
        f_target = mx.pad(feats[:, depth:], [(0, 0), (0, depth - 1), (0, 0)])
        label_tok = mx.pad(tokens[:, depth + 1 :], [(0, 0), (0, depth)])
        labels = label_of[label_tok]
        weight = DEPTH_DECAY ** (depth - 1)
        maskf = mask.astype(mx.float32)
        count = mx.maximum(maskf.sum(), 1.0)
        fl = nn.losses.smooth_l1_loss(out, f_target, reduction="none").mean(-1)
        feature_loss = (fl * maskf).sum() / count
        # logits only where a label is in the draft vocabulary (host-side gather)
        in_vocab = np.array(mask & (labels >= 0)).reshape(-1)
        where = mx.array(np.flatnonzero(in_vocab).astype(np.int32))
        chosen = labels.reshape(-1)[where]
        logits = head.logits(out.reshape(-1, out.shape[-1])[where], rows)
        vcount = max(int(in_vocab.sum()), 1)
        token_loss = device_kernels()[1](logits, chosen).sum() / vcount
        hits = (mx.argmax(logits, -1) == chosen).sum()
        total = total + weight * (
            options.feature_weight * feature_loss + options.token_weight * token_loss
        )
        stats.append((token_loss, hits, mask.sum()))
    return total, stats


# --------------------------------------------------------------------------- training


def fit(
    model: nn.Module,
    train: SequenceFeatures,
    heldout: SequenceFeatures | None,
    options: EagleFitOptions,
    out_dir: str | Path,
    vocab_ids: np.ndarray | None,
    log=print,
    init: EagleHead | None = None,
) -> dict:
    """Fit a head from scratch (or go on training ``init``, whose draft vocabulary must be
    ``vocab_ids``); saves it to ``out_dir``; returns the training record."""
    mx.random.seed(options.seed)
    rng = np.random.default_rng(options.seed)
    cfg = EagleConfig.for_target(
        model,
        draft_vocab_size=None if vocab_ids is None else int(vocab_ids.size),
        own_head=options.own_head,
    )
    head = EagleHead(cfg)
    if init is not None:
        head.load_weights(list(tree_flatten(init.parameters())))
        head.set_dtype(mx.float32)
        head.train()
    if on_cpu():  # on a GPU, mlx-lm's compiled SwiGLU is faster
        head.layer.mlp.act = swiglu
    embed = find_input_embedding(model)
    rows = lm_head_rows(model, vocab_ids).astype(mx.float32)
    if vocab_ids is None:
        label_of = mx.arange(cfg.vocab_size, dtype=mx.int32)
    else:
        label_of = mx.array(DraftVocab(vocab_ids, "mask", cfg.vocab_size).target_to_draft())

    per_epoch = train.batches(options.batch_tokens, None)
    total_steps = max(1, int(math.ceil(len(per_epoch) * options.epochs)))
    warm = max(1, int(options.warmup * total_steps))
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-7, options.lr, warm),
            optim.cosine_decay(options.lr, total_steps - warm, options.lr * 0.05),
        ],
        [warm],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=options.weight_decay)

    def loss_fn(h: EagleHead, batch: Batch, noise: mx.array) -> mx.array:
        return loss_terms(h, embed, rows, label_of, batch, options, noise)[0]

    step_fn = nn.value_and_grad(head, loss_fn)
    history = []
    step = 0
    tic = time.perf_counter()
    positions_seen = 0
    bar = tqdm(total=total_steps, desc="fit-eagle", unit="step")
    while step < total_steps:
        for members in train.batches(options.batch_tokens, rng):
            if step >= total_steps:
                break
            batch = train.batch(members)
            shape = (batch.tokens.shape[0], batch.tokens.shape[1] - 1, cfg.hidden_size)
            noise = None
            if options.noise > 0:
                noise = (mx.random.uniform(shape=shape) - 0.5) * options.noise
            loss, grads = step_fn(head, batch, noise)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(head, grads)
            mx.eval(head.parameters(), opt.state, loss)
            step += 1
            positions_seen += int(batch.lengths.sum())
            bar.update(1)
            if step % 50 == 0 or step == total_steps:
                rate = positions_seen / (time.perf_counter() - tic)
                bar.set_postfix(loss=f"{loss.item():.3f}", pos_s=f"{rate:.0f}")
                history.append(
                    {"step": step, "loss": round(loss.item(), 4), "pos_per_s": round(rate)}
                )
    bar.close()
    record = {
        "options": asdict(options),
        "train_sequences": len(train),
        "train_positions": int(sum(len(s) for s in train.sequences)),
        "train_response_tokens": int(
            sum(len(s) - r for s, r in zip(train.sequences, train.starts, strict=True))
        ),
        "steps": step,
        "seconds": round(time.perf_counter() - tic, 1),
        "history": history,
    }
    head.eval()
    if heldout is not None and len(heldout):
        record["heldout"] = evaluate(head, embed, rows, label_of, heldout, options)
        log(f"held-out: {record['heldout']}")
    save_head(out_dir, head, vocab_ids, extra={"training": record})
    return record


def evaluate(
    head: EagleHead,
    embed: nn.Module,
    rows: mx.array,
    label_of: mx.array,
    data: SequenceFeatures,
    options: EagleFitOptions,
    depths: int = 4,
) -> dict:
    """Teacher-forced unrolled metrics: token loss and top-1 by depth (no noise)."""
    opts = EagleFitOptions(**{**asdict(options), "depths": depths})
    sums = np.zeros((depths, 3))
    for members in data.batches(opts.batch_tokens, None):
        _, stats = loss_terms(head, embed, rows, label_of, data.batch(members), opts, None)
        mx.eval(stats)
        for d, (tl, hits, count) in enumerate(stats):
            sums[d] += [tl.item() * count.item(), hits.item(), count.item()]
    return {
        "token_loss": [round(s[0] / max(s[2], 1), 3) for s in sums],
        "top1": [round(s[1] / max(s[2], 1), 4) for s in sums],
        "positions": int(sums[0, 2]),
    }


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fit-eagle",
        help="train a feature-level (EAGLE-style) head",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--data", required=True, help="distillation data directory")
    p.add_argument("--features", required=True, help="feature store (train features --out)")
    p.add_argument("--out", required=True, help="head directory to write")
    p.add_argument("--model", default=None, help="target model (default: the embedded one)")
    d = EagleFitOptions()
    p.add_argument("--draft-vocab", type=int, default=d.draft_vocab, help="K (0: full V)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    p.add_argument("--depths", type=int, default=d.depths, help="unrolled training depths")
    p.add_argument("--noise", type=float, default=d.noise, help="uniform feature noise width")
    p.add_argument("--feature-weight", type=float, default=d.feature_weight)
    p.add_argument("--token-weight", type=float, default=d.token_weight)
    p.add_argument("--own-head", action="store_true", help="learn an own output layer")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, help="first N training sequences")
    p.add_argument("--init-head", default=None, help="go on training this head (its vocabulary)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from mlx_redrafter.models import ModelLoadError, load

    for name, path in (("data", args.data), ("features", args.features)):
        if not Path(path).is_dir():
            print(f"error: {name} directory not found: {path}", file=sys.stderr)
            return 2
    if not (Path(args.features) / META_FILE).is_file():
        print(f"error: not a feature store (no {META_FILE}): {args.features}", file=sys.stderr)
        return 2
    if args.depths < 1 or args.epochs <= 0 or args.batch_tokens < 64:
        print(
            "error: --depths >= 1, --epochs > 0 and --batch-tokens >= 64 required", file=sys.stderr
        )
        return 2
    try:
        model, _ = load(args.model, dtype="float32")
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = EagleFitOptions(
        draft_vocab=args.draft_vocab,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        batch_tokens=args.batch_tokens,
        depths=args.depths,
        noise=args.noise,
        feature_weight=args.feature_weight,
        token_weight=args.token_weight,
        own_head=args.own_head,
        seed=args.seed,
        limit=args.limit,
    )
    data = DistillDataset(args.data)
    train = SequenceFeatures(data.train(), args.features)
    if args.limit is not None:
        train.sequences, train.starts, train.where = (
            train.sequences[: args.limit],
            train.starts[: args.limit],
            train.where[: args.limit],
        )
    heldout = SequenceFeatures(data.heldout(), args.features)
    if not len(train):
        print(
            f"error: the feature store holds none of the training sequences: {args.features}",
            file=sys.stderr,
        )
        return 2
    vocab_ids, init = None, None
    if args.init_head:
        from mlx_redrafter.drafters.eagle_head import load_head

        init, vocab_ids = load_head(args.init_head)
        if init.config.hidden_size != int(model.args.hidden_size):
            print(
                f"error: --init-head {args.init_head} was made for another target", file=sys.stderr
            )
            return 2
        options.own_head = init.config.own_head
    elif args.draft_vocab:
        counts = response_token_counts(
            zip(train.sequences, train.starts, strict=True), int(model.args.vocab_size)
        )
        vocab = build_draft_vocab(counts, size=args.draft_vocab)
        vocab_ids = vocab.ids.astype(np.int32)
        print(
            f"draft vocabulary: {vocab.size} ids, {coverage_of(vocab.ids, counts):.4f} of training targets"
        )
    print(f"training on {len(train)} sequences, held out {len(heldout)}")
    record = fit(model, train, heldout, options, args.out, vocab_ids, init=init)
    print(f"saved {args.out} ({record['steps']} steps, {record['seconds']:.0f} s)")
    return 0
