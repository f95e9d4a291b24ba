"""Prompt files and the benchmark's category-balanced subset."""

from __future__ import annotations

import json

import pytest

from mlx_redrafter.prompts import Prompt, balanced_subset, load_prompts

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mt_bench_and_plain_records_are_read(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question_id": 81, "category": "writing", "turns": ["first", "second"]},
            {"prompt": "plain"},
            {"text": "t", "id": "x"},
        ],
    )
    prompts = load_prompts(path)
    assert prompts == [
        Prompt("first", "writing", "81"),
        Prompt("plain", "all", "2"),
        Prompt("t", "all", "x"),
    ]


def test_bad_lines_name_the_line(tmp_path):
    broken = tmp_path / "a.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=":2: not valid JSON"):
        load_prompts(broken)
    path = write_jsonl(tmp_path / "b.jsonl", [{"question": "no prompt field"}])
    with pytest.raises(ValueError, match=":1: no 'prompt'"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(tmp_path / "missing.jsonl")


def test_balanced_subset_takes_every_category_in_turn():
    prompts = [Prompt(f"{c}{i}", c, f"{c}{i}") for c in "abc" for i in range(4)]
    subset = balanced_subset(prompts, 7)
    counts = {c: sum(p.category == c for p in subset) for c in "abc"}
    assert counts == {"a": 3, "b": 2, "c": 2}
    assert [p.id for p in subset] == ["a0", "a1", "a2", "b0", "b1", "c0", "c1"]
    assert balanced_subset(prompts, None) == prompts
    assert balanced_subset(prompts, 100) == prompts
    one_category = [Prompt(str(i)) for i in range(5)]
    assert balanced_subset(one_category, 2) == one_category[:2]
