"""Rebuild a GGUF file's tokenizer as a ``tokenizers`` ``tokenizer.json`` plus
``tokenizer_config.json``: a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) from
``tokenizer.ggml.tokens`` / ``merges`` with the pre-tokenizer llama.cpp uses for
``tokenizer.ggml.pre``; SentencePiece vocabularies (``"llama"``, e.g. Gemma) through
transformers' GGUF tokenizer converter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from convert.gguf_reader import ConversionError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_NAMES = ("default", "gpt2", "gpt-2", "phi-2", "olmo", "jais", "poro-chat", "viking")
_DIGIT_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def pre_tokenizer_for(pre: str) -> Any:
    """``tokenizers`` pre-tokenizer matching llama.cpp's regexes for ``tokenizer.ggml.pre``.

    Raises:
        ConversionError: a pre-tokenizer name without a known equivalent.
    """
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_NAMES:  # llama.cpp: "\p{N}" first, then the GPT-2 regex
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_NAMES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_NAMES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ConversionError(f"unsupported tokenizer pre-tokenizer {pre!r} (tokenizer.ggml.pre)")


def _token(tokens: list[str], metadata: dict[str, Any], key: str) -> str | None:
    """Token text for ``tokenizer.ggml.<key>`` (an id), or None when absent."""
    idx = metadata.get(f"tokenizer.ggml.{key}")
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def byte_level_bpe(metadata: dict[str, Any]) -> Any:
    """Byte-level BPE ``tokenizers.Tokenizer`` (``tokenizer.ggml.model == "gpt2"``).

    Control tokens (``token_type == 3``) become special added tokens, user-defined ones
    (``4``) plain added tokens.

    Raises:
        ConversionError: no tokens, malformed merges or an unknown pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConversionError("GGUF metadata has no tokenizer.ggml.tokens")
    merges = []
    for m in metadata.get("tokenizer.ggml.merges") or []:
        pair = m.split(" ")
        if len(pair) != 2:
            raise ConversionError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((pair[0], pair[1]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer_for(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    special = [t for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer


def _transformers_gguf_tokenizer() -> Callable[[str, dict[str, Any]], tuple[Any, dict]]:
    """transformers' ``convert_gguf_tokenizer`` (module moved between 4.x and 5.x)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        try:
            from transformers.integrations.ggml import convert_gguf_tokenizer
        except ImportError:
            raise ConversionError(
                "SentencePiece GGUF vocabularies need transformers>=4.45 (GGUF tokenizer support)"
            ) from None
    return convert_gguf_tokenizer


def sentencepiece(metadata: dict[str, Any]) -> Any:
    """SentencePiece-style ``tokenizers.Tokenizer`` (``tokenizer.ggml.model == "llama"``).

    Built by transformers' GGUF tokenizer converter, which knows the per-architecture
    details (Gemma's merge order and space tokens, Llama's prefix space).
    """
    convert = _transformers_gguf_tokenizer()
    keys = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "merges": "merges",
        "add_space_prefix": "add_prefix_space",
    }
    tokenizer_dict = {
        name: metadata[f"tokenizer.ggml.{key}"]
        for key, name in keys.items()
        if f"tokenizer.ggml.{key}" in metadata
    }
    arch = str(metadata.get("general.architecture", ""))
    try:
        tokenizer, _ = convert(arch, tokenizer_dict)
    except Exception as e:
        raise ConversionError(f"cannot build the SentencePiece tokenizer: {e}") from None
    return tokenizer


TOKENIZER_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "gpt2": byte_level_bpe,
    "llama": sentencepiece,
}


def build_tokenizer(metadata: dict[str, Any]) -> Any:
    """``tokenizers.Tokenizer`` for the vocabulary in GGUF metadata.

    A BOS is prepended to every encoding when ``tokenizer.ggml.add_bos_token`` is true.

    Raises:
        ConversionError: an unsupported ``tokenizer.ggml.model`` or malformed vocabulary.
    """
    from tokenizers import processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_BUILDERS:
        raise ConversionError(
            f"unsupported tokenizer model {kind!r} (tokenizer.ggml.model); "
            f"supported: {', '.join(TOKENIZER_BUILDERS)}"
        )
    tokenizer = TOKENIZER_BUILDERS[kind](metadata)
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    bos = _token(tokens, metadata, "bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def tokenizer_config(metadata: dict[str, Any], max_length: int | None = None) -> dict[str, Any]:
    """``tokenizer_config.json`` dict: special tokens, BOS/EOS flags and chat template."""
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        if (tok := _token(tokens, metadata, key)) is not None:
            config[name] = tok
    if max_length:
        config["model_max_length"] = int(max_length)
    if template := metadata.get("tokenizer.chat_template"):
        config["chat_template"] = str(template)
    return config
