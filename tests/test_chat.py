"""``python -m mlx_redrafter.chat`` driven through its standard input.

The replies equal what ``generate`` gives for the whole conversation rendered with the chat
template (greedy), the second turn reuses the first turn's cache, ``/reset`` starts over
and ``/quit`` leaves."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model_dir

from mlx_redrafter import chat
from mlx_redrafter.engine import generate
from mlx_redrafter.models import load

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--prompt-lookup", "--num-draft-tokens", "3", "--max-tokens", "12"]
BANNER = "Chat (/stats, /reset, /quit).\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("chat") / "tiny", seed=7)


def _drive(monkeypatch, capsys, argv: list[str], lines: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = chat.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected(model_dir: Path, turns: list[str]) -> list[str]:
    """Each reply as ``generate`` (AR) writes it for the conversation so far."""
    model, tokenizer = load(str(model_dir))
    messages, replies = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        replies.append(generate(model, tokenizer, prompt, max_tokens=12))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_replies_equal_generate_over_the_whole_conversation(model_dir, monkeypatch, capsys):
    turns = ["the cat sat", "hello world", "a b c"]
    code, out, _ = _drive(
        monkeypatch, capsys, ["--model", str(model_dir), *FLAGS], [*turns, "/quit"]
    )
    replies = _expected(model_dir, turns)
    assert code == 0
    assert out == BANNER + "".join(f">> {r}\n" for r in replies) + ">> \n"


def test_stats_show_the_cache_reused_and_reset_forgets_it(model_dir, monkeypatch, capsys):
    lines = ["the cat sat", "/stats", "hello world", "/stats", "/reset", "the cat sat", "/stats"]
    code, out, _ = _drive(monkeypatch, capsys, ["--model", str(model_dir), *FLAGS], lines)
    assert code == 0  # end of input leaves like /quit
    reused = [int(n) for n in re.findall(r"^Prompt cache: (\d+) tokens reused$", out, re.M)]
    prompts = [int(n) for n in re.findall(r"Prompt: (\d+) tokens", out)]
    assert len(reused) == len(prompts) == 3 and "(new conversation)" in out
    assert reused[0] == 0 and reused[2] == 0  # a first turn, and the first after /reset
    # turn 2 reads only what follows turn 1 (turn 1's prompt and its reply are reused)
    assert reused[1] >= prompts[0] and prompts[1] < prompts[0] + reused[1]
    assert prompts[2] == prompts[0]
    assert re.search(r"^Tokens per step: [0-9.]+$", out, re.M)
    replies = re.findall(r"^>> (.*)$", out, re.M)
    assert replies[5] == replies[0]  # after /reset, the same first turn, the same reply


def test_bad_flags_exit_2_with_one_line(monkeypatch, capsys):
    code, out, err = _drive(monkeypatch, capsys, ["--max-tokens", "0"], [])
    assert code == 2 and err.strip().splitlines() == [
        "error: --max-tokens must be non-zero (-1 for no limit)"
    ]


def test_module_runs_from_the_command_line(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.chat", "--model", str(model_dir), *FLAGS],
        input="the cat sat\n/quit\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == BANNER + f">> {_expected(model_dir, ['the cat sat'])[0]}\n>> \n"
