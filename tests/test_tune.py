"""``bench --tune``: the speed prediction, the candidates and the profile ``generate`` reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import pytest

from mlx_redrafter import cli, profile
from mlx_redrafter import tune as tune_module
from mlx_redrafter.drafters import load_drafter
from mlx_redrafter.models import load
from mlx_redrafter.prompts import chat_tokens
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tune import WIDE_PROBE_SIZE, predict_speedup, tune, widths_to_try


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty ``$MLX_REDRAFTER_HOME`` (no saved profile)."""
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tune_tiny(model_dir, head_dir, texts: list[str], temp: float, **options) -> dict:
    """Run :func:`tune` for the tiny model and head on ``texts`` (chat-templated)."""
    model, tokenizer = load(str(model_dir))
    head = load_drafter(head_dir, model)
    prompts = [chat_tokens(tokenizer, t) for t in texts]
    return tune(model, tokenizer, head, prompts, SamplingParams(temp=temp), **options)


def test_prediction_interpolates_the_verify_cost():
    costs = {1: 0.10, 2: 0.12, 4: 0.16}
    # N = 3 costs 0.14 (between 2 and 4), plus 0.02 of drafting: 2 tokens per 1.6 AR steps
    assert predict_speedup(2.0, 3.0, 0.02, costs) == pytest.approx(2.0 / 1.6)
    assert predict_speedup(2.0, 9.0, 0.0, costs) == pytest.approx(2.0 / 1.6)  # held at N = 4
    assert predict_speedup(1.0, 1.0, 0.0, costs) == pytest.approx(1.0)


def test_wide_beams_join_only_where_tree_forwards_are_cheap():
    cheap = {1: 0.10, WIDE_PROBE_SIZE: 0.15}
    dear = {1: 0.10, WIDE_PROBE_SIZE: 0.25}
    assert widths_to_try([1, 2, 4], cheap) == [1, 2, 4, 8, 16]
    assert widths_to_try([4, 1], dear) == [1, 4]
    assert widths_to_try([1], {1: 0.10, WIDE_PROBE_SIZE: 0.20}) == [1]  # 2 steps: no gain


@pytest.mark.parametrize(("per_token", "expected"), [(1e-4, [1, 8, 16]), (1e-2, [1])])
def test_tune_explores_wide_beams_from_the_probe(
    home, tiny_model_dir, head_dir, monkeypatch, per_token, expected
):
    """With ``explore_wide`` the candidates follow the measured cost of a tree forward."""

    def fake_costs(target, sizes, context=256, repeats=5):
        return {n: 0.01 + per_token * (n - 1) for n in sizes}

    monkeypatch.setattr(tune_module, "verify_costs", fake_costs)
    report = tune_tiny(
        tiny_model_dir,
        head_dir,
        ["a b c a b c", "hello hello", "x y z"],
        0.0,
        widths=[1],
        lengths=[2],
        max_tokens=6,
        setup=profile.setup_key(str(tiny_model_dir), str(head_dir)),
        explore_wide=True,
    )
    assert report["beam_widths"] == expected
    assert sorted(c["beam_width"] for c in report["candidates"]) == expected


def test_profile_supplies_the_defaults_flags_override(home, tmp_path):
    args = SimpleNamespace(beam_width=None, beam_length=None, model=None, drafter=None)
    setup = profile.setup_key(None, None)
    assert setup == profile.setup_key(None, "default")
    assert cli.beam_shape(args) == cli.DEFAULT_SHAPE
    assert cli.lookup_beams_for(None, "exact", setup) == cli.DEFAULT_LOOKUP_BEAMS
    profile.save_profile(setup, 3, 5, 2, t_ar_ms=1.0)
    assert cli.beam_shape(args) == (3, 5)
    assert cli.beam_shape(SimpleNamespace(**{**vars(args), "beam_width": 1})) == (1, 5)
    assert cli.lookup_beams_for(None, "exact", setup) == 2
    assert cli.lookup_beams_for(0, "exact", setup) == 0
    assert cli.lookup_beams_for(None, "redrafter", setup) == 0
    # a profile is for one model and drafter: another model gets the built-in defaults
    other = SimpleNamespace(**{**vars(args), "model": str(tmp_path)})
    assert cli.beam_shape(other) == cli.DEFAULT_SHAPE
    assert profile.tuned_lookup_beams(profile.setup_key(str(tmp_path), None)) is None
    profile.profile_path(setup).write_text("{not json")
    assert profile.tuned_shape(setup) is None and profile.tuned_lookup_beams(setup) is None


def test_sampling_has_its_own_profile_and_default(home):
    """A greedy profile is not applied to sampled decoding (nor the reverse)."""
    greedy = SimpleNamespace(beam_width=None, beam_length=None, model=None, drafter=None, temp=0.0)
    sampled = SimpleNamespace(**{**vars(greedy), "temp": 0.7})
    assert profile.setup_key(None, None, True) != profile.setup_key(None, None)
    assert cli.beam_shape(sampled) == cli.DEFAULT_SAMPLING_SHAPE != cli.DEFAULT_SHAPE
    profile.save_profile(profile.setup_key(None, None), 2, 5, 1)
    assert cli.beam_shape(greedy) == (2, 5)
    assert cli.beam_shape(sampled) == cli.DEFAULT_SAMPLING_SHAPE
    profile.save_profile(profile.setup_key(None, None, True), 1, 2, 0)
    assert cli.beam_shape(sampled) == (1, 2) and cli.beam_shape(greedy) == (2, 5)


def test_tune_covers_every_candidate_and_saves_the_confirmed_best(
    home,
    tiny_model_dir,
    head_dir,
):
    texts = ["the cat sat on the mat, the cat sat on the", "a b c a b c a b", "hello hello"]
    mx.random.seed(0)
    report = tune_tiny(
        tiny_model_dir,
        head_dir,
        texts,
        0.0,
        widths=[1, 2],
        lengths=[3],
        max_tokens=10,
        lookup_beams=[0, 1],
        setup=profile.setup_key(str(tiny_model_dir), str(head_dir)),
    )
    cands = report["candidates"]
    assert {(c["beam_width"], c["lookup_beams"]) for c in cands} == {(1, 0), (2, 0), (1, 1), (2, 1)}
    predicted = [c["predicted_speedup"] for c in cands]
    assert predicted == sorted(predicted, reverse=True)
    confirmed = [c for c in cands if "measured_speedup" in c]
    assert len(confirmed) == 2 and confirmed == cands[:2]
    best = max(confirmed, key=lambda c: c["measured_speedup"])
    setup = profile.setup_key(str(tiny_model_dir), str(head_dir))
    saved = json.loads(profile.profile_path(setup).read_text())
    assert (saved["beam_width"], saved["beam_length"], saved["lookup_beams"]) == (
        best["beam_width"],
        best["beam_length"],
        best["lookup_beams"],
    )
    by_key = {(c["beam_width"], c["lookup_beams"]): c for c in cands}
    # lookup beams only ever add tokens to the tree
    assert by_key[(1, 1)]["tree_size"] >= by_key[(1, 0)]["tree_size"]
    assert by_key[(2, 0)]["tree_size"] > by_key[(1, 0)]["tree_size"]
    largest = int(max(report["verify_cost_vs_ar"], key=int))
    assert largest == (2 + 1) * 3  # verify costs measured up to the widest combined tree
    assert cli.lookup_beams_for(None, "exact", setup) == best["lookup_beams"]
    assert cli.lookup_beams_for(None, "exact") == cli.DEFAULT_LOOKUP_BEAMS


def test_tune_at_a_temperature_saves_the_sampling_profile(home, tiny_model_dir, head_dir):
    """Sampling (the head's chain sampled at W = 1) tunes and saves apart from greedy."""
    mx.random.seed(0)
    sampling = profile.setup_key(str(tiny_model_dir), str(head_dir), True)
    report = tune_tiny(
        tiny_model_dir,
        head_dir,
        ["a b c a b c a b", "hello hello"],
        1.0,
        widths=[1],
        lengths=[2, 3],
        max_tokens=8,
        lookup_beams=[0, 1],
        setup=sampling,
    )
    assert len(report["candidates"]) == 4
    assert profile.tuned_shape(sampling) is not None
    assert profile.tuned_shape(profile.setup_key(str(tiny_model_dir), str(head_dir))) is None
