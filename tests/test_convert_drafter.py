"""``convert drafter`` (Apple / TensorRT-LLM <-> MLX) and ``convert hf`` (mlx-lm front end)."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from test_head import make_config, mlx_logits, random_checkpoint, reference_logits, to_mx

from convert import drafter as convert_drafter_cli
from convert import hf as convert_hf_cli
from convert.drafter import MissingTorchError, convert_drafter, normalize_key
from mlx_redrafter.drafters.redrafter import ReDrafterConfig, head_from_weights, load_drafter

REPO = Path(__file__).resolve().parents[1]
# What transformers writes next to Apple's own keys in a drafter's config.json.
APPLE_EXTRAS = {
    "architectures": ["Drafter"],
    "num_lookback_tokens": -1,
    "torch_dtype": "float32",
    "transformers_version": "4.41.2",
}


def run_cli(module, argv: list[str]) -> int:
    """Parse ``argv`` with the sub-command's own parser and run it."""
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.handler is module.run
    return module.run(args)


def write_apple_checkpoint(
    path: Path, config: dict, weights: dict[str, np.ndarray], rename=lambda k: k
) -> Path:
    """An Apple-layout drafter directory written with numpy + safetensors (no torch)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {rename(k): v for k, v in weights.items()},
        str(path / "model.safetensors"),
        {"format": "pt"},
    )
    (path / "config.json").write_text(json.dumps({**config, **APPLE_EXTRAS}))
    return path


def sample_inputs(d: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``h (3, d)``, ``prev tokens (3, 2)`` and an embedding table ``(vocab, d)``."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, d)).astype(np.float32)
    h = rng.standard_normal((3, d)).astype(np.float32)
    return h, rng.integers(0, vocab, size=(3, 2)), table


APPLE_CONFIG = make_config(d=64, vocab=96, exit_dim=96, layers=2, rnn=True)


@pytest.fixture
def apple_dir(tmp_path) -> Path:
    return write_apple_checkpoint(
        tmp_path / "apple", APPLE_CONFIG, random_checkpoint(APPLE_CONFIG, 0)
    )


def trt_lm_heads(key: str) -> str:
    return key.replace("lm_head.", "lm_heads.").replace("input_proj.", "input_projs.")


def trt_sequential(key: str) -> str:
    return key.replace("lm_head.", "0.")


@pytest.mark.parametrize(
    "rename",
    [lambda k: k, trt_lm_heads, lambda k: "0." + k, trt_sequential],
    ids=["apple", "lm_heads", "0-prefix", "0-sequential"],
)
@pytest.mark.parametrize("rnn", [True, False])
def test_apple_and_trt_checkpoints_convert_to_identical_logits(tmp_path, rename, rnn: bool):
    config = make_config(d=64, vocab=96, exit_dim=96, layers=2, rnn=rnn)
    weights = random_checkpoint(config, seed=1)
    src = write_apple_checkpoint(tmp_path / "in", config, weights, rename)
    assert run_cli(convert_drafter_cli, ["drafter", str(src), str(tmp_path / "out")]) == 0
    head = load_drafter(tmp_path / "out")
    saved = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(weights)
    direct = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))
    h, prev, table = sample_inputs(64, 96)
    got = mlx_logits(head, h, prev, table)
    np.testing.assert_array_equal(got, mlx_logits(direct, h, prev, table))
    np.testing.assert_allclose(got, reference_logits(weights, config, h, prev, table), atol=1e-5)
    assert head.config.extra == APPLE_EXTRAS


def test_normalize_key_variants():
    assert normalize_key("lm_heads.1.linear.bias") == "lm_head.1.linear.bias"
    assert normalize_key("input_projs.weight") == "input_proj.weight"
    assert normalize_key("0.2.weight") == "lm_head.2.weight"
    assert normalize_key("0.rnn_u.bias") == "rnn_u.bias"
    assert normalize_key("0.lm_head.0.linear.weight") == "lm_head.0.linear.weight"
    assert normalize_key("rnn_w.weight") == "rnn_w.weight"


def test_input_proj_checkpoint_converts(tmp_path):
    config = make_config(d=16, vocab=40, exit_dim=24, layers=1, rnn=True)
    weights = random_checkpoint(config, seed=2)
    src = write_apple_checkpoint(tmp_path / "in", config, weights, trt_lm_heads)
    convert_drafter(src, tmp_path / "out", dtype="float16")
    head = load_drafter(tmp_path / "out")
    assert head.dtype == mx.float16 and head.config.has_input_proj
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    h, prev, table = sample_inputs(16, 40)
    want = reference_logits(weights, config, h, prev, table)
    np.testing.assert_allclose(mlx_logits(head, h, prev, table), want, rtol=2e-2, atol=2e-2)


def _drop(weights: dict, key: str) -> dict:
    return {k: v for k, v in weights.items() if k != key}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda w: _drop(w, "rnn_w.weight"), "missing key 'rnn_w.weight'"),
        (lambda w: _drop(w, "lm_head.2.weight"), "missing key 'lm_head.2.weight'"),
        (lambda w: {**w, "rnn_u.bias": np.zeros(63, np.float32)}, "'rnn_u.bias' has shape"),
        (
            lambda w: {**w, "lm_head.2.weight": np.zeros((95, 96), np.float32)},
            r"'lm_head.2.weight' has shape \(95, 96\), expected \(96, 96\)",
        ),
        (lambda w: {**w, "extra.weight": np.zeros(2, np.float32)}, "unexpected key 'extra.weight'"),
    ],
    ids=["missing-rnn", "missing-last", "shape-bias", "shape-vocab", "unexpected"],
)
def test_malformed_checkpoint_names_the_key(tmp_path, capsys, mutate, needle: str):
    weights = mutate(random_checkpoint(APPLE_CONFIG, seed=3))
    src = write_apple_checkpoint(tmp_path / "in", APPLE_CONFIG, weights)
    with pytest.raises(ValueError, match=needle):
        convert_drafter(src, tmp_path / "out")
    assert run_cli(convert_drafter_cli, ["drafter", str(src), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"vocab_size": 128}, "vocab_size 96 does not match the target's vocabulary size 128"),
        ({"hidden_size": 32}, "hidden_size 64 does not match the target's hidden size 32"),
    ],
)
def test_target_mismatch_names_the_dimension(tmp_path, apple_dir, capsys, overrides, needle):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 96, "hidden_size": 64, **overrides})
    )
    with pytest.raises(ValueError, match=needle):
        convert_drafter(apple_dir, tmp_path / "out", model_dir=target)
    argv = ["drafter", str(apple_dir), str(tmp_path / "o"), "--model", str(target)]
    assert run_cli(convert_drafter_cli, argv) == 2
    assert needle in capsys.readouterr().err


def test_target_model_dir_that_fits(tmp_path, apple_dir, tiny_model_dir):
    argv = ["drafter", str(apple_dir), str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    assert run_cli(convert_drafter_cli, argv) == 0
    assert load_drafter(tmp_path / "out").config.vocab_size == 96


def test_torch_checkpoint_without_torch_names_the_extra(tmp_path, monkeypatch, capsys):
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(APPLE_CONFIG))
    (src / "pytorch_model.bin").write_bytes(b"not read")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(MissingTorchError, match=r"pip install 'mlx-redrafter\[torch\]'"):
        convert_drafter(src, tmp_path / "out")
    assert run_cli(convert_drafter_cli, ["drafter", str(src), str(tmp_path / "out")]) == 2
    assert "mlx-redrafter[torch]" in capsys.readouterr().err


def test_torch_checkpoint_converts(tmp_path):
    torch = pytest.importorskip("torch")
    weights = random_checkpoint(APPLE_CONFIG, seed=4)
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(APPLE_CONFIG))
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()}
    torch.save(state, src / "model.pt")
    convert_drafter(src, tmp_path / "out")
    head = load_drafter(tmp_path / "out")
    assert head.dtype == mx.bfloat16
    want = {k: v.float().numpy() for k, v in state.items()}
    for key, value in head.checkpoint_weights().items():
        np.testing.assert_array_equal(np.array(value.astype(mx.float32)), want[key])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_apple_mlx_round_trip_is_bit_identical(tmp_path, dtype: str):
    config = make_config(d=32, vocab=50, exit_dim=40, layers=2, rnn=True)
    src = write_apple_checkpoint(tmp_path / "orig", config, random_checkpoint(config, seed=5))
    convert_drafter(src, tmp_path / "mlx", dtype=dtype)
    argv = ["drafter", "--to", "apple", str(tmp_path / "mlx"), str(tmp_path / "apple")]
    assert run_cli(convert_drafter_cli, argv) == 0
    convert_drafter(tmp_path / "apple", tmp_path / "back")
    first = (tmp_path / "mlx" / "model.safetensors").read_bytes()
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == first
    a, b = (
        mx.load(str(tmp_path / "mlx" / "model.safetensors")),
        mx.load(str(tmp_path / "back" / "model.safetensors")),
    )
    bits = mx.uint32 if dtype == "float32" else mx.uint16
    assert all(mx.array_equal(a[k].view(bits), b[k].view(bits)).item() for k in a)
    mlx_config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == mlx_config
    apple_config = json.loads((tmp_path / "apple" / "config.json").read_text())
    assert apple_config["model_type"] == "recurrent_drafting_drafter"
    assert {k: apple_config[k] for k in config} == config
    with safe_open(str(tmp_path / "apple" / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(random_checkpoint(config, seed=5))


def test_reduced_vocab_head_cannot_be_written_as_apple(tmp_path):
    config = make_config(d=8, vocab=20, exit_dim=16, layers=1, draft_vocab_size=4)
    weights = random_checkpoint(config, seed=6, draft_vocab=np.array([1, 5, 9, 3]))
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))
    from mlx_redrafter.drafters.redrafter import save_drafter

    save_drafter(head, tmp_path / "mlx")
    convert_drafter(tmp_path / "mlx", tmp_path / "mlx2")
    assert load_drafter(tmp_path / "mlx2").draft_vocab.tolist() == [1, 5, 9, 3]
    with pytest.raises(ValueError, match="draft_vocab_size 4"):
        convert_drafter(tmp_path / "mlx", tmp_path / "apple", to="apple")


def test_missing_weights_file_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(APPLE_CONFIG))
    with pytest.raises(ValueError, match="model.safetensors"):
        convert_drafter(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------ hf


def test_hf_converts_a_local_directory(tmp_path, tiny_model_dir):
    argv = ["hf", str(tiny_model_dir), str(tmp_path / "q"), "-q", "--q-group-size", "32"]
    assert run_cli(convert_hf_cli, argv) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4


def test_hf_refuses_existing_output_in_one_line(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "exists").mkdir()
    assert run_cli(convert_hf_cli, ["hf", str(tiny_model_dir), str(tmp_path / "exists")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Cannot save to the path") and "\n" not in err


def test_hf_unreachable_hub_fails_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "convert.hf", "someone/not-cached-model", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: cannot reach the Hugging Face Hub to download")
    assert "someone/not-cached-model" in err
