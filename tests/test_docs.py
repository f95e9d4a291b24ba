"""The README stays in step with CI and with the benchmark record.

* ``.ci/run`` runs "exactly the README's test command": the command between its markers must
  be a line of a ``bash`` block in README.md.
* The README's benchmark table is the latest entry of ``docs/benchmarks.md`` (its first
  ``## `` section): every row of the README's table appears there verbatim, and the headline
  figures of the README's opening paragraph are that entry's default row.
* Relative links in README.md and docs/ point at files that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

REPO = Path(__file__).resolve().parent.parent


def ci_test_command(ci: str) -> str:
    """The command between ``.ci/run``'s README markers."""
    block = ci.split("# --- README test command")[1].split("# ---\n")[0]
    lines = [line for line in block.splitlines()[1:] if line.strip()]
    assert len(lines) == 1, lines
    return lines[0].strip()


def bash_lines(markdown: str) -> set[str]:
    """Every line inside a fenced ``bash`` block."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return {line.strip() for block in blocks for line in block.splitlines()}


def table_rows(markdown: str) -> list[str]:
    """Markdown table body rows (``| ... |`` lines that are not the ``---`` separator)."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [row for row in rows if not set(row) <= set("|- ")]


def latest_entry(benchmarks: str) -> str:
    """The first ``## `` section of docs/benchmarks.md."""
    return benchmarks.split("\n## ")[1].split("\n## ")[0]


def readme_benchmark(readme: str) -> str:
    return readme.split("\n## Benchmark\n")[1].split("\n## ")[0]


def headline(readme: str) -> tuple[str, str]:
    """``(speed-up, tokens per step)`` quoted in the README's opening paragraph."""
    intro = readme.split("\n## ")[0]
    m = re.search(r"\*\*(\d+\.\d+x) mlx-lm's speed\*\* \((\d+\.\d+) tokens per step", intro)
    assert m, "the opening paragraph quotes no figure"
    return m.group(1), m.group(2)


def default_row(section: str) -> list[str]:
    rows = [r for r in table_rows(section) if "(default)" in r]
    assert len(rows) == 1, rows
    return [c.strip(" *") for c in rows[0].strip("|").split("|")]


def test_readme_carries_the_ci_test_command() -> None:
    command = ci_test_command((REPO / ".ci/run").read_text())
    assert command == 'pip install -e ".[test]" && python -m pytest'
    assert command in bash_lines((REPO / "README.md").read_text())


def check_benchmark(readme: str, benchmarks: str) -> None:
    """Raise ``AssertionError`` unless the README quotes the latest benchmark entry."""
    latest = latest_entry(benchmarks)
    assert "(latest)" in latest.splitlines()[0]
    rows = table_rows(readme_benchmark(readme))
    assert len(rows) >= 3
    assert all(row in latest for row in rows)
    speedup, tokens = headline(readme)
    cells = default_row(latest)
    assert speedup == cells[2].split()[0] and tokens == cells[3]
    date = re.search(r"\d{4}-\d{2}-\d{2}", latest.splitlines()[0]).group(0)
    assert date in readme.split("\n## ")[0]


def test_readme_benchmark_is_the_latest_entry() -> None:
    check_benchmark((REPO / "README.md").read_text(), (REPO / "docs/benchmarks.md").read_text())


def test_the_benchmark_check_can_fail() -> None:
    """A changed headline figure, a changed table cell or a newer entry all fail the check."""
    readme = (REPO / "README.md").read_text()
    benchmarks = (REPO / "docs/benchmarks.md").read_text()
    speedup, tokens = headline(readme)
    row = table_rows(readme_benchmark(readme))[1]
    newer = benchmarks.replace("\n## ", "\n## 2027-01-01: a newer run (latest)\n\n## ", 1)
    variants = [
        (
            readme.replace(f"**{speedup} mlx-lm's speed**", "**1.99x mlx-lm's speed**", 1),
            benchmarks,
        ),
        (readme.replace(f"({tokens} tokens per step", "(2.99 tokens per step", 1), benchmarks),
        (readme.replace(row, row.replace("|", "| 9", 2).replace("| 9", "|", 1), 1), benchmarks),
        (readme, newer),
    ]
    for wrong_readme, wrong_benchmarks in variants:
        assert (wrong_readme, wrong_benchmarks) != (readme, benchmarks)
        try:
            check_benchmark(wrong_readme, wrong_benchmarks)
        except AssertionError:
            continue
        raise AssertionError("a wrong README passed the benchmark check")


def test_relative_links_resolve() -> None:
    broken = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, broken
