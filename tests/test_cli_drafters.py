"""``--prompt-lookup`` and ``--draft-model`` on the command line and in the bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_models import byte_tokenizer, tiny_config, tiny_model

from mlx_redrafter import bench
from mlx_redrafter.generate import main as generate_main


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args], capture_output=True, text=True
    )


def _text_and_stats(stdout: str) -> tuple[str, list[str]]:
    lines = stdout.rstrip("\n").split("\n")
    first_stat = next(i for i, line in enumerate(lines) if line.startswith("Prompt: "))
    return "\n".join(lines[:first_stat]), lines[first_stat:]


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has another vocabulary (120 tokens)."""
    path = tmp_path_factory.mktemp("other-tokenizer")
    tokenizer = byte_tokenizer(vocab_size=120)
    cfg = tiny_config("llama", vocab_size=len(tokenizer))
    model = tiny_model("llama", seed=2, vocab_size=len(tokenizer))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    "flags",
    [
        ["--prompt-lookup", "--ngram", "2", "--num-draft-tokens", "4"],
        ["--prompt-lookup", "--beam-width", "2"],
        ["--draft-model", "SELF", "--num-draft-tokens", "2"],
        ["--draft-model", "OTHER", "--draft-method", "tli"],
        ["--draft-model", "OTHER", "--draft-method", "slem"],
        ["--draft-model", "OTHER", "--draft-method", "slrs"],
    ],
)
def test_cli_drafters_match_ar(tiny_model_dir, other_tokenizer_dir, flags):
    common = ["--model", str(tiny_model_dir), "--prompt", "the cat the cat", "--max-tokens", "24"]
    paths = {"SELF": str(tiny_model_dir), "OTHER": str(other_tokenizer_dir)}
    self_draft = "SELF" in flags
    flags = [paths.get(f, f) for f in flags]
    ar = _cli(*common, "--drafter", "none")
    spec = _cli(*common, *flags)
    assert ar.returncode == 0 and spec.returncode == 0, spec.stderr
    ar_text, _ = _text_and_stats(ar.stdout)
    spec_text, stats = _text_and_stats(spec.stdout)
    assert spec_text == ar_text
    assert len(stats) == 5 and stats[3].startswith("Tokens per step: ")
    if self_draft:  # the target drafting for itself: every draft accepted
        assert float(stats[3].removeprefix("Tokens per step: ")) > 2.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--drafter", "none", "--prompt-lookup"], "--drafter and --prompt-lookup"),
        (["--prompt-lookup", "--beam-length", "4"], "--num-draft-tokens K, not --beam-length"),
        (["--num-draft-tokens", "3"], "needs --prompt-lookup or --draft-model"),
        (["--prompt-lookup", "--num-draft-tokens", "0"], "must be >= 1"),
        (["--prompt-lookup", "--ngram", "0"], "ngram must be >= 1"),
        (["--draft-model", "SELF", "--beam-width", "2"], "beam width 1"),
        (["--draft-model", "OTHER"], "tokenizer differs"),
        (["--prompt-lookup", "--draft-method", "tli"], "--draft-method needs --draft-model"),
        (["--drafter", "none", "--lookup-beams", "-1"], "--lookup-beams must be >= 0"),
        (["--prompt-lookup", "--lookup-beams", "1"], "--lookup-beams adds prompt lookup"),
        (
            ["--drafter", "none", "--acceptance", "redrafter", "--lookup-beams", "1"],
            "use --lookup-beams 0",
        ),
    ],
)
def test_cli_drafter_errors_are_one_clear_line(
    tiny_model_dir, other_tokenizer_dir, flags, message, capsys
):
    """In process (``generate.main``) for speed; the subprocess path is tested above."""
    paths = {"SELF": str(tiny_model_dir), "OTHER": str(other_tokenizer_dir)}
    flags = [paths.get(f, f) for f in flags]
    assert generate_main(["--model", str(tiny_model_dir), "--max-tokens", "4", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_prompt_lookup_and_draft_model_are_exclusive(tiny_model_dir):
    out = _cli("--model", str(tiny_model_dir), "--prompt-lookup", "--draft-model", "x")
    assert out.returncode == 2 and "not allowed with" in out.stderr


def test_bench_runs_them_as_methods(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat"}\n{"prompt": "hello world"}\n')
    out = tmp_path / "out"
    argv = [
        "--model",
        str(tiny_model_dir),
        "--drafter",
        "none",
        "--prompts",
        str(prompts),
        "--max-tokens",
        "12",
        "--draft-model",
        str(tiny_model_dir),
        "--prompt-lookup",
        "--num-draft-tokens",
        "2",
        "--out",
        str(out),
        "--profile-prompts",
        "1",
    ]
    assert bench.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["summary"]}
    assert {"draft model W1 L3", "prompt lookup W1 L3", "mlx-lm draft model (k=2)"} <= set(rows)
    assert rows["draft model W1 L3"]["mismatches"] == 0
    assert rows["prompt lookup W1 L3"]["mismatches"] == 0
    assert rows["draft model W1 L3"]["tokens_per_step"] > 2.5


def test_bench_runs_several_draft_methods_interleaved(
    tiny_model_dir, other_tokenizer_dir, tmp_path
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat"}\n')
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--drafter", "none", "--prompts", str(prompts)]
    argv += ["--max-tokens", "10", "--draft-model", str(other_tokenizer_dir)]
    argv += ["--draft-method", "tli,slrs", "--num-draft-tokens", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["summary"]}
    for method in ("draft model (tli) W1 L3", "draft model (slrs) W1 L3"):
        assert rows[method]["mismatches"] == 0


def test_bench_refuses_an_unknown_draft_method(tiny_model_dir, capsys):
    argv = ["--model", str(tiny_model_dir), "--prompts", "x.jsonl", "--draft-method", "tli,slrx"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "unknown draft method slrx" in err[-1], err
