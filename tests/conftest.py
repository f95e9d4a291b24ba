"""Shared fixtures. ``mlx_redrafter`` is imported first so MLX binds OpenBLAS."""

import json
import sys
from pathlib import Path

import pytest

import mlx_redrafter  # noqa: F401  (must precede mlx.core)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_model_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global MLX and NumPy random state, so a draw without
    an explicit key or seed does not depend on which tests ran before."""
    import mlx.core as mx
    import numpy as np

    mx.random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny llama + byte-level tokenizer saved as an mlx-lm model directory."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1)


@pytest.fixture(scope="session")
def head_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A random (untrained) ReDrafter head for ``tiny_model_dir``, saved."""
    import mlx.core as mx

    from mlx_redrafter.drafters.redrafter import ReDrafterConfig, ReDrafterHead, save_drafter

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    mx.random.seed(0)
    head = ReDrafterHead(ReDrafterConfig(cfg["vocab_size"], cfg["hidden_size"], 96, 1))
    return save_drafter(head, tmp_path_factory.mktemp("head"))


_NETWORK_MARKERS = ("real_model",)
_network_reports: list = []


def pytest_runtest_logreport(report) -> None:
    """Collect the outcome of real-model / network tests for the summary line."""
    if not any(m in report.keywords for m in _NETWORK_MARKERS):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _network_reports.append(report)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line saying which real-model tests ran, so a green run without them shows."""
    if not _network_reports:
        return
    ran = [r.nodeid for r in _network_reports if r.outcome == "passed"]
    skipped = [r for r in _network_reports if r.outcome == "skipped"]
    failed = [r.nodeid for r in _network_reports if r.outcome == "failed"]
    terminalreporter.write_line(
        f"real-model tests: {len(ran)} passed, {len(skipped)} skipped, {len(failed)} failed"
    )
    for report in skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        terminalreporter.write_line(f"  skipped {report.nodeid}: {str(reason)[:160]}")
