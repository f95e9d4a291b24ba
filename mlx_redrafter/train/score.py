"""``python -m mlx_redrafter.train evaluate``: score a trained head on distilled sequences.

The head is a ReDrafter head or a parallel head (by its ``config.json``). Every sequence of a ``distill`` data directory is scored (no held-out split: distil the
evaluation prompts into their own directory, e.g. MT-Bench first turns). The target's
hidden states are computed with teacher forcing and the head is run over every response
position once, so the figures are those of :mod:`mlx_redrafter.train.evaluate` (and
:mod:`~mlx_redrafter.train.parallel_evaluate`), for all sequences and, from the same per-row
outcomes, for each category:

* top-1 / top-5 accuracy by draft depth;
* coverage: the share of response tokens inside the head's draft vocabulary (a token
  outside it can never be drafted);
* tokens per step of greedy decoding along each response (``decode_tokens_per_step``), by
  beam width and by the prompt file's ``category`` when it has one. For a greedy target
  that reproduces the stored responses this is what the engine reports;
* with ``--temp T``: the expected tokens per step (per position) of the head's sampled
  chain at temperature ``T`` (``W = 1``, the head alone; see
  :func:`~mlx_redrafter.train.evaluate.sampled_chain_accepted`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafters import head_kind
from mlx_redrafter.drafters.parallel import ParallelHead, load_head
from mlx_redrafter.drafters.redrafter import (
    ReDrafterHead,
    find_input_embedding,
    load_drafter,
)
from mlx_redrafter.train.batch_generate import split_model
from mlx_redrafter.train.evaluate import (
    EvalResult,
    RowMetrics,
    decode_tokens_per_step,
    lookup_accepted,
    row_metrics,
    sampled_chain_accepted,
    scorer_for,
    summarise,
)
from mlx_redrafter.train.features import HiddenExtractor, dense_features, extraction_groups
from mlx_redrafter.train.objective import PositionTable, build_position_table
from mlx_redrafter.train.vocab import DraftVocab

EXIT_ERROR = 2


@dataclass
class Scored:
    """One evaluation group (all sequences, or one category)."""

    name: str
    sequences: int
    response_tokens: int
    coverage: float
    result: EvalResult
    #: Tokens per step of greedy decoding with the head's ``W`` beams plus prompt-lookup
    #: beams in one tree, by ``W`` (empty without ``--lookup-beams``).
    with_lookup: dict[int, float] = field(default_factory=dict)
    #: Tokens per step of prompt lookup alone (``nan`` without ``--lookup-beams``).
    lookup_only: float = float("nan")
    #: Expected tokens per step (per position) of the sampled chain (``nan`` without
    #: ``--temp``).
    sampled: float = float("nan")

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        out = {
            "name": self.name,
            "sequences": self.sequences,
            "response_tokens": self.response_tokens,
            "coverage": self.coverage,
            **self.result.to_dict(),
        }
        if self.with_lookup:
            out["decode_tokens_per_step_with_lookup"] = {
                str(w): v for w, v in self.with_lookup.items()
            }
            out["decode_tokens_per_step_lookup_only"] = self.lookup_only
        if not np.isnan(self.sampled):
            out["sampled_chain_tokens_per_step"] = self.sampled
        return out


def coverage(head: ReDrafterHead | ParallelHead, responses: list[np.ndarray]) -> float:
    """Share of the response tokens ``responses`` that the head can draft."""
    total = sum(r.size for r in responses)
    if head.draft_vocab is None or total == 0:
        return 1.0
    ids = np.array(head.draft_vocab)
    return float(sum(np.isin(r, ids).sum() for r in responses) / total)


def teacher_forced(
    model, sequences: list[tuple[np.ndarray, int]], beam_length: int, extract_tokens: int = 4096
) -> tuple[PositionTable, np.ndarray]:
    """Positions of ``sequences`` and the target's ``(N, d)`` hidden states at each one."""
    tokens = [np.asarray(t, dtype=np.int32) for t, _ in sequences]
    table = build_position_table(sequences, beam_length, max(len(t) for t in tokens))
    groups = extraction_groups([len(t) for t in tokens], extract_tokens)
    return table, dense_features(HiddenExtractor(model), tokens, table, groups, "float32")


def draft_labels_of(head: ReDrafterHead | ParallelHead) -> np.ndarray | None:
    """``(V,)`` int32 draft id of each target id (``-1`` outside the head's draft
    vocabulary, left out of the loss); ``None`` for a full-vocabulary head."""
    if head.draft_vocab is None:
        return None
    return DraftVocab(np.array(head.draft_vocab), "mask", head.config.vocab_size).target_to_draft()


@dataclass
class Scoring:
    """Everything measured once over all sequences; :meth:`group` reads any subset.

    Attributes:
        head: The head (for its draft vocabulary).
        sequences: ``(tokens (T,), response_start)`` of every sequence.
        table: Their positions.
        metrics: The head's per-row outcomes (:func:`row_metrics`).
        lookup: ``(N,)`` drafts prompt lookup gets accepted at each row (``None``: not
            scored).
        sampled: ``(N,)`` expected drafts the sampled chain gets accepted at each row
            (``None``: not scored).
    """

    head: ReDrafterHead | ParallelHead
    sequences: list[tuple[np.ndarray, int]]
    table: PositionTable
    metrics: RowMetrics
    lookup: np.ndarray | None = None
    sampled: np.ndarray | None = None

    def group(self, name: str = "all", picked: np.ndarray | None = None) -> Scored:
        """Scores of the sequences with sorted indices ``picked`` (``None``: all)."""
        if picked is None:
            chosen, table, rows = self.sequences, self.table, np.arange(self.table.size)
        else:
            chosen = [self.sequences[i] for i in picked]
            table = build_position_table(chosen, self.table.length, max(len(t) for t, _ in chosen))
            rows = np.flatnonzero(np.isin(self.table.sequence, picked))
            assert rows.size == table.size, "positions of a subset out of step"
        metrics = self.metrics.take(rows)
        responses = [np.asarray(t)[s:] for t, s in chosen]
        scored = Scored(
            name,
            len(chosen),
            int(sum(r.size for r in responses)),
            coverage(self.head, responses),
            summarise(table, metrics),
        )
        if self.sampled is not None and table.at_inference.any():
            scored.sampled = float(1.0 + self.sampled[rows][table.at_inference].mean())
        if self.lookup is not None:
            lookup = self.lookup[rows]
            scored.lookup_only = decode_tokens_per_step(table, lookup)
            scored.with_lookup = {
                w: decode_tokens_per_step(table, np.maximum(a, lookup))
                for w, a in metrics.accepted.items()
            }
        return scored


def score(
    head: ReDrafterHead | ParallelHead,
    embedding,
    sequences: list[tuple[np.ndarray, int]],
    table: PositionTable,
    features: np.ndarray,
    beam_widths: tuple[int, ...] = (),
    lookup_beams: int = 0,
    ngram: int = 3,
    temperature: float = 0.0,
    lm_head: Callable[[mx.array], mx.array] | None = None,
) -> Scoring:
    """Run ``head`` once over ``sequences`` (``(tokens (T,), response_start)`` pairs).

    Args:
        head: A ReDrafter or parallel head.
        embedding: The target's input embedding.
        sequences: Prompt + response ids and where each response starts.
        table: Their positions (:func:`teacher_forced`).
        features: ``(N, d)`` hidden states of the table's rows.
        beam_widths: Beam widths ``W > 1`` simulated besides ``W = 1``.
        lookup_beams: Prompt-lookup beams added to the head's tree (0: the head alone).
        ngram: Longest n-gram prompt lookup matches.
        temperature: With ``lm_head``, also score the sampled chain at this temperature.
        lm_head: The target's LM head ``(..., d) -> (..., V)``.
    """
    scorer = scorer_for(head, embedding, table, features)
    metrics = row_metrics(scorer, table, draft_labels_of(head), beam_widths=beam_widths)
    lookup = None
    if lookup_beams > 0:
        lookup = lookup_accepted(table, [t for t, _ in sequences], ngram, lookup_beams)
    sampled = None
    if temperature > 0 and lm_head is not None:
        sampled = sampled_chain_accepted(scorer, table, features, lm_head, temperature)
    return Scoring(head, sequences, table, metrics, lookup, sampled)


def categories_of(meta: dict, count: int) -> list[str] | None:
    """Category of each prompt index of a data directory (``None`` if unknown)."""
    from mlx_redrafter.prompts import load_prompts

    path = meta.get("prompts")
    if not path or not Path(path).is_file():
        return None
    prompts = load_prompts(path)
    if len(prompts) < count:
        return None
    return [p.category for p in prompts]


def format_table(
    rows: list[Scored], widths: list[int], lookup_beams: int = 0, temperature: float = 0.0
) -> str:
    """Markdown table: one row per group, tokens per step per beam width (and with
    ``lookup_beams`` prompt-lookup beams in the tree, and lookup alone, when given; and the
    sampled chain at ``temperature`` when scored)."""
    names = [f"tok/step W{w}" for w in widths]
    if lookup_beams:
        names += [f"W{w} + lookup {lookup_beams}" for w in widths] + ["lookup alone"]
    if temperature > 0:
        names.append(f"sampled chain T={temperature:g}")
    lines = [
        "| group | seqs | tokens | coverage | top-1 by depth | " + " | ".join(names) + " |",
        "|" + "---|" * (5 + len(names)),
    ]
    for row in rows:
        top1 = " ".join(f"{a:.2f}" for a in row.result.topk[:, 0])
        values = [row.result.decode_tokens_per_step[w] for w in widths]
        if lookup_beams:
            values += [row.with_lookup[w] for w in widths] + [row.lookup_only]
        if temperature > 0:
            values.append(row.sampled)
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(
            f"| {row.name} | {row.sequences} | {row.response_tokens} | {row.coverage:.3f} | "
            f"{top1} | {cells} |"
        )
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "evaluate",
        help="score a head on distilled sequences",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--head", required=True, help="draft head directory (ReDrafter or parallel)")
    p.add_argument("--data", required=True, help="distilled data directory (all of it is scored)")
    p.add_argument("--model", default=None, help="target (default: the one recorded in DATA)")
    p.add_argument("--beam-length", type=int, default=5, help="L: root + L-1 drafts")
    p.add_argument("--beam-widths", default="1", help="comma-separated, e.g. 1,2,4")
    p.add_argument(
        "--lookup-beams",
        type=int,
        default=0,
        help="also score the head with K prompt-lookup beams in its tree, and lookup alone",
    )
    p.add_argument("--ngram", type=int, default=3, help="prompt lookup: longest n-gram")
    p.add_argument(
        "--temp",
        type=float,
        default=0.0,
        help="also score the head's sampled chain (W = 1) at this temperature: expected "
        "tokens per step",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate``; one ``error:`` line on stderr and exit code 2 on bad input."""
    from mlx_redrafter.models import ModelLoadError, load
    from mlx_redrafter.train.data import DistillDataset

    try:
        widths = sorted({int(w) for w in args.beam_widths.split(",") if w.strip()})
        if not widths or min(widths) < 1:
            raise ValueError("--beam-widths: positive integers, e.g. 1,2,4")
        if not Path(args.data).is_dir():
            raise ValueError(f"--data: {args.data} is not a directory")
        dataset = DistillDataset(args.data, heldout_fraction=0.0)
        if len(dataset) == 0:
            raise ValueError(f"--data: no distilled sequences in {args.data}")
        recorded = dataset.meta.get("model")
        model_id = args.model or (None if recorded in (None, "default") else recorded)
        model, _ = load(model_id)
        embedding = find_input_embedding(model)
        kind = head_kind(args.head)
        if kind == "parallel":
            head = load_head(args.head, model)
        else:
            head = load_drafter(args.head, embedding)
        length = args.beam_length
        if length < 2:
            raise ValueError("--beam-length must be >= 2")
        if kind == "parallel" and length > head.config.num_masks + 1:
            raise ValueError(
                f"--beam-length {length}: this parallel head drafts "
                f"{head.config.num_masks} tokens, so L <= {head.config.num_masks + 1}"
            )
        if args.lookup_beams < 0 or args.ngram < 1:
            raise ValueError("--lookup-beams must be >= 0 and --ngram >= 1")
        if args.temp < 0:
            raise ValueError("--temp must be >= 0")
        lm_head = None
        if args.temp > 0:
            parts = split_model(model)  # a probe forward: only when the head is needed
            if not parts.head_split:
                raise ValueError("--temp: the target's LM head cannot be split off its backbone")
            lm_head = parts.head
    except (ValueError, OSError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    sequences = list(dataset)
    index = dataset.prompt_index
    table, features = teacher_forced(model, sequences, length)
    lookup = {"lookup_beams": args.lookup_beams, "ngram": args.ngram}
    sampled = {"temperature": args.temp, "lm_head": lm_head}
    scoring = score(head, embedding, sequences, table, features, tuple(widths), **lookup, **sampled)
    rows = [scoring.group()]
    categories = categories_of(dataset.meta, int(index.max()) + 1)
    if categories is not None and len({categories[i] for i in index}) > 1:
        labels = np.array([categories[i] for i in index])
        for name in sorted(set(labels.tolist())):
            rows.append(scoring.group(name, np.flatnonzero(labels == name)))
    print(f"head {args.head} ({kind}), L = {length}")
    print(format_table(rows, widths, args.lookup_beams, args.temp))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    return 0
