"""The ``python -m mlx_redrafter.generate`` command: argument handling and output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

SHIPPED_HEADS = Path(__file__).parent / "heads"
DEFAULT_HEAD = SHIPPED_HEADS / "smollm2-135m-instruct"
DEFAULT_SHAPE = (1, 4)
#: Beam shape when sampling (``--temp > 0``) without a tuned profile: sampled text is
#: accepted less, so a shorter chain pays (L3 beat L4 at T = 1 in interleaved runs).
DEFAULT_SAMPLING_SHAPE = (1, 3)
#: Prompt-lookup beams added to a draft head's tree when ``--lookup-beams`` is not given.
DEFAULT_LOOKUP_BEAMS = 1
#: Drafted tokens per step when ``--num-draft-tokens`` is not given.
DEFAULT_DRAFT_TOKENS = {"draft-model": 3, "prompt-lookup": 5}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def read_prompt(prompt: str) -> str:
    """``-`` reads the prompt from standard input."""
    return sys.stdin.read() if prompt == "-" else prompt


def format_prompt(tokenizer, prompt: str, ignore_chat_template: bool) -> list[int] | str:
    """Apply the chat template (when the tokenizer has one) unless told not to."""
    if ignore_chat_template or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def add_medusa_choices_argument(p: argparse.ArgumentParser) -> None:
    """``--medusa-choices`` (generate, chat, server and bench)."""
    p.add_argument(
        "--medusa-choices",
        default=None,
        metavar="JSON|FILE",
        help="Medusa heads: the tree as a JSON list of paths of top-k ranks per head, e.g. "
        "'[[0],[0,0],[1]]', or a JSON file holding one (default: beams over the heads)",
    )


def parse_medusa_choices(value: str | None) -> list[list[int]] | None:
    """``--medusa-choices``: a JSON list of paths of ranks (``'[[0],[0,0],[1]]'``) or the
    path of a JSON file holding one; ``None`` when not given.

    Raises:
        CLIError: unreadable file, invalid JSON, or not a non-empty list of non-empty lists
            of integers >= 0 (one line saying which).
    """
    if value is None:
        return None
    text, source = value, "--medusa-choices"
    file = Path(value).expanduser()
    if not value.lstrip().startswith("[") and file.is_file():
        try:
            text, source = file.read_text(), f"--medusa-choices file {file}"
        except OSError as e:
            raise CLIError(f"--medusa-choices: cannot read {file}: {e.strerror}") from e
    try:
        choices = json.loads(text)
    except ValueError as e:
        hint = "" if value.lstrip().startswith("[") else " (nor an existing file)"
        raise CLIError(f"{source} is not valid JSON{hint}: {e}") from e
    good = (
        isinstance(choices, list)
        and choices
        and all(
            isinstance(path, list)
            and path
            and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path)
            for path in choices
        )
    )
    if not good:
        raise CLIError(
            f"{source} must be a non-empty JSON list of non-empty lists of ranks >= 0, "
            "e.g. [[0],[0,0],[1]]"
        )
    return choices


def resolve_drafter(
    spec: str,
    model_arg: str | None,
    model,
    acceptance: str = "exact",
    top_k: int | None = None,
    medusa_choices: list[list[int]] | None = None,
):
    """Load the drafter named by ``--drafter`` (``none``, ``default``, a directory or a Hub
    repo id); ``top_k``: ``--draft-top-k`` (Apple's warp of ReDrafter beam search);
    ``medusa_choices``: ``--medusa-choices`` (a Medusa head's tree)."""
    if spec == "none":
        return None
    if spec == "default":
        if model_arg is not None or not DEFAULT_HEAD.is_dir():
            if model_arg is not None:
                print(
                    "note: no draft head given for this model; decoding autoregressively "
                    "(pass --drafter DIR)",
                    file=sys.stderr,
                )
            return None
        spec = str(DEFAULT_HEAD)
    from mlx_redrafter.drafters import load_drafter

    # a directory or a Hub repo id (load_drafter resolves it)
    extra = {} if top_k is None else {"top_k": top_k}
    if medusa_choices is not None:
        extra["medusa_choices"] = medusa_choices
    return load_drafter(spec, model, keep_logprobs=acceptance != "exact", **extra)


def with_tree(drafter, tree_nodes: int | None):
    """``drafter`` drafting dynamic trees of ``tree_nodes`` nodes (``--tree-nodes``; EAGLE
    heads only); ``drafter`` itself when not asked."""
    if tree_nodes is None:
        return drafter
    from mlx_redrafter.drafters import EagleDrafter

    if not isinstance(drafter, EagleDrafter):
        raise CLIError("--tree-nodes needs an EAGLE head (--drafter DIR of a feature-level head)")
    if tree_nodes < 1:
        raise CLIError(f"--tree-nodes must be >= 1, got {tree_nodes}")
    return drafter.with_tree(tree_nodes)


def with_lookup(drafter, lookup_beams: int, ngram: int):
    """``drafter`` plus ``lookup_beams`` prompt-lookup beams in one tree (0: ``drafter``)."""
    if lookup_beams < 0:
        raise CLIError(f"--lookup-beams must be >= 0, got {lookup_beams}")
    if drafter is None or lookup_beams == 0:
        return drafter
    from mlx_redrafter.drafters import CombinedDrafter, PromptLookupDrafter

    return CombinedDrafter(drafter, [(PromptLookupDrafter(ngram=ngram), lookup_beams)])


def lookup_beams_for(requested: int | None, acceptance: str, setup: str | None = None) -> int:
    """``--lookup-beams``: the flag, else the device profile (``bench --tune``), else
    :data:`DEFAULT_LOOKUP_BEAMS`; always 0 under the ReDrafter rule (it needs the head's
    log-probabilities, which a combined tree does not have). ``setup``:
    :func:`mlx_redrafter.profile.setup_key` of the run (no profile without it)."""
    if acceptance == "redrafter":
        if requested:
            raise CLIError(
                "--acceptance redrafter needs the head's own log-probabilities: "
                "use --lookup-beams 0"
            )
        return 0
    if requested is not None:
        return requested
    from mlx_redrafter.profile import tuned_lookup_beams

    tuned = None if setup is None else tuned_lookup_beams(setup)
    return DEFAULT_LOOKUP_BEAMS if tuned is None else tuned


def add_drafter_kind_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt-lookup [--ngram N]`` / ``--draft-model PATH`` and ``--num-draft-tokens K``."""
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="draft by n-gram lookup in the prompt and output (no model needed)",
    )
    kind.add_argument(
        "--draft-model", default=None, help="mlx-lm model with the same tokenizer that drafts"
    )
    parser.add_argument(
        "--draft-method",
        choices=["same", "tli", "slem", "slrs"],
        default="same",
        help="draft model: 'same' tokenizer (default); another tokenizer: 'tli' (drafts the "
        "tokens both vocabularies share), 'slem' (drafts text, re-tokenized) or 'slrs' "
        "(drafts a string, verifies its first target token against the string's "
        "probability: string-level rejection sampling)",
    )
    parser.add_argument(
        "--ngram", type=int, default=3, help="prompt lookup: longest n-gram matched (3)"
    )
    parser.add_argument(
        "--lookup-beams",
        type=int,
        default=None,
        help="prompt-lookup beams added to a draft head's tree (1; 0 = the head alone)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        help="tokens drafted per step (draft model: 3, prompt lookup: 5)",
    )


def drafter_kind(args: argparse.Namespace) -> str:
    """``"prompt-lookup"``, ``"draft-model"`` or ``"head"`` (ReDrafter or none), checked."""
    kind = "head"
    if getattr(args, "prompt_lookup", False):
        kind = "prompt-lookup"
    elif getattr(args, "draft_model", None):
        kind = "draft-model"
    if kind != "head":
        if args.drafter is not None:
            raise CLIError(f"--drafter and --{kind} are mutually exclusive")
        if args.beam_length is not None:
            raise CLIError(f"--{kind} takes --num-draft-tokens K, not --beam-length")
    elif args.num_draft_tokens is not None:
        raise CLIError("--num-draft-tokens needs --prompt-lookup or --draft-model")
    if kind != "head" and getattr(args, "medusa_choices", None) is not None:
        raise CLIError("--medusa-choices needs a Medusa head (--drafter DIR)")
    parse_medusa_choices(getattr(args, "medusa_choices", None))
    if kind != "head" and getattr(args, "lookup_beams", None) is not None:
        raise CLIError("--lookup-beams adds prompt lookup to a draft head (--drafter)")
    if kind != "draft-model" and args.draft_method != "same":
        raise CLIError("--draft-method needs --draft-model")
    return kind


def build_drafter(args: argparse.Namespace, model, tokenizer, acceptance: str = "exact"):
    """The drafter the flags ask for and its ``(W, L)``; ``(None, (W, L))`` for AR.

    ``--prompt-lookup``: :class:`PromptLookupDrafter`, ``W`` = ``--beam-width`` (1),
    ``L = K + 1``. ``--draft-model``: :func:`draft_model_drafter` (``--draft-method``),
    ``W = 1``, ``L = K + 1``.
    Otherwise ``--drafter`` (a ReDrafter or parallel head) with :func:`beam_shape`, plus
    ``--lookup-beams`` prompt-lookup beams in the same tree (:class:`CombinedDrafter`).
    """
    kind = drafter_kind(args)
    if kind == "head":
        top_k = getattr(args, "draft_top_k", None)
        choices = parse_medusa_choices(getattr(args, "medusa_choices", None))
        drafter = resolve_drafter(
            args.drafter or "default", args.model, model, acceptance, top_k, choices
        )
        drafter = with_tree(drafter, getattr(args, "tree_nodes", None))
        from mlx_redrafter.models import weights_dtype
        from mlx_redrafter.profile import setup_key

        dtype = weights_dtype(model)
        setup = setup_key(args.model, args.drafter, sampling(args), dtype)
        lookup = lookup_beams_for(args.lookup_beams, acceptance, setup)
        return with_lookup(drafter, lookup, args.ngram), beam_shape(args, dtype)
    num_draft = args.num_draft_tokens
    if num_draft is None:
        num_draft = DEFAULT_DRAFT_TOKENS[kind]
    if num_draft < 1:
        raise CLIError(f"--num-draft-tokens must be >= 1, got {num_draft}")
    if kind == "prompt-lookup":
        from mlx_redrafter.drafters import PromptLookupDrafter

        return PromptLookupDrafter(ngram=args.ngram), (args.beam_width or 1, num_draft + 1)
    from mlx_redrafter.drafters import draft_model_drafter
    from mlx_redrafter.models import load

    draft_model, draft_tokenizer = load(args.draft_model, dtype=args.dtype)
    drafter = draft_model_drafter(
        model, draft_model, tokenizer, draft_tokenizer, method=args.draft_method
    )
    return drafter, (args.beam_width or 1, num_draft + 1)


def sampling(args: argparse.Namespace) -> bool:
    """Whether the flags ask for sampled decoding (``--temp > 0``)."""
    return (getattr(args, "temp", 0.0) or 0.0) > 0


def beam_shape(args: argparse.Namespace, dtype: str | None = None) -> tuple[int, int]:
    """``(W, L)`` from the flags, else the device profile for this model (in ``dtype``)
    and drafter, else the built-in default."""
    from mlx_redrafter.profile import setup_key, tuned_shape

    default = DEFAULT_SAMPLING_SHAPE if sampling(args) else DEFAULT_SHAPE
    setup = setup_key(args.model, args.drafter, sampling(args), dtype)
    width, length = tuned_shape(setup) or default
    return args.beam_width or width, args.beam_length or length


def run_generate(args: argparse.Namespace) -> int:
    """Run the generate CLI; returns the process exit status."""
    from mlx_redrafter.engine import print_stats, stream_generate
    from mlx_redrafter.models import ModelLoadError, load

    try:
        if args.seed is not None:
            mx.random.seed(args.seed)
        drafter_kind(args)  # flag conflicts fail before any model is loaded
        model, tokenizer = load(args.model, dtype=args.dtype)
        drafter, (width, length) = build_drafter(args, model, tokenizer, args.acceptance)
        prompt = format_prompt(tokenizer, read_prompt(args.prompt), args.ignore_chat_template)
        response = None
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            drafter=drafter,
            beam_width=width,
            beam_length=length,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            acceptance=args.acceptance,
        ):
            print(response.text, end="", flush=True)
        print()
        if response is not None:
            print_stats(response, speculative=drafter is not None)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
