"""Tiny random mlx-lm models and tokenizers for fast tests.

Every builder is deterministic in its ``seed``; weights are fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 96,
}

# One config per architecture family the engine claims to support.
ARCH_CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "llama3": {
        "model_type": "llama",
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "llama_traditional": {"model_type": "llama", "rope_traditional": True},
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {
        "model_type": "qwen3",
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16.0,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "num_hidden_layers": 4,
    },
    "phi3": {"model_type": "phi3", "num_key_value_heads": 4},
}


def tiny_config(arch: str = "llama", **overrides) -> dict:
    """Config dict for a tiny model of ``arch`` (a key of :data:`ARCH_CONFIGS`)."""
    cfg = {**BASE, **ARCH_CONFIGS[arch], **overrides}
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, scale: float = 1.0, **overrides) -> nn.Module:
    """A randomly initialised mlx-lm ``Model`` of ``arch`` in fp32.

    ``scale`` multiplies all weights (larger = peakier next-token distributions).
    """
    cfg = tiny_config(arch, **overrides)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    if scale != 1.0:
        from mlx.utils import tree_unflatten

        scaled = [
            (k, v * scale if "norm" not in k else v) for k, v in tree_flatten(model.parameters())
        ]
        model.update(tree_unflatten(scaled))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def byte_tokenizer(vocab_size: int = 96):
    """A small byte-level BPE tokenizer (HF ``PreTrainedTokenizerFast``) with EOS/BOS.

    Trained in code on a fixed corpus so that its vocabulary has ``vocab_size`` entries.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        # ``alphabet()`` comes in a different order in every process: sorted, the truncated
        # alphabet (and so every tokenization) is the same in every run
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[: max(0, vocab_size - 40)],
        show_progress=False,
    )
    corpus = ["the cat sat on the mat. " * 4, "hello world 123 456, the end.", "a b c d e f"] * 8
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def save_tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer as a directory that ``mlx_lm.load`` opens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    model = tiny_model(arch, seed=seed, vocab_size=len(tokenizer), **overrides)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(str(path))
    return path
