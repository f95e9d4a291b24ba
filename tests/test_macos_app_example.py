"""examples/macos_app.py: one model on a worker thread serves queued, streamed, cancellable requests."""

import runpy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_models import save_tiny_model_dir

# mlx_redrafter.generate is the CLI submodule once that is imported: take the function from engine
from mlx_redrafter import load
from mlx_redrafter.engine import generate

EXAMPLE = Path(__file__).parent.parent / "examples" / "macos_app.py"
PROMPTS = ["the cat", "hello world 123", "a b c d"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def app_model_dir(tmp_path_factory) -> Path:
    """A tiny llama whose greedy replies differ from prompt to prompt (seed 3)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-app"), arch="llama", seed=3)


@pytest.fixture(scope="module")
def app(app_model_dir, head_dir):
    """The example's module, an engine serving the tiny model with a head, and direct
    AR replies to compare with."""
    module = runpy.run_path(str(EXAMPLE))
    engine = module["Engine"](str(app_model_dir), str(head_dir))
    model, tokenizer = load(str(app_model_dir))

    def direct(prompt: str, max_tokens: int = MAX_TOKENS) -> str:
        chat = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        return generate(model, tokenizer, ids, max_tokens=max_tokens)

    yield engine, direct
    engine.close()


class _Collect:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.threads: set[int] = set()

    def __call__(self, piece: str) -> None:
        self.pieces.append(piece)
        self.threads.add(threading.get_ident())


def test_queued_requests_stream_the_same_text_as_generate(app):
    engine, direct = app
    callbacks = [_Collect() for _ in PROMPTS]
    requests = [engine.submit(p, c, MAX_TOKENS) for p, c in zip(PROMPTS, callbacks, strict=True)]
    wants = [direct(p) for p in PROMPTS]
    assert len(set(wants)) == len(wants)  # a reply to the wrong prompt would show
    for request, callback, want in zip(requests, callbacks, wants, strict=True):
        stats = request.wait(timeout=60)
        assert request.text == "".join(callback.pieces) == want
        assert stats["tokens"] == len(callback.pieces) == MAX_TOKENS
        assert stats["finish_reason"] == "length"
        assert callback.threads and threading.get_ident() not in callback.threads


def test_a_cancelled_request_stops_early_and_the_next_completes(app):
    engine, direct = app
    reached, resume = threading.Event(), threading.Event()
    seen = _Collect()

    def on_text(piece: str) -> None:  # holds the worker after 3 pieces until the UI cancels
        seen(piece)
        if len(seen.pieces) == 3:
            reached.set()
            resume.wait(timeout=30)

    long = engine.submit(PROMPTS[0], on_text, max_tokens=40)
    after = engine.submit(PROMPTS[1], _Collect(), MAX_TOKENS)
    never = threading.Event()
    never.set()
    skipped = engine.submit(PROMPTS[2], _Collect(), MAX_TOKENS, stop=never)
    last = engine.submit(PROMPTS[2], _Collect(), MAX_TOKENS)
    assert reached.wait(timeout=60)
    long.cancel()  # from this (the UI) thread, while the worker streams
    resume.set()
    stats = long.wait(timeout=60)
    assert stats["finish_reason"] == "cancelled" and stats["tokens"] == 3
    assert long.text == "".join(seen.pieces) and direct(PROMPTS[0], 40).startswith(long.text)
    assert len(direct(PROMPTS[0], 40)) > len(long.text)
    assert skipped.wait(timeout=60) == {**skipped.stats, "tokens": 0, "finish_reason": "cancelled"}
    for request, prompt in ((after, PROMPTS[1]), (last, PROMPTS[2])):
        assert request.wait(timeout=60)["finish_reason"] == "length"
        assert request.text == direct(prompt)


def test_the_script_serves_three_requests_and_cancels_one(app_model_dir):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(app_model_dir), "--drafter", "none"]
        + ["--max-tokens", "12", "--cancel-after", "5"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stdout.splitlines() if " tokens, " in line]
    assert [line.split(" tok/s")[0].rsplit(",", 1)[0] for line in stats] == [
        "[0] 12 tokens, length",
        "[1] 5 tokens, cancelled",
        "[2] 12 tokens, length",
    ]
