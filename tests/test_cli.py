"""The generate CLI with a draft head: same text as AR, the extra stats lines, clear errors."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from tiny_models import tiny_config

from mlx_redrafter.drafters.redrafter import ReDrafterConfig, ReDrafterHead, save_drafter


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args], capture_output=True, text=True
    )


def _text_and_stats(stdout: str) -> tuple[str, list[str]]:
    lines = stdout.rstrip("\n").split("\n")
    first_stat = next(i for i, line in enumerate(lines) if line.startswith("Prompt: "))
    return "\n".join(lines[:first_stat]), lines[first_stat:]


PROMPT = ["--prompt", "the cat", "--max-tokens", "24"]


@pytest.fixture(scope="module")
def looping_head_dir(tmp_path_factory, tiny_model_dir):
    """A head that drafts mostly the token the tiny model repeats after ``PROMPT`` (so its
    drafts are accepted, unlike a random head's): constant features into an output layer
    favouring that token."""
    from collections import Counter

    from transformers import AutoTokenizer

    ar = _cli("--model", str(tiny_model_dir), *PROMPT, "--drafter", "none")
    text, _ = _text_and_stats(ar.stdout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loop_token, count = Counter(tokenizer.encode(text)).most_common(1)[0]
    assert count >= 20  # tiny random models loop: the premise of this head
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    head = ReDrafterHead(ReDrafterConfig(cfg["vocab_size"], cfg["hidden_size"], 96, 1))
    out = mx.random.normal((cfg["vocab_size"], 96), key=mx.random.key(0)) * 0.01
    head.input_proj.weight = mx.zeros_like(head.input_proj.weight)
    head.input_proj.bias = mx.ones((96,))
    head.lm_head[0].linear.weight = mx.zeros((96, 96))
    head.lm_head[0].linear.bias = mx.zeros((96,))
    head.lm_head[-1].weight = out.at[loop_token].add(0.05)
    mx.eval(head.parameters())
    return save_drafter(head, tmp_path_factory.mktemp("looping-head"))


@pytest.mark.parametrize(
    "lookup", [[], ["--lookup-beams", "0"], ["--lookup-beams", "2", "--ngram", "2"]]
)
def test_speculative_cli_matches_ar_and_reports_steps(tiny_model_dir, looping_head_dir, lookup):
    common = ["--model", str(tiny_model_dir), *PROMPT]
    ar = _cli(*common, "--drafter", "none")
    shape = ["--beam-width", "3", "--beam-length", "4"]
    spec = _cli(*common, "--drafter", str(looping_head_dir), *shape, *lookup)
    assert ar.returncode == 0 and spec.returncode == 0, spec.stderr
    ar_text, ar_stats = _text_and_stats(ar.stdout)
    spec_text, spec_stats = _text_and_stats(spec.stdout)
    assert spec_text == ar_text
    assert len(ar_stats) == 3 and len(spec_stats) == 5
    assert spec_stats[1].startswith("Generation: 24 tokens, ")
    # 23 tokens after the prompt pass: at most 4 per step, 1 when nothing is accepted
    per_step = float(spec_stats[3].removeprefix("Tokens per step: "))
    assert 2.0 < per_step <= 4.0
    depths = [float(a) for a in spec_stats[4].removeprefix("Acceptance by depth: ").split()]
    assert len(depths) == 3 and 1.0 >= depths[0] >= depths[1] >= depths[2] > 0.5


def test_mismatched_drafter_is_one_clear_line(tmp_path, tiny_model_dir):
    vocab = tiny_config("llama")["vocab_size"]
    head = ReDrafterHead(ReDrafterConfig(vocab + 7, 64, 96, 1))
    save_drafter(head, tmp_path / "bad")
    out = _cli("--model", str(tiny_model_dir), "--drafter", str(tmp_path / "bad"))
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "vocab" in err[0]


def test_missing_drafter_is_one_clear_line(tmp_path, tiny_model_dir):
    out = _cli("--model", str(tiny_model_dir), "--drafter", str(tmp_path / "none-here"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: drafter not found: {tmp_path / 'none-here'}"


def test_bench_runs_the_head_with_and_without_lookup_beams(tiny_model_dir, head_dir, tmp_path):
    from mlx_redrafter import bench

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat, the cat"}\n{"prompt": "hello"}\n')
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--drafter", str(head_dir), "--prompts", str(prompts)]
    argv += ["--max-tokens", "12", "--beam-width", "1", "--beam-length", "3", "--skip-ours-ar"]
    argv += ["--lookup-beams", "0,1", "--out", str(out), "--profile-prompts", "1"]
    assert bench.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["summary"]}
    assert {"ReDrafter W1 L3", "ReDrafter + lookup 1 W1 L3"} <= set(rows)
    assert all(r["mismatches"] == 0 for r in rows.values())
    assert bench.main([*argv[:-4], "--lookup-beams", "-1", "--out", str(out)]) == 2


def test_bench_interleaves_several_heads_in_one_run(tiny_model_dir, head_dir, tmp_path, capsys):
    """``--drafter A,B``: each head is a method of the same interleaved run, named by its
    directory; naming one twice, or tuning more than one, is refused."""
    import mlx.core as mx

    from mlx_redrafter import bench
    from mlx_redrafter.drafters.parallel import ParallelConfig, ParallelHead, save_head

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    mx.random.seed(1)
    parallel = ParallelHead(ParallelConfig(cfg["vocab_size"], cfg["hidden_size"], 3, num_heads=2))
    parallel_dir = save_head(parallel, tmp_path / "par-head")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat, the cat"}\n{"prompt": "hello"}\n')
    out = tmp_path / "out"
    heads = f"{head_dir},{parallel_dir}"
    argv = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-tokens", "10"]
    argv += ["--beam-width", "1", "--beam-length", "3", "--skip-ours-ar", "--out", str(out)]
    argv += ["--profile-prompts", "1", "--lookup-beams", "0"]
    assert bench.main([*argv, "--drafter", heads]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in report["summary"]}
    want = {f"ReDrafter ({head_dir.name}) W1 L3", "ParallelSpec (par-head) W1 L3"}
    assert want <= set(rows) and all(r["mismatches"] == 0 for r in rows.values())
    # interleaved: every prompt ran every method
    per_prompt = {(r["prompt"], r["method"]) for r in report["runs"]}
    assert len(per_prompt) == 2 * len(rows)
    capsys.readouterr()
    assert bench.main([*argv, "--drafter", f"{parallel_dir},{parallel_dir}"]) == 2
    assert "named twice" in capsys.readouterr().err
    assert bench.main([*argv, "--drafter", heads, "--tune"]) == 2
    assert "--tune: give one --drafter" in capsys.readouterr().err
