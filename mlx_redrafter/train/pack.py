"""``python -m mlx_redrafter.train pack`` / ``unpack``: distilled data without its prompts.

A distillation data directory (:mod:`mlx_redrafter.train.data`) holds every sequence's
prompt ids, and prompt texts can carry licences (share-alike) that keep them out of a code
repository. A *packed* directory keeps what the target generated and how to put it back::

    PACKED_DIR/
      meta.json        the data directory's meta.json (model by name and weights hash,
                       prompts by sha256, generation parameters, progress) plus "packed"
      sequences.npz    compressed .npz (as np.savez_compressed, byte-reproducible),
                       n sequences in the shards' order:

==================  ======  ==============================================================
array               dtype   meaning
==================  ======  ==============================================================
``response_ids``    uint16  every response, concatenated (uint32 when the vocabulary has
                            more than 65,536 ids)
``response_length`` int32   ``(n,)`` ids per response
``prompt_index``    int64   ``(n,)`` as in the shards
``sample_index``    int32   ``(n,)``
``finish_reason``   uint8   ``(n,)`` 0 = EOS, 1 = ``max_new_tokens``
``prompt_length``   int32   ``(n,)`` prompt ids (chat template included) of each sequence
``prompt_crc32``    uint32  ``(n,)`` CRC-32 of each prompt's ids (int32 little-endian)
``shard_sizes``     int64   sequences per shard, in shard order
==================  ======  ==============================================================

``meta.json``'s ``packed`` section holds ``sequences``, ``response_tokens``,
``prompt_tokens`` and ``tokens_sha256``, the SHA-256 of every shard's ``tokens`` array
(int32 little-endian) concatenated in shard order. Prompt lengths and checksums reveal
nothing of the prompts' text; they let ``unpack`` prove that it rebuilt the same ids.

``unpack`` encodes each prompt of the prompts file exactly as ``distill`` does
(:func:`~mlx_redrafter.train.distill.encode_prompts`: one user turn, chat template), joins
prompt and response ids, checks every prompt's length and checksum and the whole stream's
SHA-256, and writes the same shards (same sequences, same order, same shard boundaries)
with a ``meta.json`` naming the same model and prompts, so ``distill`` can resume into it
and ``fit`` reads it like the original. The model given to ``unpack`` must have the packed
weights hash (its tokenizer makes the prompt ids), and the prompts file the packed SHA-256.
"""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: routes MLX's CPU BLAS before mlx.core loads)

# isort: split
import argparse
import hashlib
import io
import json
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_redrafter.train.data import (
    FINISH_CODES,
    DataFormatError,
    ShardWriter,
    read_meta,
    read_shard,
    shard_paths,
    write_atomic,
    write_meta,
)

EXIT_ERROR = 2
PACKED_FORMAT = "mlx-redrafter-distill-packed"
PACKED_VERSION = 1
PACKED_META = "meta.json"
PACKED_ARRAYS = "sequences.npz"
ARRAY_NAMES = (
    "response_ids",
    "response_length",
    "prompt_index",
    "sample_index",
    "finish_reason",
    "prompt_length",
    "prompt_crc32",
    "shard_sizes",
)
#: meta.json fields of a data directory that name the machine it was made on (not packed)
MACHINE_FIELDS = ("model_path", "updated", "format", "version")


class PackError(ValueError):
    """Bad input to ``pack`` / ``unpack`` (the message is one line for the user)."""


def ids_crc32(ids: np.ndarray) -> int:
    """CRC-32 of token ids as int32 little-endian bytes."""
    return zlib.crc32(np.ascontiguousarray(ids, dtype="<i4").tobytes())


@dataclass
class Packed:
    """A packed directory in memory.

    Attributes:
        meta: Its ``meta.json``.
        arrays: The arrays of ``sequences.npz`` (see the module docstring).
    """

    meta: dict
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.arrays["prompt_index"].shape[0])

    def response_offsets(self) -> np.ndarray:
        """``(n + 1,)`` sequence ``i``'s response is ``response_ids[o[i]:o[i+1]]``."""
        return np.concatenate([[0], np.cumsum(self.arrays["response_length"], dtype=np.int64)])


# ------------------------------------------------------------------------------- pack


def pack(data_dir: str | Path, identity: dict | None = None) -> Packed:
    """The packed form of a data directory.

    Args:
        data_dir: A ``distill`` data directory.
        identity: ``model_name`` / ``model_sha256`` / ``model_dtype`` to record when its
            ``meta.json`` predates them (see
            :func:`~mlx_redrafter.train.distill.model_identity`); must agree when it has
            them.

    Raises:
        PackError: No data, or ``identity`` missing or different.
    """
    data_dir = Path(data_dir)
    try:
        meta = read_meta(data_dir)
    except (DataFormatError, json.JSONDecodeError) as e:
        raise PackError(f"{data_dir}: {e}") from None
    if meta is None:
        raise PackError(f"{data_dir} is not a distill data directory (no meta.json)")
    paths = shard_paths(data_dir)
    if not paths:
        raise PackError(f"{data_dir} holds no shards")
    if meta.get("model_sha256"):
        if identity and identity["model_sha256"] != meta["model_sha256"]:
            raise PackError(
                f"--model is {_describe(identity)} but {data_dir} was made with {_describe(meta)}"
            )
        identity = {k: meta[k] for k in ("model_name", "model_sha256", "model_dtype")}
    elif identity is None:
        raise PackError(
            f"{data_dir}/meta.json does not record the model's weights hash (made by an "
            "older distill); pass --model to name the model it was made with"
        )
    columns: dict[str, list[np.ndarray]] = {name: [] for name in ARRAY_NAMES}
    digest = hashlib.sha256()
    for path in paths:
        shard = read_shard(path)
        tokens, offsets, starts = shard["tokens"], shard["offsets"], shard["response_start"]
        digest.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
        n = starts.shape[0]
        lengths = np.diff(offsets) - starts
        if np.any(lengths < 0) or np.any(starts < 0):
            raise PackError(f"{path}: a response_start lies beyond its sequence")
        crcs = [ids_crc32(tokens[offsets[i] : offsets[i] + starts[i]]) for i in range(n)]
        keep = np.ones(tokens.shape[0], dtype=bool)
        for i in range(n):
            keep[offsets[i] : offsets[i] + starts[i]] = False
        columns["response_ids"].append(tokens[keep])
        columns["response_length"].append(lengths.astype(np.int32))
        columns["prompt_index"].append(shard["prompt_index"].astype(np.int64))
        columns["sample_index"].append(shard["sample_index"].astype(np.int32))
        columns["finish_reason"].append(shard["finish_reason"].astype(np.uint8))
        columns["prompt_length"].append(starts.astype(np.int32))
        columns["prompt_crc32"].append(np.array(crcs, dtype=np.uint32))
        columns["shard_sizes"].append(np.array([n], dtype=np.int64))
    arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
    ids = arrays["response_ids"]
    top = int(ids.max(initial=0))
    arrays["response_ids"] = ids.astype(np.uint16 if top < 1 << 16 else np.uint32)
    packed_meta = {k: v for k, v in meta.items() if k not in MACHINE_FIELDS}
    packed_meta.update(identity)
    if packed_meta.get("model") not in (None, "default"):  # a path of the machine
        packed_meta["model"] = identity["model_name"]
    if meta.get("prompts"):
        packed_meta["prompts"] = Path(str(meta["prompts"])).name
    packed_meta["packed"] = {
        "sequences": int(arrays["prompt_index"].shape[0]),
        "response_tokens": int(ids.shape[0]),
        "prompt_tokens": int(arrays["prompt_length"].sum(dtype=np.int64)),
        "tokens_sha256": digest.hexdigest(),
    }
    return Packed(packed_meta, arrays)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as a compressed ``.npz`` (what ``np.savez_compressed`` writes) whose bytes
    depend on the arrays only: fixed member times, so packing the same data again gives
    the same file."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            array = io.BytesIO()
            np.lib.format.write_array(array, np.ascontiguousarray(value), allow_pickle=False)
            archive.writestr(member, array.getvalue(), compresslevel=9)
    return buffer.getvalue()


def write_packed(packed: Packed, out: str | Path) -> Path:
    """Write ``packed`` to directory ``out`` (created; its two files replaced atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PACKED_ARRAYS, lambda f: f.write(npz_bytes(packed.arrays)))
    meta = {**packed.meta, "format": PACKED_FORMAT, "version": PACKED_VERSION}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_atomic(out / PACKED_META, lambda f: f.write(text), mode="w")
    return out


def read_packed(path: str | Path) -> Packed:
    """Load and validate a packed directory.

    Raises:
        PackError: Not a packed directory, or inconsistent arrays.
    """
    path = Path(path)
    meta_path, arrays_path = path / PACKED_META, path / PACKED_ARRAYS
    if not meta_path.is_file() or not arrays_path.is_file():
        raise PackError(
            f"{path} is not a packed data directory (needs {PACKED_META} and {PACKED_ARRAYS})"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise PackError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if meta.get("format") != PACKED_FORMAT:
        raise PackError(f"{meta_path} is not a {PACKED_FORMAT} file")
    with np.load(arrays_path, allow_pickle=False) as z:
        missing = [k for k in ARRAY_NAMES if k not in z.files]
        if missing:
            raise PackError(f"{arrays_path}: missing arrays {missing}")
        arrays = {k: z[k] for k in ARRAY_NAMES}
    packed = Packed(meta, arrays)
    n = len(packed)
    for name in ARRAY_NAMES[1:-1]:
        if arrays[name].shape != (n,):
            raise PackError(
                f"{arrays_path}: {name} has shape {arrays[name].shape}, expected ({n},)"
            )
    if int(arrays["response_length"].sum(dtype=np.int64)) != arrays["response_ids"].shape[0]:
        raise PackError(f"{arrays_path}: response lengths do not add up to the response ids")
    if int(arrays["shard_sizes"].sum()) != n:
        raise PackError(f"{arrays_path}: shard sizes do not add up to the sequences")
    return packed


# ----------------------------------------------------------------------------- unpack


def rebuild_sequences(
    packed: Packed, prompt_ids: list[list[int] | None], rows: np.ndarray | None = None
) -> list[np.ndarray]:
    """Prompt + response ids ``(L,)`` int32 of the packed sequences ``rows`` (default all).

    Args:
        packed: The packed data.
        prompt_ids: Prompt ids by prompt index (:func:`encode_prompts`' output).
        rows: Which sequences, in packed order.

    Raises:
        PackError: A prompt is missing or its ids differ from the ones the data was made
            from (length or checksum), naming the first such sequence and the count.
    """
    a = packed.arrays
    offsets = packed.response_offsets()
    rows = np.arange(len(packed)) if rows is None else np.asarray(rows)
    sequences, bad = [], []
    for row in rows.tolist():
        pi = int(a["prompt_index"][row])
        ids = prompt_ids[pi] if 0 <= pi < len(prompt_ids) else None
        prompt = np.asarray(ids if ids is not None else [], dtype=np.int32)
        if (
            ids is None
            or prompt.shape[0] != int(a["prompt_length"][row])
            or ids_crc32(prompt) != int(a["prompt_crc32"][row])
        ):
            bad.append((row, pi, prompt.shape[0]))
            continue
        response = a["response_ids"][offsets[row] : offsets[row + 1]].astype(np.int32)
        sequences.append(np.concatenate([prompt, response]))
    if bad:
        row, pi, length = bad[0]
        raise PackError(
            f"{len(bad)} of {rows.shape[0]} prompts encode differently from when the data was "
            f"made (first: prompt {pi}, {length} ids, expected {int(a['prompt_length'][row])}); "
            "the tokenizer or its chat template differs"
        )
    return sequences


def needed_prompts(packed: Packed) -> set[int]:
    """The prompt indices the packed sequences refer to."""
    return set(packed.arrays["prompt_index"].tolist())


def unpack(
    packed: Packed,
    texts: list[str],
    tokenizer: Any,
    out: str | Path,
    meta_updates: dict | None = None,
) -> dict:
    """Rebuild the data directory of ``packed`` into ``out`` (must hold no shards).

    Args:
        packed: The packed data.
        texts: The prompt texts, by prompt index (the prompts file's non-empty lines).
        tokenizer: The target's tokenizer (chat template).
        out: Output directory.
        meta_updates: Fields to set in ``meta.json`` (e.g. ``model``, ``prompts``).

    Returns:
        The ``meta.json`` written.

    Raises:
        PackError: ``out`` holds data, or the rebuilt ids differ from the packed checksums.
    """
    from mlx_redrafter.train.distill import encode_prompts

    out = Path(out)
    if shard_paths(out):
        raise PackError(f"{out} already holds shards; unpack into a new directory")
    params = packed.meta.get("params", {})
    prompt_ids = encode_prompts(
        tokenizer, texts, needed_prompts(packed), bool(params.get("chat_template", True))
    )
    sequences = rebuild_sequences(packed, prompt_ids)
    digest = hashlib.sha256()
    for tokens in sequences:
        digest.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    want = packed.meta.get("packed", {}).get("tokens_sha256")
    if digest.hexdigest() != want:
        raise PackError(
            f"rebuilt ids have sha256 {digest.hexdigest()[:12]}, the packed data "
            f"{str(want)[:12]}; the tokenizer or its chat template differs"
        )
    from mlx_redrafter.train.data import Sequence

    a = packed.arrays
    writer = ShardWriter(out, shard_size=1 << 62, flush_seconds=float("inf"))
    reasons = {code: name for name, code in FINISH_CODES.items()}
    row = 0
    for size in a["shard_sizes"].tolist():
        for _ in range(size):
            writer.add(
                Sequence(
                    tokens=sequences[row],
                    response_start=int(a["prompt_length"][row]),
                    prompt_index=int(a["prompt_index"][row]),
                    sample_index=int(a["sample_index"][row]),
                    finish_reason=reasons[int(a["finish_reason"][row])],
                )
            )
            row += 1
        writer.flush()
    meta = {k: v for k, v in packed.meta.items() if k not in ("packed", "format", "version")}
    meta.update(meta_updates or {})
    write_meta(out, meta)
    return meta


# -------------------------------------------------------------------------------- CLI


def _describe(meta: dict) -> str:
    from mlx_redrafter.train.distill import describe_model

    return describe_model(meta)


def _load_model(name: str | None, dtype: str | None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, model_path)`` for ``--model`` (None or ``default``: the default)."""
    from mlx_redrafter.models import load, resolve_model_path

    name = None if name in (None, "default") else name
    model, tokenizer = load(name, dtype=dtype)
    where = resolve_model_path(name, dtype)
    return model, tokenizer, str(Path(where).resolve()) if Path(where).exists() else str(where)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``pack`` sub-command (its handler is :func:`run_pack`)."""
    p = subparsers.add_parser(
        "pack",
        help="store a distill data directory without its prompt ids (to commit it)",
        description="Store a distill data directory's response ids, prompt indices and "
        "checksums, compressed, without the prompt ids; 'unpack' rebuilds it from the "
        "prompts file.",
    )
    p.add_argument("--data", required=True, help="distill data directory")
    p.add_argument("--out", required=True, help="packed directory to write")
    p.add_argument(
        "--model",
        default=None,
        help="the model the data was made with, for data whose meta.json predates the "
        "weights hash ('default' = the embedded default model); checked otherwise",
    )
    p.add_argument("--dtype", default=None, help="cast the model (as distill --dtype)")
    p.set_defaults(handler=run_pack)
    return p


def add_unpack_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``unpack`` sub-command (its handler is :func:`run_unpack`)."""
    p = subparsers.add_parser(
        "unpack",
        help="rebuild a distill data directory from packed ids and the prompts file",
        description="Rebuild a distill data directory from a packed one: each prompt "
        "encoded as distill does (chat template), joined to its stored response ids, "
        "checked against the packed checksums.",
    )
    p.add_argument("--packed", required=True, help="packed directory (written by 'pack')")
    p.add_argument("--prompts", required=True, help="the JSONL prompt file the data was made from")
    p.add_argument("--out", required=True, help="new data directory")
    p.add_argument(
        "--model",
        default=None,
        help="the model the data was made with (default: the embedded default model); "
        "its weights hash must match",
    )
    p.add_argument("--dtype", default=None, help="cast the model (as distill --dtype)")
    p.set_defaults(handler=run_unpack)
    return p


def run_pack(args: argparse.Namespace) -> int:
    """Run ``pack``; one ``error:`` line on stderr and exit code 2 on bad input."""
    from mlx_redrafter.models import ModelLoadError
    from mlx_redrafter.train.distill import model_identity

    try:
        identity = None
        meta = read_meta(Path(args.data)) if Path(args.data).is_dir() else None
        legacy = meta is not None and not meta.get("model_sha256")
        if args.model is not None or (legacy and meta.get("model") in (None, "default")):
            model, tokenizer, where = _load_model(args.model, args.dtype)
            identity = model_identity(model, where)
            if legacy:
                _check_legacy(meta, tokenizer, model, args.data)
        packed = pack(args.data, identity)
        write_packed(packed, args.out)
    except (ValueError, OSError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    size = (Path(args.out) / PACKED_ARRAYS).stat().st_size
    info = packed.meta["packed"]
    print(
        f"packed {info['sequences']} sequences ({info['response_tokens']} response ids, "
        f"{info['prompt_tokens']} prompt ids left out) into {args.out}: {size / 1e6:.2f} MB"
    )
    return 0


def _check_legacy(meta: dict, tokenizer: Any, model: Any, data: str) -> None:
    """The model named for old data must at least share its vocabulary size and EOS ids."""
    vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0))
    eos = sorted(int(t) for t in tokenizer.eos_token_ids)
    if meta.get("vocab_size") not in (None, 0, vocab) or meta.get("eos_token_ids") not in (
        None,
        eos,
    ):
        raise PackError(
            f"{data} was made with a model of vocabulary {meta.get('vocab_size')} and EOS ids "
            f"{meta.get('eos_token_ids')}; --model has {vocab} and {eos}"
        )


def run_unpack(args: argparse.Namespace) -> int:
    """Run ``unpack``; one ``error:`` line on stderr and exit code 2 on bad input."""
    from mlx_redrafter.models import ModelLoadError
    from mlx_redrafter.prompts import load_prompts
    from mlx_redrafter.train.distill import describe_model, model_identity, sha256_file

    try:
        packed = read_packed(args.packed)
        prompts = Path(args.prompts)
        if not prompts.is_file():
            raise PackError(f"prompt file not found: {prompts}")
        have, want = sha256_file(prompts), packed.meta.get("prompts_sha256")
        if have != want:
            raise PackError(
                f"--prompts {prompts} has sha256 {have[:12]}, the data was made from "
                f"{packed.meta.get('prompts', 'a prompts file')} with sha256 {str(want)[:12]}"
            )
        model, tokenizer, where = _load_model(args.model, args.dtype)
        identity = model_identity(model, where)
        if identity["model_sha256"] != packed.meta.get("model_sha256"):
            hint = ""
            if identity["model_dtype"] != packed.meta.get("model_dtype"):
                hint = f" (try --dtype {packed.meta.get('model_dtype')})"
            raise PackError(
                f"--model is {describe_model(identity)}, the data was made with "
                f"{describe_model(packed.meta)}{hint}"
            )
        texts = [p.text for p in load_prompts(prompts)]
        unpack(
            packed,
            texts,
            tokenizer,
            args.out,
            {"model": args.model or "default", "prompts": str(prompts.resolve()), **identity},
        )
    except (ValueError, OSError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    info = packed.meta["packed"]
    print(
        f"rebuilt {info['sequences']} sequences ({info['prompt_tokens']} prompt + "
        f"{info['response_tokens']} response ids, sha256 {info['tokens_sha256'][:12]} as "
        f"packed) in {len(shard_paths(Path(args.out)))} shards: {args.out}"
    )
    return 0
