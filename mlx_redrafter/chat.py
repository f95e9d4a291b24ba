"""``python -m mlx_redrafter.chat``: a multi-turn chat REPL on one prompt cache.

Each turn renders the whole conversation with the chat template, keeps the part of the
prompt cache it shares with it (the earlier turns, the model's own replies included) and
prefills only the rest (:mod:`mlx_redrafter.prompt_cache`); decoding is speculative with
the same default model, drafter and beam shape as ``python -m mlx_redrafter.generate``.

Commands: ``/stats`` prints the last reply's statistics (``--stats``: after every reply),
``/reset`` starts a new conversation, ``/quit`` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import mlx.core as mx

from mlx_redrafter.cli import CLIError, build_drafter, drafter_kind
from mlx_redrafter.engine import GenerationResponse, print_stats, stream_generate
from mlx_redrafter.generate import add_decoding_arguments
from mlx_redrafter.prompt_cache import PromptCache, make_prompt_cache

PROMPT = ">> "
COMMANDS = "/stats, /reset, /quit"


@dataclass
class ChatSession:
    """A conversation with one model: its messages, prompt cache and decoding settings.

    Attributes:
        model: The mlx-lm model.
        tokenizer: Its tokenizer (with a chat template, or raw turns are concatenated).
        drafter: The drafter, or ``None`` for AR decoding.
        settings: Keyword arguments of :func:`stream_generate` (shape, sampling, tokens).
        system: Optional system message that starts every conversation.
        messages: The conversation so far (``{"role", "content"}`` dicts).
        cache: The prompt cache the turns share.
    """

    model: Any
    tokenizer: Any
    drafter: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    cache: PromptCache = field(default_factory=make_prompt_cache)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new conversation (an empty cache)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_prompt_cache(self.model)

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered for the assistant's next reply."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return self.tokenizer.encode("".join(m["content"] for m in messages))
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def reply(self, text: str) -> Iterator[GenerationResponse]:
        """Stream the reply to the user message ``text``; the conversation keeps both once
        the reply is complete."""
        messages = [*self.messages, {"role": "user", "content": text}]
        new = self.cache.continuation(self.prompt(messages))
        answer = ""
        for response in stream_generate(
            self.model,
            self.tokenizer,
            new,
            drafter=self.drafter,
            prompt_cache=self.cache,
            **self.settings,
        ):
            answer += response.text
            yield response
        self.messages = [*messages, {"role": "assistant", "content": answer}]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mlx_redrafter.chat`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.chat",
        description="Chat with a model (speculative decoding, prompt cache reused across "
        f"turns). Commands: {COMMANDS}.",
    )
    add_decoding_arguments(p)
    p.add_argument("--system", default=None, help="system message of every conversation")
    p.add_argument("--stats", action="store_true", help="print the statistics after each reply")
    return p


def print_turn_stats(response: GenerationResponse, speculative: bool, out: TextIO) -> None:
    """mlx-lm's stats lines, the speculative ones and the tokens the cache saved."""
    print_stats(response, speculative=speculative, file=out)
    print(f"Prompt cache: {response.cached_tokens} tokens reused", file=out)


def session_from_args(args: argparse.Namespace) -> ChatSession:
    """Load the model and drafter the flags name (raises :class:`CLIError` and friends)."""
    from mlx_redrafter.models import load

    if args.seed is not None:
        mx.random.seed(args.seed)
    if args.max_tokens == 0:
        raise CLIError("--max-tokens must be non-zero (-1 for no limit)")
    drafter_kind(args)  # flag conflicts fail before any model is loaded
    model, tokenizer = load(args.model, dtype=args.dtype)
    drafter, (width, length) = build_drafter(args, model, tokenizer, args.acceptance)
    settings = {
        "max_tokens": args.max_tokens,
        "beam_width": width,
        "beam_length": length,
        "temp": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "acceptance": args.acceptance,
    }
    return ChatSession(model, tokenizer, drafter, settings, system=args.system)


def repl(session: ChatSession, show_stats: bool, stdin: TextIO, out: TextIO) -> None:
    """Read user lines from ``stdin`` until ``/quit`` or end of input."""
    last: GenerationResponse | None = None
    speculative = session.drafter is not None
    print(f"Chat ({COMMANDS}).", file=out)
    while True:
        print(PROMPT, end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            print(file=out)
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            last = None
            print("(new conversation)", file=out)
            continue
        if text.strip() == "/stats":
            if last is None:
                print("(no reply yet)", file=out)
            else:
                print_turn_stats(last, speculative, out)
            continue
        if not text.strip():
            continue
        try:
            for response in session.reply(text):
                print(response.text, end="", file=out, flush=True)
                last = response
        except ValueError as e:
            print(f"error: {e}", file=out)
            continue
        print(file=out)
        if show_stats and last is not None:
            print_turn_stats(last, speculative, out)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from mlx_redrafter.models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        session = session_from_args(args)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    repl(session, args.stats, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
