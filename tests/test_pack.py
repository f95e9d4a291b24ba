"""``train pack`` / ``unpack``: distilled data without prompt ids, rebuilt token for token."""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: fast BLAS)

# isort: split
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import save_tiny_model_dir

from mlx_redrafter.train.__main__ import main
from mlx_redrafter.train.data import (
    DistillDataset,
    read_meta,
    read_shard,
    shard_paths,
    write_meta,
)
from mlx_redrafter.train.distill import DistillConfig, distill, weights_sha256
from mlx_redrafter.train.pack import (
    ARRAY_NAMES,
    PACKED_ARRAYS,
    read_packed,
    rebuild_sequences,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMITTED = Path(__file__).resolve().parents[1] / "distilled"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a prompts file and a complete distillation of it (several shards)."""
    from mlx_lm import load

    root = tmp_path_factory.mktemp("made")
    model_dir = save_tiny_model_dir(root / "model")
    prompts = root / "prompts.jsonl"
    words = ["the cat", "sat on", "the mat", "hello world", "123", "a b c", "the end"]
    rng = np.random.default_rng(1)
    lines = []
    for i in range(17):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        lines.append(json.dumps({"id": i, "prompt": text}))
        if i % 6 == 2:
            lines.append("")  # blank lines do not count as prompts
    prompts.write_text("\n".join(lines) + "\n")
    model, tok = load(str(model_dir))
    data = root / "data"
    config = DistillConfig(
        prompts=str(prompts), out=str(data), max_new_tokens=12, batch_size=4, shard_size=5
    )
    distill(config, model, tok, str(model_dir), progress=False)
    return {"model": model_dir, "prompts": prompts, "data": data, "root": root}


def _pack(data: Path, out: Path, *extra: str) -> int:
    return main(["pack", "--data", str(data), "--out", str(out), *extra])


def _unpack(packed: Path, prompts: Path, out: Path, model: Path, *extra: str) -> int:
    argv = ["unpack", "--packed", str(packed), "--prompts", str(prompts), "--out", str(out)]
    return main([*argv, "--model", str(model), *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_unpack_rebuilds_every_shard_array_for_array(made, tmp_path: Path, capsys) -> None:
    packed, rebuilt = tmp_path / "packed", tmp_path / "rebuilt"
    assert _pack(made["data"], packed) == 0
    assert _unpack(packed, made["prompts"], rebuilt, made["model"]) == 0
    assert "as packed" in capsys.readouterr().out

    original = shard_paths(made["data"])
    assert len(original) == 4 and [p.name for p in shard_paths(rebuilt)] == [
        p.name for p in original
    ]
    for a, b in zip(original, shard_paths(rebuilt), strict=True):
        want, got = read_shard(a), read_shard(b)
        for name, value in want.items():
            assert got[name].dtype == value.dtype, name
            np.testing.assert_array_equal(got[name], value, err_msg=f"{a.name} {name}")
    want_ds, got_ds = DistillDataset(made["data"]), DistillDataset(rebuilt)
    assert len(got_ds) == 17 and got_ds.num_response_tokens == want_ds.num_response_tokens
    meta, old = read_meta(rebuilt), read_meta(made["data"])
    for key in ("model_sha256", "model_name", "prompts_sha256", "params", "eos_token_ids"):
        assert meta[key] == old[key], key
    assert meta["progress"]["complete"] is True

    # the rebuilt directory is a distill directory of the same model and prompts: nothing to do
    from mlx_lm import load

    model, tok = load(str(made["model"]))
    config = DistillConfig(prompts=str(made["prompts"]), out=str(rebuilt), max_new_tokens=12)
    assert distill(config, model, tok, str(made["model"]), progress=False).sequences == 0


def test_packed_data_holds_no_prompt_ids(made, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    assert _pack(made["data"], packed) == 0
    data = read_packed(packed)
    assert sorted(data.arrays) == sorted(ARRAY_NAMES)
    assert data.arrays["response_ids"].dtype == np.uint16  # a 96-id vocabulary
    dataset = DistillDataset(made["data"])
    responses = [seq.tokens[seq.response_start :] for seq in map(dataset.__getitem__, range(17))]
    assert data.arrays["response_ids"].shape[0] == sum(r.shape[0] for r in responses)
    assert (
        data.meta["packed"]["prompt_tokens"] == read_meta(made["data"])["progress"]["prompt_tokens"]
    )
    text = (packed / "meta.json").read_text()
    assert str(made["root"]) not in text and json.loads(text)["prompts"] == "prompts.jsonl"
    with np.load(packed / PACKED_ARRAYS) as z:
        assert sorted(z.files) == sorted(ARRAY_NAMES)
    again = tmp_path / "again"
    assert _pack(made["data"], again) == 0  # the same bytes: no churn when committed
    for name in (PACKED_ARRAYS, "meta.json"):
        assert (again / name).read_bytes() == (packed / name).read_bytes()
    # no prompt's ids appear in the packed arrays (every prompt starts with the template)
    prompt = dataset[0].tokens[: dataset[0].response_start]
    stored = data.arrays["response_ids"].astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(stored, prompt.shape[0])
    assert not np.any(np.all(windows == prompt, axis=1))


def test_unpack_refuses_other_prompts(made, tmp_path: Path, capsys) -> None:
    packed = tmp_path / "packed"
    assert _pack(made["data"], packed) == 0
    lines = made["prompts"].read_text().splitlines()
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    assert _unpack(packed, swapped, tmp_path / "out", made["model"]) == 2
    err = _error_line(capsys)
    assert "swapped.jsonl has sha256" in err and "prompts.jsonl" in err
    assert not shard_paths(tmp_path / "out")


def test_unpack_refuses_another_model_naming_both(made, tmp_path: Path, capsys) -> None:
    from mlx_lm import load

    packed = tmp_path / "packed"
    assert _pack(made["data"], packed) == 0
    other = save_tiny_model_dir(tmp_path / "other", seed=3)
    assert _unpack(packed, made["prompts"], tmp_path / "out", other) == 2
    err = _error_line(capsys)
    sha_other = weights_sha256(load(str(other))[0])
    sha_made = read_packed(packed).meta["model_sha256"]
    assert f"--model is other (float32, weights sha256 {sha_other[:12]})" in err
    assert f"made with model (float32, weights sha256 {sha_made[:12]})" in err


def test_unpack_detects_a_different_chat_template(made, tmp_path: Path, capsys) -> None:
    """Same weights, same prompts, another template: the checksums catch it."""
    packed = tmp_path / "packed"
    assert _pack(made["data"], packed) == 0
    changed = Path(shutil.copytree(made["model"], tmp_path / "model"))
    config_path = changed / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = config.get("chat_template") or (changed / "chat_template.jinja").read_text()
    template = template.replace("assistant\\n", "assistant \\n").replace(
        "assistant\n", "assistant "
    )
    if "chat_template" in config:
        config_path.write_text(json.dumps({**config, "chat_template": template}))
    else:
        (changed / "chat_template.jinja").write_text(template)
    assert _unpack(packed, made["prompts"], tmp_path / "out", changed) == 2
    err = _error_line(capsys)
    assert "17 of 17 prompts encode differently" in err and "chat template" in err
    assert not shard_paths(tmp_path / "out")


def test_rebuild_names_the_first_wrong_prompt(made, tmp_path: Path) -> None:
    from mlx_redrafter.train.pack import PackError, pack

    data = pack(made["data"])
    dataset = DistillDataset(made["data"])
    ids = [None] * 17
    for seq in map(dataset.__getitem__, range(17)):
        ids[seq.prompt_index] = seq.tokens[: seq.response_start].tolist()
    assert len(rebuild_sequences(data, ids)) == 17
    row = 3
    pi = int(data.arrays["prompt_index"][row])
    ids[pi] = ids[pi][:-1] + [ids[pi][-1] ^ 1]  # same length, one id changed
    with pytest.raises(PackError, match=f"1 of 17 prompts .* \\(first: prompt {pi},"):
        rebuild_sequences(data, ids)


def test_pack_of_old_meta_needs_the_model(made, tmp_path: Path, capsys) -> None:
    old = Path(shutil.copytree(made["data"], tmp_path / "old"))
    meta = read_meta(old)
    for key in ("model_name", "model_sha256", "model_dtype"):
        del meta[key]
    write_meta(old, {**meta, "model": str(made["model"]), "model_path": "/elsewhere/model"})
    assert _pack(old, tmp_path / "p1") == 2
    assert "pass --model" in _error_line(capsys)

    write_meta(old, {**read_meta(old), "vocab_size": 128})  # made with another vocabulary
    assert _pack(old, tmp_path / "p2", "--model", str(made["model"])) == 2
    assert "vocabulary 128" in _error_line(capsys)

    write_meta(old, {**read_meta(old), "vocab_size": meta["vocab_size"]})
    assert _pack(old, tmp_path / "p3", "--model", str(made["model"])) == 0
    assert (
        read_packed(tmp_path / "p3").meta["model_sha256"] == read_meta(made["data"])["model_sha256"]
    )
    assert "model_path" not in read_packed(tmp_path / "p3").meta
    assert read_packed(tmp_path / "p3").meta["model"] == "model"  # no path of this machine


def test_bad_input_is_one_error_line(made, tmp_path: Path, capsys) -> None:
    assert _pack(tmp_path / "missing", tmp_path / "p") == 2
    assert "not a distill data directory" in _error_line(capsys)
    assert _unpack(tmp_path / "missing", made["prompts"], tmp_path / "o", made["model"]) == 2
    assert "not a packed data directory" in _error_line(capsys)
    packed = tmp_path / "packed"
    assert _pack(made["data"], packed) == 0
    capsys.readouterr()
    assert _unpack(packed, made["prompts"], made["data"], made["model"]) == 2
    assert "already holds shards" in _error_line(capsys)
    assert _unpack(packed, tmp_path / "none.jsonl", tmp_path / "o", made["model"]) == 2
    assert "prompt file not found" in _error_line(capsys)


@pytest.mark.real_model
@pytest.mark.skipif(
    not (SHARED / "distilled" / "smollm2-135m-instruct-greedy").is_dir(),
    reason="needs ../shared/data/distilled",
)
def test_committed_ids_rebuild_the_shared_distillation() -> None:
    """The committed packed ids + the shared prompts give the shared data (first shard)."""
    from mlx_redrafter.models import load
    from mlx_redrafter.prompts import load_prompts
    from mlx_redrafter.train.distill import encode_prompts

    shared = SHARED / "distilled" / "smollm2-135m-instruct-greedy"
    packed = read_packed(COMMITTED / "smollm2-135m-instruct-greedy")
    first = read_shard(shard_paths(shared)[0])
    rows = np.arange(int(packed.arrays["shard_sizes"][0]))
    _, tokenizer = load(None, dtype="float32")
    texts = [p.text for p in load_prompts(shared / "train_prompts_shuffled.jsonl")]
    needed = set(packed.arrays["prompt_index"][rows].tolist())
    sequences = rebuild_sequences(packed, encode_prompts(tokenizer, texts, needed), rows)
    np.testing.assert_array_equal(np.concatenate(sequences), first["tokens"])
    np.testing.assert_array_equal(packed.arrays["prompt_index"][rows], first["prompt_index"])
