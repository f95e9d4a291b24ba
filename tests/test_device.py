"""The Mac path's device rules: CPU-only kernels are gated by the device both ways, profiles
are keyed by device and dtype, GGUF imports on a Mac avoid float16 where it overflows."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_models import tiny_model

from mlx_redrafter import device, fast_math, models, profile, tune
from mlx_redrafter.target import Target
from mlx_redrafter.train import eagle_fit, fast_ops, native_attention

GPU = mx.Device(mx.gpu)


@pytest.fixture
def on_gpu(monkeypatch):
    """MLX's default device reported as a GPU (there is none here: only the gate is tested)."""
    monkeypatch.setattr(mx, "default_device", lambda: GPU)
    monkeypatch.setattr(
        mx, "device_info", lambda: {"device_name": "Apple M2 Max", "memory_size": 32 * 2**30}
    )


def test_on_cpu_follows_the_default_device(on_gpu) -> None:
    assert not device.on_cpu()
    assert device.description() == "gpu: Apple M2 Max, 32 GB"


def test_fast_ops_are_swapped_in_on_the_cpu_only(monkeypatch) -> None:
    model = tiny_model("llama", seed=0)
    module = sys.modules[type(model).__module__]
    original = module.swiglu
    with fast_ops.installed(model):
        assert module.swiglu is fast_ops.fast_swiglu
    assert module.swiglu is original
    monkeypatch.setattr(mx, "default_device", lambda: GPU)
    with fast_ops.installed(model):
        assert module.swiglu is original
        assert module.scaled_dot_product_attention is fast_ops._original_sdpa


def _spy(monkeypatch, owner, name: str) -> list:
    calls: list = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_fast_exp_and_logsumexp_on_the_cpu_mlx_ops_on_a_gpu(monkeypatch) -> None:
    x = mx.random.normal((3, 50)) * 4
    x = mx.concatenate([x, mx.full((1, 50), -mx.inf)])
    want = mx.logsumexp(x, axis=-1, keepdims=True)
    fast = _spy(monkeypatch, fast_math, "_logsumexp")
    fast_exp = _spy(monkeypatch, fast_math, "exp_ops")
    np.testing.assert_allclose(fast_math.logsumexp(x), want, rtol=1e-6)
    assert len(fast) == 1
    before = len(fast_exp)
    mx.eval(fast_math.exp(x))
    assert len(fast_exp) == before + 1
    monkeypatch.setattr(mx, "default_device", lambda: GPU)
    np.testing.assert_allclose(fast_math.logsumexp(x), want, rtol=1e-6)
    np.testing.assert_allclose(fast_math.exp(x[:3]), mx.exp(x[:3]), rtol=1e-6)
    assert len(fast) == 1 and len(fast_exp) == before + 1  # not called on the "GPU"


def test_native_attention_and_trainer_kernels_are_cpu_only(monkeypatch) -> None:
    monkeypatch.setattr(native_attention, "_load", lambda: object())  # as if built
    assert native_attention.available()
    assert eagle_fit.device_kernels() == (eagle_fit.softmax, eagle_fit.cross_entropy)
    monkeypatch.setattr(mx, "default_device", lambda: GPU)
    assert not native_attention.available()
    softmax, cross_entropy = eagle_fit.device_kernels()
    assert softmax is not eagle_fit.softmax and cross_entropy is not eagle_fit.cross_entropy
    logits, labels = mx.random.normal((4, 9)), mx.array([0, 3, 8, 2])
    np.testing.assert_allclose(softmax(logits), eagle_fit.softmax(logits), rtol=1e-5)
    np.testing.assert_allclose(
        cross_entropy(logits, labels), eagle_fit.cross_entropy(logits, labels), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("dtype", "bits", "expected"),
    [
        ("float32", None, "float32"),
        ("float16", None, "float16"),
        ("bfloat16", None, "bfloat16"),
        ("float16", 4, "q4-float16"),
        ("bfloat16", 8, "q8-bfloat16"),
    ],
)
def test_weights_dtype_names_the_models_weights(dtype, bits, expected) -> None:
    model = tiny_model("llama", seed=0)
    model.set_dtype(models.DTYPES[dtype])
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    assert models.weights_dtype(model) == expected


def test_profiles_are_keyed_by_device_and_dtype(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    fp16 = profile.setup_key(None, None, dtype="float16")
    fp32 = profile.setup_key(None, None, dtype="float32")
    assert fp16 != fp32
    profile.save_profile(fp16, 4, 5, 1)
    assert profile.tuned_shape(fp16) == (4, 5) and profile.tuned_shape(fp32) is None
    here = profile.profile_path(fp16)
    assert device.cpu_model().replace(" ", "-").split("(")[0].strip("-") in here.name
    monkeypatch.setattr(mx, "default_device", lambda: GPU)
    monkeypatch.setattr(
        mx, "device_info", lambda: {"device_name": "Apple M3", "memory_size": 2**34}
    )
    assert (
        profile.profile_path(fp16) != here and "Apple-M3-16-GB" in profile.profile_path(fp16).name
    )
    assert profile.tuned_shape(fp16) is None  # the CPU's shape is not the GPU's


def test_generate_reads_the_profile_of_the_loaded_models_dtype(tmp_path, monkeypatch) -> None:
    from mlx_redrafter import cli

    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    args = SimpleNamespace(model=None, drafter=None, temp=0.0, beam_width=None, beam_length=None)
    profile.save_profile(profile.setup_key(None, None, dtype="float16"), 3, 6)
    assert cli.beam_shape(args, "float16") == (3, 6)
    assert cli.beam_shape(args, "q4-float16") == cli.DEFAULT_SHAPE


def test_tune_times_the_draft_in_the_models_dtype() -> None:
    seen = []

    class Recorder:
        def propose(self, context, width, length):
            seen.append(context.hidden.dtype)
            return SimpleNamespace(beams=mx.zeros((width, length), dtype=mx.int32))

    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        model = tiny_model("llama", seed=0)
        model.set_dtype(dtype)
        tune.draft_cost(Recorder(), Target(model), 1, 2, repeats=1)
        assert set(seen) == {dtype}
        seen.clear()


def test_doctor_prints_device_dtype_and_shape(tmp_path, monkeypatch, capsys) -> None:
    from mlx_redrafter import doctor

    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    print(doctor.tuned_line())
    profile.save_profile(profile.setup_key(None, None, dtype=device.default_dtype()), 2, 3, 0)
    print(doctor.tuned_line())
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("beam shape: W1 L4 + 1 lookup beam(s), built-in")
    assert second.startswith("beam shape: W2 L3 + 0 lookup beam(s), tuned")


# -- float16 overflow -------------------------------------------------------------------------


def _overflowing_gemma3() -> nn.Module:
    """A tiny gemma3_text model whose residual stream passes float16's 65,504, as the real
    Gemma-3-270M's does (its peak is ~104,000 in float32; docs/mac.md)."""
    model = tiny_model("gemma3_text", seed=0)
    for layer in model.model.layers:
        norm = layer.post_feedforward_layernorm
        norm.weight = mx.full(norm.weight.shape, 20000.0)
    mx.eval(model.parameters())
    return model


def test_gemma3_style_activations_overflow_float16_not_bfloat16() -> None:
    """mlx-lm clips Gemma's float16 residual stream at 65,504: no inf, but wrong numbers;
    bfloat16 has float32's range and stays close to the float32 logits."""
    model = _overflowing_gemma3()
    ids = mx.array([[1, 5, 9, 14, 20, 33]])
    peak, logits = {}, {}
    for name in ("float32", "bfloat16", "float16"):
        dtype = models.DTYPES[name]
        model.set_dtype(dtype)
        hidden = model.model.embed_tokens(ids) * mx.array(model.args.hidden_size**0.5, dtype)
        peaks = []
        for layer in model.model.layers:
            hidden = layer(hidden, "causal", None)
            peaks.append(float(mx.abs(hidden.astype(mx.float32)).max()))
        peak[name] = max(peaks)
        logits[name] = model(ids).astype(mx.float32)
        model.set_dtype(mx.float32)
    assert peak["float32"] > 65504 and peak["bfloat16"] > 65504 >= peak["float16"], peak
    error = {n: float(mx.abs(logits[n] - logits["float32"]).max()) for n in ("bfloat16", "float16")}
    assert error["float16"] > 5 * error["bfloat16"], error
    assert device.safe_dtype("float16", "gemma3") == "bfloat16"
    assert device.safe_dtype("float16", "gemma3_text") == "bfloat16"
    assert device.safe_dtype("float16", "llama") == "float16"
    assert device.safe_dtype("float32", "gemma3") == "float32"


def test_gguf_imports_pick_a_dtype_that_cannot_overflow(tmp_path, monkeypatch) -> None:
    from test_gguf import tiny_weights as _  # noqa: F401  (fixture module)
    from test_gguf import write_tiny_llama_gguf

    llama = tmp_path / "llama.gguf"
    write_tiny_llama_gguf(llama)
    gemma = tmp_path / "gemma.gguf"
    gemma.write_bytes(llama.read_bytes())

    class Header:
        def __init__(self, arch: str):
            self.architecture = arch

    import convert.gguf as gguf_module

    real = gguf_module.read_gguf
    monkeypatch.setattr(
        gguf_module,
        "read_gguf",
        lambda p: Header("gemma3") if Path(p).name == "gemma.gguf" else real(p),
    )
    assert models.gguf_dtype(llama) == "float32"  # Linux: float32 whatever the file
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert models.gguf_dtype(llama) == "float16"
    assert models.gguf_dtype(gemma) == "bfloat16"


def test_ci_macos_pass_turns_the_linux_pieces_off() -> None:
    """`.ci/mac` (CI's second pass) fakes macOS in every process: the library's OpenBLAS
    loader, heap tuning and native kernel stay off; the profile key says Darwin."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = (
        "import platform, mlx_redrafter\n"
        "from mlx_redrafter import profile\n"
        "from mlx_redrafter.train import native_attention\n"
        "print(platform.system(), mlx_redrafter.BLAS.provider, mlx_redrafter.MALLOC_TUNED,"
        " native_attention.available(), profile.device_key().split('-')[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root / ".ci" / "mac")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Darwin", "None", "False", "False", "Darwin"]
