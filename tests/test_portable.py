"""The ``portable`` marker's claim holds: those test modules run the same library code on
Linux and on macOS, so CI's macOS pass (``.ci/run``, ``.ci/mac/``) may leave them out.

The library reads the operating system in a few reviewed modules only (OpenBLAS loading,
heap tuning, the device description and default dtype, the doctor, the native training
kernel). A ``portable`` test module may not import those, nor the modules built on them
(training kernels and feature extraction, the CLIs, tuning profiles), nor start
subprocesses (a CLI run imports the whole package as the user's machine sees it). A new
place that reads the OS fails the first test: review which test modules stay portable,
then update the set.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OS_READS = re.compile(r"platform\.(system|machine|mac_ver|release)|sys\.platform|os\.uname")
#: Library files that read the operating system (reviewed).
READS_THE_OS = {
    "mlx_redrafter/_blas.py",
    "mlx_redrafter/_malloc.py",
    "mlx_redrafter/device.py",
    "mlx_redrafter/doctor.py",
    "mlx_redrafter/train/native_attention.py",
}
#: What a portable test module may not import: the files above and what builds on them
#: in a platform-dependent way.
NOT_PORTABLE = {
    "mlx_redrafter._blas",
    "mlx_redrafter._malloc",
    "mlx_redrafter.device",
    "mlx_redrafter.doctor",
    "mlx_redrafter.default_model",
    "mlx_redrafter.profile",
    "mlx_redrafter.tune",
    "mlx_redrafter.cli",
    "mlx_redrafter.bench",
    "mlx_redrafter.train.native_attention",
    "mlx_redrafter.train.fast_ops",
    "mlx_redrafter.train.batch_generate",
    "mlx_redrafter.train.sequence_features",
    "mlx_redrafter.train.distill",
    "mlx_redrafter.train.score",
    "mlx_redrafter.train.features",
    "subprocess",
}


def os_reading_files() -> set[str]:
    found = set()
    for package in ("mlx_redrafter", "convert"):
        for path in (REPO / package).rglob("*.py"):
            if OS_READS.search(path.read_text()):
                found.add(path.relative_to(REPO).as_posix())
    return found


def portable_modules() -> list[Path]:
    return sorted(
        p
        for p in (REPO / "tests").glob("test_*.py")
        if re.search(r"^pytestmark = pytest\.mark\.portable$", p.read_text(), re.M)
    )


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` anywhere in ``path`` names (and, for
    ``from a import b``, ``a.b`` too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_library_reads_the_os_only_where_reviewed():
    assert os_reading_files() == READS_THE_OS


def test_portable_modules_import_nothing_platform_dependent():
    modules = portable_modules()
    assert len(modules) >= 20  # the marker is in use (the macOS pass depends on it)
    offending = {p.name: sorted(imported_names(p) & NOT_PORTABLE) for p in modules}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_check_catches_a_platform_dependent_import(tmp_path):
    fake = tmp_path / "test_fake.py"
    fake.write_text("import pytest\nfrom mlx_redrafter.train import fast_ops\n")
    assert imported_names(fake) & NOT_PORTABLE == {"mlx_redrafter.train.fast_ops"}
    fake.write_text("def f():\n    import subprocess\n")
    assert imported_names(fake) & NOT_PORTABLE == {"subprocess"}


def test_the_macos_pass_leaves_out_only_portable_and_slow_tests():
    run = (REPO / ".ci" / "run").read_text()
    line = next(x for x in run.splitlines() if "PYTHONPATH" in x and "pytest" in x)
    assert '-m "not slow and not real_model and not portable"' in line


@pytest.mark.parametrize("marker", ["portable", "slow", "real_model"])
def test_markers_are_registered(marker):
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'^\s+"{marker}: ', text, re.M)
