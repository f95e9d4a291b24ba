"""``python -m mlx_redrafter.bench``: speculative decoding against mlx-lm, in one run.

For every prompt the methods run interleaved (A B C ... A B C ..., the order rotated from
prompt to prompt) so that machine drift cancels out of the ratios:

(a) ``mlx_lm.stream_generate`` (AR)       (b) this library's AR path
(c) mlx-lm's draft-model speculative decoding and ours with the same draft model
    (``--draft-model``, ``--num-draft-tokens``)
(d) prompt lookup (``--prompt-lookup``, ``--ngram``, ``--num-draft-tokens``; one chain)
(e) ReDrafter at every ``--beam-width`` x ``--beam-length``, with each ``--lookup-beams``
    count of prompt-lookup beams in the same tree (0 = the head alone)

Reported per method: generation tokens/s (median, min, max), the speedup over (a) as the
median of per-prompt ratios, tokens per step, acceptance by depth, the step's time split
(one extra profiled pass with a host sync per phase), peak memory, and, at temperature 0,
the number of outputs that differ from (a)'s, each with its first divergent token and the
target's top-two logit gap there (:mod:`mlx_redrafter.divergence`). ``--tune`` measures this device's
verification and drafting costs, predicts the best beam shape, confirms it by measurement
and saves a profile that ``generate`` uses by default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

from mlx_redrafter.cli import DEFAULT_LOOKUP_BEAMS, add_medusa_choices_argument, with_lookup
from mlx_redrafter.divergence import divergence_report
from mlx_redrafter.drafters import (
    EagleDrafter,
    ParallelDrafter,
    PromptLookupDrafter,
    ReDrafter,
    draft_model_drafter,
)
from mlx_redrafter.engine import StepStats, stream_generate
from mlx_redrafter.prompts import Prompt, balanced_subset, chat_tokens, load_prompts
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tune import WIDE_WIDTHS

#: ``--beam-width`` when not given.
DEFAULT_WIDTHS = (1, 2, 4)


@dataclass
class Run:
    """One generation by one method."""

    method: str
    prompt: int
    category: str
    tokens: list[int]
    tps: float
    steps: int
    accepted: list[int]
    tree_sizes: list[int]
    peak_gb: float
    times: dict[str, float] = field(default_factory=dict)


class Method:
    """A way to generate: subclasses implement :meth:`generate`."""

    name: str = ""
    depth: int = 0

    def generate(self, prompt: list[int], max_tokens: int, stats: StepStats):
        """Yield mlx-lm style responses."""
        raise NotImplementedError

    def run(
        self, prompt: list[int], max_tokens: int, index: int, category: str, profile: bool = False
    ) -> Run:
        """Generate once and measure."""
        mx.reset_peak_memory()
        stats = StepStats(profile=profile)
        tokens: list[int] = []
        response = None
        for response in self.generate(prompt, max_tokens, stats):
            tokens.append(response.token)
        steps = stats.steps if self.depth else len(tokens)
        return Run(
            method=self.name,
            prompt=index,
            category=category,
            tokens=tokens,
            tps=response.generation_tps if response else 0.0,
            steps=steps,
            accepted=list(stats.accepted),
            tree_sizes=list(stats.tree_sizes),
            peak_gb=mx.get_peak_memory() / 1e9,
            times=dict(stats.times),
        )


class MlxLmAR(Method):
    """(a) mlx-lm's own ``stream_generate``."""

    def __init__(self, model, tokenizer, params: SamplingParams):
        self.name, self.model, self.tokenizer, self.params = "mlx-lm AR", model, tokenizer, params

    def generate(self, prompt, max_tokens, stats):
        p = self.params
        sampler = make_sampler(temp=p.temp, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
        return mlx_lm.stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=sampler
        )


class MlxLmDraftModel(Method):
    """(c) mlx-lm's speculative decoding with a draft model."""

    def __init__(self, model, tokenizer, draft_model, num_draft: int, params: SamplingParams):
        self.name = f"mlx-lm draft model (k={num_draft})"
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.num_draft, self.params = num_draft, params

    def generate(self, prompt, max_tokens, stats):
        p = self.params
        sampler = make_sampler(temp=p.temp, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
        return mlx_lm.stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            max_tokens=max_tokens,
            sampler=sampler,
            draft_model=self.draft_model,
            num_draft_tokens=self.num_draft,
        )


class Ours(Method):
    """(b) our AR path (``drafter=None``) or speculative decoding with any drafter.

    ``label`` names the drafter in the method name (``ReDrafter W2 L4``, ``prompt lookup
    W1 L6``, ...).
    """

    def __init__(
        self,
        model,
        tokenizer,
        params,
        drafter=None,
        width=1,
        length=4,
        acceptance="exact",
        label="ReDrafter",
        sample=True,
    ):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.drafter, self.width, self.length, self.acceptance = drafter, width, length, acceptance
        self.sample = sample
        if drafter is None:
            self.name = "ours AR"
        else:
            rule = "" if acceptance == "exact" or params.greedy else f", {acceptance} rule"
            beam = "" if sample or params.greedy or width > 1 else ", beam-search draft"
            self.name = f"{label} W{width} L{length}{rule}{beam}"
            self.depth = length - 1

    def generate(self, prompt, max_tokens, stats):
        head = getattr(self.drafter, "primary", self.drafter)  # a CombinedDrafter's head
        if hasattr(head, "keep_logprobs"):
            # only the ReDrafter rule needs the head's log-probs; don't pay for them otherwise
            head.keep_logprobs = self.acceptance == "redrafter" and not self.params.greedy
            head.sample = self.sample and not head.keep_logprobs
        return stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            max_tokens=max_tokens,
            drafter=self.drafter,
            beam_width=self.width,
            beam_length=self.length,
            sampler=self.params,
            acceptance=self.acceptance,
            stats=stats,
        )


def run_interleaved(
    methods: list[Method],
    prompts: list[list[int]],
    categories: list[str],
    max_tokens: int,
    repeats: int,
    seed: int,
) -> list[Run]:
    """Run every method on every prompt, interleaved; returns all runs."""
    runs: list[Run] = []
    total = len(prompts) * repeats * len(methods)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for index, (prompt, category) in enumerate(zip(prompts, categories, strict=True)):
            order = methods[index % len(methods) :] + methods[: index % len(methods)]
            for repeat in range(repeats):
                for method in order:
                    mx.random.seed(seed + 1000 * index + repeat)
                    runs.append(method.run(prompt, max_tokens, index, category))
                    bar.update(1)
    return runs


def profile_runs(
    methods: list[Method], prompts: list[list[int]], max_tokens: int
) -> dict[str, dict[str, float]]:
    """Per-step time split (seconds per step) from one profiled pass per drafting method."""
    split: dict[str, dict[str, float]] = {}
    for method in methods:
        if not method.depth:
            continue
        totals: dict[str, float] = {}
        steps = 0
        for prompt in prompts:
            run = method.run(prompt, max_tokens, -1, "", profile=True)
            steps += run.steps
            for phase, seconds in run.times.items():
                totals[phase] = totals.get(phase, 0.0) + seconds
        split[method.name] = {k: v / max(steps, 1) for k, v in totals.items()}
    return split


def summarize(
    runs: list[Run],
    methods: list[Method],
    greedy: bool,
    split: dict,
    model=None,
    prompts: list[list[int]] | None = None,
) -> list[dict]:
    """Per-method statistics (speedups are medians of per-prompt ratios against (a)).

    At temperature 0 with ``model`` and ``prompts`` given, each output that differs from
    (a)'s is listed under ``divergences`` with its prompt, first divergent position and
    the target's top-two logit gap there (:func:`~mlx_redrafter.divergence.divergence_report`).
    """
    by = {}
    for run in runs:
        by.setdefault(run.method, {}).setdefault(run.prompt, []).append(run)
    base_name = methods[0].name
    base = {p: statistics.median(r.tps for r in rs) for p, rs in by[base_name].items()}
    ar_step = 1.0 / statistics.median(base.values()) if base else 0.0
    rows = []
    for method in methods:
        per_prompt = by.get(method.name, {})
        tps = [statistics.median(r.tps for r in rs) for rs in per_prompt.values()]
        ratios = [
            statistics.median(r.tps for r in rs) / base[p]
            for p, rs in per_prompt.items()
            if base.get(p)
        ]
        all_runs = [r for rs in per_prompt.values() for r in rs]
        steps = sum(r.steps for r in all_runs)
        produced = sum(len(r.tokens) - (1 if method.depth else 0) for r in all_runs)
        accepted = (
            np.concatenate([np.asarray(r.accepted) for r in all_runs])
            if method.depth
            else np.zeros(0)
        )
        sizes = [s for r in all_runs for s in r.tree_sizes]
        mismatches = 0
        divergences = []
        if greedy:
            for p, rs in per_prompt.items():
                want = by[base_name][p][0].tokens
                mismatches += sum(r.tokens != want for r in rs)
                if model is None or prompts is None:
                    continue
                for r in rs:
                    found = divergence_report(model, prompts[p], want, r.tokens)
                    if found is not None:
                        divergences.append({"prompt": p, **found})
        row = {
            "method": method.name,
            "tps_median": statistics.median(tps) if tps else 0.0,
            "tps_min": min(tps, default=0.0),
            "tps_max": max(tps, default=0.0),
            "speedup_median": statistics.median(ratios) if ratios else 0.0,
            "speedup_min": min(ratios, default=0.0),
            "speedup_max": max(ratios, default=0.0),
            "tokens_per_step": produced / max(steps, 1),
            "acceptance_by_depth": [
                float((accepted >= k).mean()) for k in range(1, method.depth + 1)
            ]
            if accepted.size
            else [],
            "mean_tree_size": float(np.mean(sizes)) if sizes else 1.0,
            "peak_gb": max((r.peak_gb for r in all_runs), default=0.0),
            "mismatches": mismatches,
            "divergences": divergences,
        }
        if split.get(method.name) and ar_step:  # empty with --profile-prompts 0
            t = split[method.name]
            work = t.get("verify", 0) + t.get("accept", 0) + t.get("compact", 0) + t.get("draft", 0)
            row["time_split_ms"] = {k: 1000 * v for k, v in t.items()}
            row["bound"] = row["tokens_per_step"] / (
                (t.get("verify", 0) + t.get("draft", 0)) / ar_step
            )
            row["step_cost_vs_ar"] = work / ar_step
        rows.append(row)
    return rows


def by_category(runs: list[Run], methods: list[Method]) -> dict[str, dict[str, float]]:
    """Tokens per step by prompt category, per drafting method."""
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        if not method.depth:
            continue
        groups: dict[str, list[Run]] = {}
        for run in runs:
            if run.method == method.name:
                groups.setdefault(run.category, []).append(run)
        out[method.name] = {
            cat: sum(len(r.tokens) - 1 for r in rs) / max(sum(r.steps for r in rs), 1)
            for cat, rs in sorted(groups.items())
        }
    return out


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| method | tok/s median (min-max) | speedup vs mlx-lm median (min-max) | tokens/step | bound | peak GB | mismatches |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        bound = f"{r['bound']:.2f}x" if "bound" in r else "-"
        lines.append(
            f"| {r['method']} | {r['tps_median']:.1f} ({r['tps_min']:.1f}-{r['tps_max']:.1f}) "
            f"| {r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) "
            f"| {r['tokens_per_step']:.2f} | {bound} | {r['peak_gb']:.2f} | {r['mismatches']} |"
        )
    return "\n".join(lines)


def divergence_line(row: dict) -> str | None:
    """``method: N mismatches; first divergence at prompt p token t (AR logit gap g), ...``,
    or ``None`` when the row has no divergences."""
    found = row.get("divergences") or []
    if not found:
        return None
    each = ", ".join(
        f"prompt {d['prompt']} token {d['position']} (AR logit gap {d['ar_logit_gap']:.4g})"
        for d in found
    )
    return f"{row['method']}: {row['mismatches']} mismatches; first divergence at {each}"


def write_plots(out: Path, rows: list[dict], categories: dict) -> list[Path]:
    """PNG plots (needs the ``plot`` extra); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: install the 'plot' extra (matplotlib) for PNG plots", file=sys.stderr)
        return []
    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["method"] for r in rows], [r["speedup_median"] for r in rows])
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_ylabel("speedup vs mlx-lm AR (median)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    written.append(out / "speedup.png")
    if categories:
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, cats in categories.items():
            ax.plot(list(cats), list(cats.values()), marker="o", label=name)
        ax.set_ylabel("tokens per step")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "tokens_per_step_by_category.png", dpi=120)
        written.append(out / "tokens_per_step_by_category.png")
    plt.close("all")
    return written


def parse_ints(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_draft_methods(text: str) -> list[str]:
    """``"tli,slrs"`` -> ``["tli", "slrs"]`` (each one of :data:`DRAFT_METHODS`)."""
    from mlx_redrafter.drafters import DRAFT_METHODS

    methods = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in methods if x not in DRAFT_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown draft method {', '.join(unknown) or repr(text)} "
            f"(one or more of {', '.join(DRAFT_METHODS)})"
        )
    return methods


def model_drafting_methods(args: argparse.Namespace, model, tokenizer, params) -> list[Method]:
    """Methods (c) (``--draft-model``: mlx-lm's and ours) and (d) (``--prompt-lookup``)."""
    methods: list[Method] = []
    length = args.num_draft_tokens + 1
    if args.draft_model:
        from mlx_redrafter.models import load

        draft_model, draft_tokenizer = load(args.draft_model, dtype=args.dtype)
        for method in args.draft_method:
            if method == "same":  # mlx-lm needs one vocabulary
                methods.append(
                    MlxLmDraftModel(model, tokenizer, draft_model, args.num_draft_tokens, params)
                )
            ours = draft_model_drafter(model, draft_model, tokenizer, draft_tokenizer, method)
            label = "draft model" if method == "same" else f"draft model ({method})"
            methods.append(Ours(model, tokenizer, params, ours, 1, length, label=label))
    if args.prompt_lookup:
        lookup = PromptLookupDrafter(ngram=args.ngram)
        methods.append(Ours(model, tokenizer, params, lookup, 1, length, label="prompt lookup"))
    return methods


def head_label(head, spec: str, several: bool) -> str:
    """Method-name label of a head: its kind, and its directory name when the run has
    ``several`` heads (``ReDrafter (head-a)``)."""
    kind = "ParallelSpec" if isinstance(head, ParallelDrafter) else "ReDrafter"
    if isinstance(head, EagleDrafter):
        kind = "EAGLE"
    return f"{kind} ({Path(spec).name or spec})" if several else kind


def head_methods(
    args: argparse.Namespace, model, tokenizer, params, head, label: str = "ReDrafter"
) -> list[Method]:
    """Method (e): the head at every beam shape, rule and ``--lookup-beams`` count."""
    rules = ["exact", "redrafter"] if args.acceptance == "both" else [args.acceptance]
    samples = {"on": [True], "off": [False], "both": [True, False]}[args.sampled_draft]
    if params.greedy:
        rules, samples = ["exact"], [True]
    if not isinstance(head, ReDrafter):
        samples = [True]  # only a ReDrafter head samples its chain
    methods: list[Method] = []
    trees = args.tree_nodes if isinstance(head, EagleDrafter) else [0]
    for lookup, rule, nodes in itertools.product(args.lookup_beams, rules, trees):
        if lookup and rule == "redrafter":
            continue  # the ReDrafter rule needs the head's own log-probabilities
        tree_head = head.with_tree(nodes) if nodes else head
        drafter = with_lookup(tree_head, lookup, args.ngram)
        name = f"{label} N{nodes}" if nodes else label
        name = f"{name} + lookup {lookup}" if lookup else name
        for width in args.beam_width:
            if nodes and width == 1:
                continue  # a tree with one child per node is the chain
            for length in args.beam_length:
                for sample in samples if rule == "exact" and width == 1 else [True]:
                    methods.append(
                        Ours(
                            model,
                            tokenizer,
                            params,
                            drafter,
                            width,
                            length,
                            rule,
                            label=name,
                            sample=sample,
                        )
                    )
    return methods


def build_parser() -> argparse.ArgumentParser:
    """The bench's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default=None, help="target model (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--drafter",
        default="default",
        help="draft head dir, 'default' or 'none'; several comma-separated heads are "
        "all benchmarked, interleaved in one run",
    )
    p.add_argument("--prompts", required=True, help="JSONL prompts (MT-Bench or {'prompt': ...})")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument(
        "--beam-width",
        type=parse_ints,
        default=None,
        help=f"default {','.join(map(str, DEFAULT_WIDTHS))} (--tune: plus "
        f"{','.join(map(str, WIDE_WIDTHS))} where tree forwards are cheap)",
    )
    p.add_argument("--beam-length", type=parse_ints, default=[3, 4, 5])
    p.add_argument("--acceptance", choices=["exact", "redrafter", "both"], default="exact")
    p.add_argument(
        "--tree-nodes",
        type=parse_ints,
        default=[0],
        help="EAGLE heads: dynamic trees of N nodes, W children per node (0 = beams)",
    )
    add_medusa_choices_argument(p)
    p.add_argument(
        "--sampled-draft",
        choices=["on", "off", "both"],
        default="on",
        help="sampling at W = 1: the ReDrafter head samples its chain (on, the default) or "
        "drafts by beam search (off); both = compare them",
    )
    p.add_argument("--draft-model", default=None, help="draft model for the methods (c)")
    p.add_argument(
        "--draft-method",
        type=parse_draft_methods,
        default=["same"],
        help="ours with --draft-model: same tokenizer, token intersection (tli), slem or "
        "slrs; a comma list (tli,slem,slrs) runs each, interleaved",
    )
    p.add_argument("--prompt-lookup", action="store_true", help="add prompt lookup, method (d)")
    p.add_argument("--ngram", type=int, default=3, help="prompt lookup: longest n-gram")
    p.add_argument(
        "--lookup-beams",
        type=parse_ints,
        default=[DEFAULT_LOOKUP_BEAMS],
        help="prompt-lookup beams added to the head's tree, e.g. 0,1 (0 = the head alone)",
    )
    p.add_argument("--num-draft-tokens", type=int, default=3, help="K for (c) and (d)")
    p.add_argument(
        "--num-prompts", type=int, default=None, help="at most N prompts, balanced over categories"
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile-prompts", type=int, default=3, help="prompts for the time split pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--skip-ours-ar", action="store_true", help="leave out method (b), our AR path")
    p.add_argument(
        "--tune",
        action="store_true",
        help="tune the beam shape and lookup beams (over --beam-width x --beam-length x "
        "--lookup-beams) for this device and save them",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    explore_wide = args.beam_width is None
    if explore_wide:
        args.beam_width = list(DEFAULT_WIDTHS)
    from mlx_redrafter.cli import CLIError, parse_medusa_choices, resolve_drafter
    from mlx_redrafter.models import ModelLoadError, load

    try:
        choices = parse_medusa_choices(args.medusa_choices)
        model, tokenizer = load(args.model, dtype=args.dtype)
        specs = [spec.strip() for spec in args.drafter.split(",") if spec.strip()]
        if len(specs) != len(set(specs)):
            raise ValueError(f"--drafter: a head is named twice in {args.drafter!r}")
        if args.tune and len(specs) != 1:
            raise ValueError("--tune: give one --drafter")
        heads = [
            (s, resolve_drafter(s, args.model, model, args.acceptance, medusa_choices=choices))
            for s in specs
        ]
        heads = [(s, h) for s, h in heads if h is not None]
        drafter = heads[0][1] if heads else None
        items: list[Prompt] = balanced_subset(load_prompts(args.prompts), args.num_prompts)
        params = SamplingParams(
            temp=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k
        )
        extra = [] if args.tune else model_drafting_methods(args, model, tokenizer, params)
        for spec, head in [] if args.tune else heads:
            label = head_label(head, spec, len(heads) > 1)
            extra += head_methods(args, model, tokenizer, params, head, label)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [chat_tokens(tokenizer, item.text) for item in items]
    categories = [item.category for item in items]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        from mlx_redrafter.models import weights_dtype
        from mlx_redrafter.profile import setup_key
        from mlx_redrafter.tune import tune

        report = tune(
            model,
            tokenizer,
            drafter,
            prompts,
            params,
            args.beam_width,
            args.beam_length,
            args.max_tokens,
            lookup_beams=[0] if args.acceptance == "redrafter" else args.lookup_beams,
            ngram=args.ngram,
            setup=setup_key(args.model, args.drafter, args.temp > 0, weights_dtype(model)),
            explore_wide=explore_wide,
        )
        (out / "tune.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 0
    methods: list[Method] = [MlxLmAR(model, tokenizer, params)]
    if not args.skip_ours_ar:
        methods.append(Ours(model, tokenizer, params))
    methods += extra
    tic = time.perf_counter()
    runs = run_interleaved(methods, prompts, categories, args.max_tokens, args.repeats, args.seed)
    split = profile_runs(methods, prompts[: args.profile_prompts], args.max_tokens)
    rows = summarize(runs, methods, params.greedy, split, model, prompts)
    cats = by_category(runs, methods)
    table = markdown_table(rows)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "sampling": {
            "temp": args.temp,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "min_p": args.min_p,
        },
        "repeats": args.repeats,
        "wall_seconds": time.perf_counter() - tic,
    }
    (out / "bench.json").write_text(
        json.dumps(
            {"meta": meta, "summary": rows, "by_category": cats, "runs": [asdict(r) for r in runs]},
            indent=1,
        )
    )
    (out / "bench.md").write_text(table + "\n")
    write_plots(out, rows, cats)
    print(table)
    for row in rows:
        if "time_split_ms" in row:
            split_text = ", ".join(f"{k} {v:.1f} ms" for k, v in row["time_split_ms"].items())
            print(f"{row['method']}: step split {split_text}; bound {row['bound']:.2f}x")
    for row in rows:
        line = divergence_line(row)
        if line:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
