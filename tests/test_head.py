"""The ReDrafter head against an independent numpy reference; config and checkpoint I/O."""

from __future__ import annotations

import json
from itertools import product

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import tiny_model

from mlx_redrafter.drafters.redrafter import (
    DRAFT_VOCAB_KEY,
    MODEL_TYPE,
    ReDrafterConfig,
    ReDrafterHead,
    check_target,
    expected_shapes,
    head_from_weights,
    load_drafter,
    save_drafter,
)

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

# ----------------------------------------------------------------- numpy reference


def np_silu(x: np.ndarray) -> np.ndarray:
    """SiLU in float64."""
    return x / (1.0 + np.exp(-x))


def reference_logits(
    weights: dict[str, np.ndarray],
    config: dict,
    h: np.ndarray,
    prev_tokens: np.ndarray,
    table: np.ndarray,
) -> np.ndarray:
    """Head logits written from the equations, in float64.

    Args:
        weights: Checkpoint tensors by Apple name.
        config: ``config.json`` dict.
        h: ``(B, d)`` target hidden states.
        prev_tokens: ``(B, T)`` target ids ``g0 .. g_{T-1}`` fed to the recurrence.
        table: ``(V, d)`` target input embedding table.

    Returns:
        ``(B, K)`` logits for the token after ``g_{T-1}``.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    d = config["hidden_size"]
    s = np.zeros((h.shape[0], d))
    for t in range(prev_tokens.shape[1]):
        e = table[prev_tokens[:, t]].astype(np.float64)
        if config["rnn"]:
            s = np_silu(e @ w["rnn_w.weight"].T + s @ w["rnn_u.weight"].T + w["rnn_u.bias"])
        else:
            s = s + e
    x = np.concatenate([h.astype(np.float64), s], axis=-1)
    if config["exit_dim"] != 2 * d:
        x = x @ w["input_proj.weight"].T + w["input_proj.bias"]
    n = config["num_draft_layers"]
    for i in range(n):
        x = x + np_silu(x @ w[f"lm_head.{i}.linear.weight"].T + w[f"lm_head.{i}.linear.bias"])
    return x @ w[f"lm_head.{n}.weight"].T


def random_checkpoint(
    config: dict, seed: int, draft_vocab: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Random float32 weights (scaled like the default init) with Apple's names and shapes."""
    rng = np.random.default_rng(seed)
    cfg = ReDrafterConfig.from_dict(config)
    out: dict[str, np.ndarray] = {}
    for key, shape in expected_shapes(cfg).items():
        if key == DRAFT_VOCAB_KEY:
            out[key] = np.asarray(draft_vocab, dtype=np.int32)
            continue
        fan_in = shape[-1] if len(shape) == 2 else shape[0]
        out[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


def make_config(
    d: int = 8,
    vocab: int = 32,
    exit_dim: int | None = None,
    layers: int = 2,
    rnn: bool = True,
    draft_vocab_size: int | None = None,
) -> dict:
    """A ``config.json`` dict (``exit_dim`` defaults to ``2d``: no input_proj)."""
    cfg = {
        "model_type": MODEL_TYPE,
        "vocab_size": vocab,
        "hidden_size": d,
        "exit_dim": 2 * d if exit_dim is None else exit_dim,
        "num_draft_layers": layers,
        "rnn": rnn,
    }
    if draft_vocab_size is not None:
        cfg["draft_vocab_size"] = draft_vocab_size
    return cfg


def to_mx(weights: dict[str, np.ndarray]) -> dict[str, mx.array]:
    """numpy tensors as MLX arrays."""
    return {k: mx.array(v) for k, v in weights.items()}


def mlx_logits(
    head: ReDrafterHead, h: np.ndarray, prev_tokens: np.ndarray, table: np.ndarray
) -> np.ndarray:
    """Logits of the MLX head through its trainer entry points (rnn_step, logits)."""
    emb = mx.array(table)
    state = head.initial_state((h.shape[0],))
    for t in range(prev_tokens.shape[1]):
        state = head.rnn_step(state, emb[mx.array(prev_tokens[:, t])])
    return np.array(head.logits(mx.array(h), state))


# ------------------------------------------------------------------------- the math

CASES = list(product([True, False], [False, True], [1, 2, 3], [False, True]))


@pytest.mark.parametrize(("rnn", "input_proj", "layers", "reduced"), CASES)
def test_logits_match_numpy_reference(rnn: bool, input_proj: bool, layers: int, reduced: bool):
    d, vocab, k = 8, 32, 11
    rng = np.random.default_rng(layers + 10 * rnn + 100 * input_proj)
    draft_vocab = rng.permutation(vocab)[:k] if reduced else None
    config = make_config(
        d=d,
        vocab=vocab,
        exit_dim=24 if input_proj else None,
        layers=layers,
        rnn=rnn,
        draft_vocab_size=k if reduced else None,
    )
    weights = random_checkpoint(config, seed=layers, draft_vocab=draft_vocab)
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))
    assert head.config.has_input_proj == input_proj
    table = rng.standard_normal((vocab, d)).astype(np.float32)
    h = rng.standard_normal((4, d)).astype(np.float32)
    prev = rng.integers(0, vocab, size=(4, 3))
    got = mlx_logits(head, h, prev, table)
    want = reference_logits(weights, config, h, prev, table)
    assert got.shape == (4, k if reduced else vocab)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # One recurrence step fewer must give different logits (the state is used).
    fewer = reference_logits(weights, config, h, prev[:, :2], table)
    assert np.abs(got - fewer).max() > 1e-3


def test_first_state_is_silu_of_projected_root_embedding():
    config = make_config(d=6, vocab=20)
    weights = random_checkpoint(config, seed=3)
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))
    e = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    s1 = np.array(head.rnn_step(head.initial_state((2,)), mx.array(e)))
    want = np_silu(e @ weights["rnn_w.weight"].T + weights["rnn_u.bias"])
    np.testing.assert_allclose(s1, want, rtol=1e-5, atol=1e-6)


def test_logits_accept_arbitrary_leading_dims():
    config = make_config(d=8, vocab=16, exit_dim=20, layers=2)
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(random_checkpoint(config, 1)))
    rng = np.random.default_rng(1)
    h = mx.array(rng.standard_normal((2, 1, 8)).astype(np.float32))
    state = mx.array(rng.standard_normal((2, 3, 8)).astype(np.float32))
    out = head.logits(h, state)
    assert out.shape == (2, 3, 16)
    flat = head.logits(mx.repeat(h, 3, axis=1).reshape(6, 8), state.reshape(6, 8))
    np.testing.assert_allclose(np.array(out).reshape(6, 16), np.array(flat), rtol=1e-6, atol=1e-6)
    emb = mx.array(rng.standard_normal((2, 3, 8)).astype(np.float32))
    assert head.rnn_step(state, emb).shape == (2, 3, 8)


# ------------------------------------------------------------------ fresh heads


def test_fresh_head_has_checkpoint_names_and_frozen_vocab():
    config = ReDrafterConfig.from_dict(make_config(d=8, vocab=32, exit_dim=12, draft_vocab_size=5))
    head = ReDrafterHead(config, draft_vocab=mx.array([3, 1, 4, 15, 9]))
    names = {k for k, _ in tree_flatten(head.parameters())}
    assert names == set(expected_shapes(config)) - {DRAFT_VOCAB_KEY}
    assert DRAFT_VOCAB_KEY in head.checkpoint_weights()
    trainable = {k for k, _ in tree_flatten(head.trainable_parameters())}
    assert trainable == names


def test_fresh_head_trains_with_value_and_grad():
    config = ReDrafterConfig.from_dict(make_config(d=8, vocab=16, layers=1))
    mx.random.seed(0)
    head = ReDrafterHead(config)
    h = mx.random.normal((5, 8))
    emb = mx.random.normal((5, 8))
    labels = mx.array([1, 2, 3, 4, 5])

    def loss_fn(model: ReDrafterHead) -> mx.array:
        state = model.rnn_step(model.initial_state((5,)), emb)
        return nn.losses.cross_entropy(model.logits(h, state), labels).mean()

    loss, grads = nn.value_and_grad(head, loss_fn)(head)
    grad_names = {k for k, _ in tree_flatten(grads)}
    assert "rnn_w.weight" in grad_names and "lm_head.1.weight" in grad_names
    assert float(mx.abs(grads["rnn_w"]["weight"]).sum()) > 0
    assert float(loss) > 0


def test_reduced_vocab_maps_ids_both_ways():
    config = ReDrafterConfig.from_dict(make_config(d=4, vocab=10, layers=1, draft_vocab_size=3))
    head = ReDrafterHead(config, draft_vocab=mx.array([7, 2, 5]))
    assert head.to_target_ids(mx.array([0, 1, 2, 2])).tolist() == [7, 2, 5, 5]
    table = head.target_to_draft().tolist()
    assert table == [-1, -1, 1, -1, -1, 2, -1, 0, -1, -1]
    with pytest.raises(ValueError, match="draft_vocab"):
        ReDrafterHead(config)


# ------------------------------------------------------------------- config + I/O


def test_config_round_trips_extra_keys():
    raw = {**make_config(), "num_lookback_tokens": -1, "architectures": ["Drafter"]}
    cfg = ReDrafterConfig.from_dict(raw)
    assert cfg.extra == {"num_lookback_tokens": -1, "architectures": ["Drafter"]}
    assert cfg.to_dict() == raw


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"vocab_size": None}, "vocab_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_draft_layers": "2"}, "num_draft_layers"),
        ({"rnn": "yes"}, "rnn"),
        ({"draft_vocab_size": 999}, "draft_vocab_size"),
    ],
)
def test_bad_config_names_the_key(change: dict, needle: str):
    raw = {**make_config(), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=needle):
        ReDrafterConfig.from_dict(raw)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_save_load_round_trip(tmp_path, dtype: mx.Dtype):
    config = make_config(d=8, vocab=32, exit_dim=20, layers=2, draft_vocab_size=6)
    draft_vocab = np.array([31, 0, 7, 8, 2, 19])
    weights = random_checkpoint(config, seed=5, draft_vocab=draft_vocab)
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))
    save_drafter(head, tmp_path, dtype=dtype)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == config
    loaded = load_drafter(tmp_path)
    assert loaded.dtype == dtype
    assert loaded.draft_vocab.tolist() == draft_vocab.tolist()
    stored = head.checkpoint_weights(dtype)
    for key, value in loaded.checkpoint_weights().items():
        assert mx.array_equal(value, stored[key]).item(), key


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A valid drafter directory fitting the tiny llama (V 96, d 64)."""
    config = make_config(d=64, vocab=96, exit_dim=80, layers=2)
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(random_checkpoint(config, 0)))
    return save_drafter(head, tmp_path / "head")


def _rewrite(path, weights: dict[str, mx.array] | None = None, config: dict | None = None):
    if weights is not None:
        mx.save_safetensors(str(path / "model.safetensors"), weights)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))


def test_load_checks_target_model(checkpoint_dir):
    model = tiny_model("llama")
    head = load_drafter(checkpoint_dir, model=model)
    assert head.config.vocab_size == 96
    with pytest.raises(ValueError, match="vocab_size 96 .* 128"):
        load_drafter(checkpoint_dir, model=tiny_model("llama", vocab_size=128))
    with pytest.raises(ValueError, match="hidden_size 64 .* 32"):
        load_drafter(checkpoint_dir, model=tiny_model("llama", hidden_size=32))


def test_check_target_reads_quantized_embeddings():
    model = tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    ok = ReDrafterConfig.from_dict(make_config(d=64, vocab=96))
    check_target(ok, model)
    with pytest.raises(ValueError, match="hidden_size"):
        check_target(ReDrafterConfig.from_dict(make_config(d=32, vocab=96)), model)


def test_load_rejects_missing_key(checkpoint_dir):
    weights = mx.load(str(checkpoint_dir / "model.safetensors"))
    del weights["rnn_u.bias"]
    _rewrite(checkpoint_dir, weights=weights)
    with pytest.raises(ValueError, match="missing key 'rnn_u.bias'"):
        load_drafter(checkpoint_dir)


def test_load_rejects_wrong_shape(checkpoint_dir):
    weights = mx.load(str(checkpoint_dir / "model.safetensors"))
    weights["lm_head.1.linear.weight"] = mx.zeros((80, 79))
    _rewrite(checkpoint_dir, weights=weights)
    with pytest.raises(ValueError, match=r"'lm_head.1.linear.weight' has shape \(80, 79\)"):
        load_drafter(checkpoint_dir)


def test_load_rejects_unexpected_key(checkpoint_dir):
    weights = mx.load(str(checkpoint_dir / "model.safetensors"))
    weights["lm_head.3.weight"] = mx.zeros((96, 80))
    _rewrite(checkpoint_dir, weights=weights)
    with pytest.raises(ValueError, match="unexpected key 'lm_head.3.weight'"):
        load_drafter(checkpoint_dir)


def test_load_rejects_config_weight_mismatch(checkpoint_dir):
    config = json.loads((checkpoint_dir / "config.json").read_text())
    _rewrite(checkpoint_dir, config={**config, "vocab_size": 100})
    with pytest.raises(ValueError, match=r"'lm_head.2.weight' has shape \(96, 80\)"):
        load_drafter(checkpoint_dir)


@pytest.mark.parametrize(("ids", "needle"), [([1, 2, 200], "outside"), ([1, 2, 2], "duplicate")])
def test_load_rejects_bad_draft_vocab(checkpoint_dir, ids: list[int], needle: str):
    config = json.loads((checkpoint_dir / "config.json").read_text())
    weights = mx.load(str(checkpoint_dir / "model.safetensors"))
    weights["lm_head.2.weight"] = mx.zeros((3, 80))
    weights[DRAFT_VOCAB_KEY] = mx.array(ids, dtype=mx.int32)
    _rewrite(checkpoint_dir, weights=weights, config={**config, "draft_vocab_size": 3})
    with pytest.raises(ValueError, match=needle):
        load_drafter(checkpoint_dir)


def test_a_float16_head_file_drafts_in_the_targets_float32(tmp_path):
    from mlx_redrafter.drafters.redrafter import ReDrafter, save_drafter

    model = tiny_model("llama")
    embed = model.model.embed_tokens.weight
    config = ReDrafterConfig(
        vocab_size=embed.shape[0], hidden_size=embed.shape[1], exit_dim=32, num_draft_layers=1
    )
    save_drafter(ReDrafterHead(config), tmp_path / "head", dtype=mx.float16)
    drafter = ReDrafter.from_model(model, tmp_path / "head")
    dtypes = {v.dtype for _, v in tree_flatten(drafter.head.parameters())}
    assert dtypes == {mx.float32}
