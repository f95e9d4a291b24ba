"""The examples run and do what they say (on a tiny model)."""

import runpy
import subprocess
import sys
from pathlib import Path

import mlx_lm

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_generate_text_example(tiny_model_dir):
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "generate_text.py"),
            "--model",
            str(tiny_model_dir),
            "--drafter",
            "none",
            "--max-tokens",
            "12",
            "--prompt",
            "the cat",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    model, tok = mlx_lm.load(str(tiny_model_dir))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True
    )
    want = mlx_lm.generate(model, tok, prompt, max_tokens=12)
    assert out.stdout.rstrip("\n") == want.rstrip("\n")


class _StopAfter:
    def __init__(self, n: int) -> None:
        self.n = n
        self.pieces: list[str] = []

    def __call__(self, piece: str) -> bool:
        self.pieces.append(piece)
        return len(self.pieces) < self.n


def test_stream_callback_example_streams_and_stops(tiny_model_dir):
    module = runpy.run_path(str(EXAMPLES / "stream_callback.py"))
    session = module["Session"](str(tiny_model_dir), "none")
    full = _StopAfter(10**6)
    stats = session.ask("the cat", full, max_tokens=20)
    assert stats["tokens"] == 20 and stats["finish_reason"] == "length"
    early = _StopAfter(5)
    session.ask("the cat", early, max_tokens=20)
    assert early.pieces == full.pieces[:5]
