"""``python -m mlx_redrafter.train distill``: the target answers a prompt set; ids go to disk.

Every prompt (JSONL, a ``prompt`` field or the first of ``turns``; see
:func:`mlx_redrafter.prompts.load_prompts`) is wrapped in the chat template and answered by
the target with :class:`~mlx_redrafter.train.batch_generate.SlotGenerator` (greedy at
``--temp 0``). Prompt + response ids are stored in the format of
:mod:`mlx_redrafter.train.data`. A response ends at an EOS id (kept) or after
``--max-new-tokens`` ids.

Resuming: the finished ``(prompt, sample)`` pairs are read back from the shards, so
rerunning the same command continues where a killed run stopped, without duplicates. A
rerun must use the same model, prompts and generation parameters (``--limit``,
``--batch-size`` and the performance options may change). The model is compared by a hash
of its weights (:func:`model_identity`) and the prompts by a hash of the file's bytes, not
by path, so a data directory made on one machine resumes on another. SIGINT/SIGTERM write
the finished sequences still in memory before exiting.

Hidden states (``--save-features``): the target's final hidden state at every position
of every stored sequence, as computed while generating, goes to ``OUT/features`` (a
:class:`~mlx_redrafter.train.features.FeatureStore`, float16, one chunk per shard).
``fit`` reads them from there instead of running the target over the data again; a
sequence without stored states (e.g. from a run without the flag) is extracted as usual.

Order (``--order``): by default the prompts are cut into random blocks of
``--block-size`` and each block is processed shortest first, so rows decoded together
have similar lengths (less wasted attention) while a partial run still holds a random
sample of the prompt set. ``--limit N`` keeps the first ``N`` prompts of the file.
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import hashlib
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mlx_redrafter._blas import set_blas_threads
from mlx_redrafter.prompts import chat_tokens, load_prompts
from mlx_redrafter.train.batch_generate import Completion, Request, SlotGenerator
from mlx_redrafter.train.data import (
    Sequence,
    ShardWriter,
    StoredTotals,
    read_meta,
    remove_stale_temporaries,
    stored_totals,
    write_meta,
)
from mlx_redrafter.train.features import (
    DISTILLED_DIR,
    FeatureStore,
    HiddenExtractor,
    extractor_width,
    sequence_key,
    store_meta,
)

EXIT_ERROR = 2
#: Parameters that must match between a data directory and a resumed run.
#: Processing orders of ``--order`` (see :func:`build_requests`).
ORDERS = ("blocks", "length", "file")
GENERATION_PARAMS = ("max_new_tokens", "temperature", "seed", "samples_per_prompt", "chat_template")


@dataclass(frozen=True)
class DistillConfig:
    """Options of one distillation run (see ``--help`` for each)."""

    prompts: str
    out: str
    model: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    samples_per_prompt: int = 1
    batch_size: int = 64
    limit: int | None = None
    shard_size: int = 256
    flush_seconds: float = 300.0
    prefill_chunk: int = 512
    prefill_rows: int = 8
    refill_min: int = 1
    max_prompt_tokens: int = 4096
    chat_template: bool = True
    fast_kernels: bool = True
    native_attention: bool = True
    streams: int = 1
    order: str = "blocks"
    block_size: int = 1024
    save_features: bool = False

    def check(self) -> None:
        """Raise ``ValueError`` on impossible values."""
        positive = ("max_new_tokens", "samples_per_prompt", "batch_size", "shard_size")
        for name in (
            *positive,
            "prefill_chunk",
            "prefill_rows",
            "refill_min",
            "max_prompt_tokens",
            "streams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.temperature < 0:
            raise ValueError("--temp must be >= 0")
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {ORDERS}")
        if self.block_size < 1:
            raise ValueError("--block-size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")

    def generation_params(self) -> dict[str, Any]:
        """The parameters that define the data (stored in ``meta.json``)."""
        return {name: getattr(self, name) for name in GENERATION_PARAMS}


@dataclass
class DistillSummary:
    """What a run did."""

    sequences: int
    generated_tokens: int
    prompt_tokens: int
    shards: int
    remaining: int
    skipped_prompts: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated ids per wall-clock second."""
        return self.generated_tokens / max(self.seconds, 1e-9)


class Interrupted(Exception):
    """SIGTERM arrived (handled like Ctrl-C)."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model: Any) -> str:
    """Hex SHA-256 over a model's parameters: each one's name, dtype, shape and bytes.

    The parameters are taken in name order, so the hash depends on the weights only (not
    on the file layout, the path or the machine); the same checkpoint loaded in another
    dtype hashes differently, as it generates differently. About 0.3 s for 135M fp32
    weights.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        value = mx.contiguous(value)
        mx.eval(value)
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        digest.update(memoryview(value))
    return digest.hexdigest()


def model_dtype(model: Any) -> str:
    """Name of the floating-point dtype holding most of ``model``'s parameters."""
    from mlx.utils import tree_flatten

    sizes: dict[str, int] = {}
    for _, value in tree_flatten(model.parameters()):
        name = str(value.dtype).removeprefix("mlx.core.")
        if name.startswith(("float", "bfloat")):
            sizes[name] = sizes.get(name, 0) + int(value.size)
    return max(sizes, key=sizes.get) if sizes else "none"


def model_name(model_path: str) -> str:
    """A machine-independent name for the model at ``model_path`` (a directory's name, a
    hub id as given)."""
    path = Path(model_path)
    return path.name if path.exists() else str(model_path)


def model_identity(model: Any, model_path: str) -> dict[str, str]:
    """What ``meta.json`` records about the model: ``model_name``, ``model_sha256``
    (:func:`weights_sha256`) and ``model_dtype``."""
    return {
        "model_name": model_name(model_path),
        "model_sha256": weights_sha256(model),
        "model_dtype": model_dtype(model),
    }


def describe_model(meta: dict) -> str:
    """``name (dtype, weights sha256 abcdef123456)`` of the model a meta dict names."""
    sha = meta.get("model_sha256")
    if not sha:
        return repr(meta.get("model_path") or meta.get("model"))
    return (
        f"{meta.get('model_name', '?')} ({meta.get('model_dtype', '?')}, weights sha256 {sha[:12]})"
    )


def _same_model(meta: dict, expected: dict, legacy_path: str | None) -> bool:
    """Whether ``meta`` was made with the run's model. Old files (no weights hash) are
    compared by path; their ``"default"`` matches a run of the default model."""
    if meta.get("model_sha256"):
        return meta["model_sha256"] == expected["model_sha256"]
    have = meta.get("model_path")
    return have == legacy_path or (have == "default" and expected.get("model") == "default")


def check_compatible(meta: dict, expected: dict, legacy_path: str | None = None) -> None:
    """Raise ``ValueError`` naming every field where ``meta`` differs from ``expected``.

    The model is compared by ``model_sha256`` and the prompts by ``prompts_sha256``;
    ``legacy_path`` is the run's model path, compared with the ``model_path`` of data
    written before ``meta.json`` held the weights hash.
    """
    wrong = []
    if not _same_model(meta, expected, legacy_path):
        have = describe_model(meta)
        want = describe_model(expected if meta.get("model_sha256") else {"model": legacy_path})
        wrong.append(f"model: data has {have}, run has {want}")
    checks = [("prompts_sha256", meta.get("prompts_sha256"), expected["prompts_sha256"])]
    for name, value in expected["params"].items():
        checks.append((name, meta.get("params", {}).get(name), value))
    wrong += [
        f"{name}: data has {have!r}, run has {want!r}"
        for name, have, want in checks
        if have != want
    ]
    if wrong:
        raise ValueError(
            "the output directory holds data generated differently ("
            + "; ".join(wrong)
            + "); use another --out"
        )


def build_requests(
    prompt_ids: list[list[int] | None],
    samples_per_prompt: int,
    done: set[tuple[int, int]],
    order: str = "blocks",
    block_size: int = 1024,
    seed: int = 0,
) -> list[Request]:
    """Requests for every ``(prompt, sample)`` not in ``done``, in processing order.

    Orders: ``"length"``, shortest prompt first (least padding); ``"file"``, file order;
    ``"blocks"``, the prompts cut into random blocks of ``block_size`` (a permutation
    seeded by ``seed`` over all prompt indices, so it is the same on resume), each block
    shortest first: nearly the padding of ``"length"``, while the data of a partial run
    is a random sample of the prompts rather than the shortest ones.

    Args:
        prompt_ids: Token ids per prompt index (None = skipped).
        samples_per_prompt: Samples per prompt.
        done: Finished ``(prompt_index, sample_index)`` pairs.
        order: One of :data:`ORDERS`.
        block_size: Prompts per block (``"blocks"`` only).
        seed: Seed of the block permutation.
    """
    if order not in ORDERS:
        raise ValueError(f"--order must be one of {ORDERS}, got {order!r}")
    block = np.zeros(len(prompt_ids), dtype=np.int64)
    if order == "blocks":
        perm = np.random.default_rng(seed).permutation(len(prompt_ids))
        block[perm] = np.arange(len(prompt_ids)) // max(1, block_size)
    requests = []
    for pi, ids in enumerate(prompt_ids):
        if ids is None:
            continue
        for si in range(samples_per_prompt):
            if (pi, si) not in done:
                seed_i = pi * samples_per_prompt + si
                requests.append(Request(key=(pi, si), tokens=tuple(ids), seed=seed_i))
    if order == "file":
        requests.sort(key=lambda r: r.key)
    else:
        requests.sort(key=lambda r: (int(block[r.key[0]]), len(r.tokens), r.key))
    return requests


def common_prefix(requests: list[Request]) -> tuple[int, ...]:
    """Longest id prefix shared by every request and shorter than each (at least 2 needed)."""
    if len(requests) < 2:
        return ()
    first = requests[0].tokens
    n = min(len(r.tokens) for r in requests) - 1
    for r in requests[1:]:
        while n > 0 and r.tokens[:n] != first[:n]:
            n -= 1
    return tuple(first[:n])


def _to_sequence(c: Completion) -> Sequence:
    pi, si = c.key
    return Sequence(
        tokens=np.concatenate([c.prompt, c.response]).astype(np.int32),
        response_start=int(c.prompt.shape[0]),
        prompt_index=int(pi),
        sample_index=int(si),
        finish_reason=c.finish_reason,
    )


def encode_prompts(
    tokenizer: Any,
    texts: list[str],
    needed: set[int] | None = None,
    chat_template: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[list[int] | None]:
    """The prompt ids ``distill`` generates from: each text as one user turn, wrapped in the
    chat template (:func:`~mlx_redrafter.prompts.chat_tokens`).

    Args:
        tokenizer: The target's tokenizer.
        texts: Prompt texts, indexed by prompt index.
        needed: The indices to encode (None = all); the others are None.
        chat_template: Apply the tokenizer's chat template.
        max_prompt_tokens: Longer (and empty) prompts are None.
    """
    ids: list[list[int] | None] = [None] * len(texts)
    for i in sorted(range(len(texts)) if needed is None else needed):
        tokens = chat_tokens(tokenizer, texts[i], use_chat_template=chat_template)
        if tokens and (max_prompt_tokens is None or len(tokens) <= max_prompt_tokens):
            ids[i] = tokens
    return ids


@dataclass
class _Plan:
    """What a run has to do: the data description, the stored totals, the requests."""

    meta: dict
    stored: StoredTotals
    requests: list[Request]
    skipped: int


def plan_run(config: DistillConfig, model: Any, tokenizer: Any, model_path: str) -> _Plan:
    """Check ``config.out`` against this run and list the sequences still missing.

    Raises:
        ValueError: ``config.out`` holds data generated differently.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    prompts = load_prompts(config.prompts, limit=config.limit)
    meta = {
        "model": config.model or "default",
        **model_identity(model, model_path),
        "prompts": str(Path(config.prompts).resolve()),
        "prompts_sha256": sha256_file(Path(config.prompts)),
        "params": config.generation_params(),
        "eos_token_ids": sorted(int(t) for t in tokenizer.eos_token_ids),
        "vocab_size": int(getattr(getattr(model, "args", None), "vocab_size", 0)),
    }
    previous = read_meta(out)
    if previous is not None:
        check_compatible(previous, meta, legacy_path=model_path)
    stored = stored_totals(out)
    samples = range(config.samples_per_prompt)
    needed = {pi for pi in range(len(prompts)) for si in samples if (pi, si) not in stored.keys}
    texts = [p.text for p in prompts]
    prompt_ids = encode_prompts(
        tokenizer, texts, needed, config.chat_template, config.max_prompt_tokens
    )
    skipped = sum(1 for pi in needed if prompt_ids[pi] is None)
    requests = build_requests(
        prompt_ids,
        config.samples_per_prompt,
        stored.keys,
        config.order,
        config.block_size,
        config.seed,
    )
    return _Plan(meta, stored, requests, skipped)


def distill(
    config: DistillConfig,
    model: Any,
    tokenizer: Any,
    model_path: str,
    *,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> DistillSummary:
    """Generate the missing sequences of ``config.out`` and store them.

    Args:
        config: The run's options.
        model: The target mlx-lm model.
        tokenizer: Its mlx-lm tokenizer (``eos_token_ids``, chat template).
        model_path: Where the model was loaded from (a directory or hub id): ``meta.json``
            records its name and the weights' hash (:func:`model_identity`), and resuming
            compares the hash; the path itself is compared only with data written before
            the hash was recorded.
        progress: Show a progress bar on stderr.
        stop_after_shards: Return after writing this many shards (for tests).

    Raises:
        ValueError: Bad options, or ``config.out`` holds differently generated data.
    """
    config.check()
    if config.temperature == 0 and config.samples_per_prompt > 1:
        warnings.warn("--samples-per-prompt > 1 at --temp 0 stores identical copies", stacklevel=2)
    started = time.perf_counter()
    plan = plan_run(config, model, tokenizer, model_path)
    writer = ShardWriter(Path(config.out), config.shard_size, config.flush_seconds)
    run = _Progress(plan, writer, Path(config.out))
    run.save(complete=not plan.requests)
    summary = DistillSummary(0, 0, 0, 0, len(plan.requests), plan.skipped, 0.0)
    if plan.requests:
        gen = SlotGenerator(
            model,
            tokenizer.eos_token_ids,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed,
            prefill_chunk=config.prefill_chunk,
            prefill_rows=config.prefill_rows,
            refill_min=config.refill_min,
            fast_kernels=config.fast_kernels,
            native_attention=config.native_attention,
            streams=config.streams,
            shared_prefix=common_prefix(plan.requests),
            capture_hidden=config.save_features,
        )
        sink = FeatureSink.open(Path(config.out), model) if config.save_features else None
        _generate(gen, plan.requests, writer, run, summary, progress, stop_after_shards, sink)
        run.save(complete=summary.remaining == 0)
    summary.seconds = time.perf_counter() - started
    return summary


def _generate(
    gen: SlotGenerator,
    requests: list[Request],
    writer: ShardWriter,
    run: _Progress,
    summary: DistillSummary,
    progress: bool,
    stop_after_shards: int | None,
    sink: FeatureSink | None = None,
) -> None:
    """Feed ``requests`` to ``gen`` and store the completions (flushed on interrupt too)."""
    bar = tqdm(
        total=len(requests),
        unit="seq",
        desc="distill",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        smoothing=0.05,
    )
    try:
        for completion in gen.generate(requests):
            summary.sequences += 1
            summary.generated_tokens += int(completion.response.shape[0])
            summary.prompt_tokens += int(completion.prompt.shape[0])
            summary.remaining -= 1
            bar.update(1)
            bar.set_postfix_str(f"{gen.stats.tokens_per_second:.0f} tok/s", refresh=False)
            sequence = _to_sequence(completion)
            if sink is not None:
                sink.add(sequence, completion.hidden)
            shard = writer.add(sequence)
            if shard is not None:
                if sink is not None:
                    sink.flush()
                summary.shards += 1
                run.shard_written(shard, summary, gen.stats.tokens_per_second, bar)
                if stop_after_shards is not None and summary.shards >= stop_after_shards:
                    break
    finally:
        _save_pending(writer, run, summary, gen, bar)
        if sink is not None:
            sink.flush()
        bar.close()


def _save_pending(
    writer: ShardWriter, run: _Progress, summary: DistillSummary, gen: SlotGenerator, bar: tqdm
) -> None:
    """Write the buffered finished sequences (if any) and record the progress."""
    shard = writer.flush()
    if shard is not None:
        summary.shards += 1
        run.shard_written(shard, summary, gen.stats.tokens_per_second, bar)


class FeatureSink:
    """Buffers the hidden states of finished sequences; writes a store chunk per shard.

    Args:
        store: The ``OUT/features`` store.
    """

    DTYPE = "float16"

    def __init__(self, store: FeatureStore):
        self.store = store
        self._pending: list[tuple[str, np.ndarray]] = []

    @classmethod
    def open(cls, out: Path, model: Any) -> FeatureSink:
        """The store of data directory ``out`` for ``model`` (emptied if it was another's)."""
        extractor = HiddenExtractor(model)
        width = extractor_width(extractor, [np.ones(1, np.int32)])
        return cls(FeatureStore(out / DISTILLED_DIR, store_meta(extractor, width, cls.DTYPE)))

    def add(self, sequence: Sequence, hidden: np.ndarray) -> None:
        """Buffer ``hidden`` ``(T, d)`` of ``sequence`` (``T`` its token count)."""
        if hidden.shape[0] != sequence.tokens.shape[0]:
            raise ValueError(
                f"{hidden.shape[0]} hidden states for {sequence.tokens.shape[0]} tokens"
            )
        self._pending.append((sequence_key(sequence.tokens), hidden))

    def flush(self) -> None:
        """Write the buffered states as one chunk (call after the shard holding them)."""
        if self._pending:
            entries, self._pending = self._pending, []
            self.store.write_chunk(entries)


class _Progress:
    """Keeps ``meta.json``'s progress section in step with the shards written."""

    def __init__(self, plan: _Plan, writer: ShardWriter, out: Path):
        self.meta = plan.meta
        self.stored = plan.stored
        self.requested = len(plan.stored.keys) + len(plan.requests)
        self.skipped = plan.skipped
        self.writer = writer
        self.out = out
        self.written = DistillSummary(0, 0, 0, 0, 0, 0, 0.0)
        self.tokens_per_second = 0.0

    def shard_written(self, shard: Path, summary: DistillSummary, tok_s: float, bar: tqdm) -> None:
        """Record everything finished so far (all of it is on disk now) and log a line."""
        self.written = DistillSummary(**vars(summary))
        self.tokens_per_second = tok_s
        self.save(complete=False)
        done = len(self.stored.keys) + summary.sequences
        bar.write(
            f"{time.strftime('%H:%M:%S')} wrote {shard.name}: {done}/{self.requested} sequences, "
            f"{summary.generated_tokens} new tokens at {tok_s:.0f} tok/s"
        )

    def save(self, complete: bool) -> None:
        """Rewrite ``meta.json`` with the current totals."""
        progress = {
            "sequences": len(self.stored.keys) + self.written.sequences,
            "generated_tokens": self.stored.generated_tokens + self.written.generated_tokens,
            "prompt_tokens": self.stored.prompt_tokens + self.written.prompt_tokens,
            "shards": self.stored.shards + self.written.shards,
            "requested": self.requested,
            "skipped_prompts": self.skipped,
            "complete": complete,
            "last_tokens_per_second": round(self.tokens_per_second, 1),
        }
        write_meta(self.out, {**self.meta, "progress": progress})


# ---------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``distill`` sub-command (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "distill",
        help="generate self-distillation data with the target model",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--model",
        default=None,
        help="mlx-lm model dir / .gguf / hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--prompts", required=True, help="JSONL prompt file")
    p.add_argument("--out", required=True, help="output data directory (resumed if it exists)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, dest="temperature", help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temp > 0)")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="blocks",
        help="processing order: random blocks each shortest first (default), shortest "
        "first overall, or file order",
    )
    p.add_argument("--block-size", type=int, default=1024, help="prompts per random block")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per shard")
    p.add_argument(
        "--flush-seconds", type=float, default=300.0, help="write a shard at least this often"
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward"
    )
    p.add_argument(
        "--prefill-rows", type=int, default=8, help="most prompts prefilled in one forward"
    )
    p.add_argument(
        "--refill-min",
        type=int,
        default=1,
        help="prefill waiting prompts only once this many slots are free (fewer, larger "
        "prefill forwards)",
    )
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="skip longer prompts")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    p.add_argument(
        "--no-fast-kernels",
        dest="fast_kernels",
        action="store_false",
        help="use MLX's own exp/softmax kernels",
    )
    p.add_argument(
        "--no-native-attention",
        dest="native_attention",
        action="store_false",
        help="decode attention with MLX's ops instead of the native kernel",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=1,
        help="concurrent lanes of slots, one CPU thread each (more than one turns the "
        "native attention kernel off)",
    )
    p.add_argument(
        "--blas-threads",
        type=int,
        default=0,
        help="OpenBLAS threads per lane (default: cores / streams)",
    )
    p.add_argument(
        "--save-features",
        action="store_true",
        help="also store every position's hidden state (OUT/features, float16, ~2d bytes "
        "per token) so fit need not recompute them",
    )
    p.add_argument("--dtype", default=None, help="cast the model (default: keep the checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    return p


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """Run ``distill``; one ``error:`` line on stderr and exit code 2 on bad input."""
    from mlx_redrafter.models import ModelLoadError, load, resolve_model_path

    names = {f.name for f in fields(DistillConfig)}
    config = DistillConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        config.check()
        set_blas_threads(args.blas_threads or max(1, (os.cpu_count() or 1) // args.streams))
        model, tokenizer = load(args.model, dtype=args.dtype)
        where = resolve_model_path(args.model, args.dtype)
        model_path = str(Path(where).resolve()) if Path(where).exists() else str(where)
    except (ValueError, OSError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        summary = distill(config, model, tokenizer, model_path, progress=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; finished sequences are saved, rerun to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(
        f"{summary.sequences} sequences ({summary.generated_tokens} tokens) in "
        f"{summary.seconds:.0f}s = {summary.tokens_per_second:.0f} tok/s; "
        f"{summary.remaining} remaining, {summary.skipped_prompts} prompts skipped; "
        f"data in {config.out}"
    )
    return 0
