"""Streaming into a callback, the way an app (e.g. a macOS chat window) embeds the library.

The app owns a callback that receives text pieces as they are decoded, and can stop
generation at any time by returning ``False``.

    python examples/stream_callback.py [--model DIR] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import mlx_redrafter  # first: routes MLX's BLAS to OpenBLAS on Linux
from mlx_redrafter import load, load_drafter, stream_generate


class Session:
    """A chat session bound to one model; ``ask`` streams the reply into ``on_text``."""

    def __init__(self, model_path: str | None = None, drafter_path: str | None = "default"):
        self.model, self.tokenizer = load(model_path)
        self.drafter = None
        if drafter_path == "default":
            if model_path is None and mlx_redrafter.DEFAULT_HEAD.is_dir():
                self.drafter = load_drafter(mlx_redrafter.DEFAULT_HEAD, model=self.model)
        elif drafter_path not in (None, "none"):
            self.drafter = load_drafter(drafter_path, model=self.model)

    def ask(self, question: str, on_text: Callable[[str], bool], max_tokens: int = 128) -> dict:
        """Stream the answer; ``on_text`` returns ``False`` to stop early. Returns stats."""
        messages = [{"role": "user", "content": question}]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        response = None
        for response in stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens, drafter=self.drafter
        ):
            if not on_text(response.text):
                break
        if response is None:
            return {}
        return {
            "tokens": response.generation_tokens,
            "tokens_per_second": response.generation_tps,
            "tokens_per_step": response.tokens_per_step,
            "finish_reason": response.finish_reason,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--drafter", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    session = Session(args.model, args.drafter)
    stats = session.ask(args.prompt, Printer(), max_tokens=args.max_tokens)
    print(f"\n{stats}")


class Printer:
    """A callback that prints each piece and keeps the whole text."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, piece: str) -> bool:
        self.text += piece
        print(piece, end="", flush=True)
        return True


if __name__ == "__main__":
    main()
