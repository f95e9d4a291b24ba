"""Medusa-1 heads (FasterDecoding/Medusa): ``H`` heads reading the target's last hidden
state, head ``i`` predicting the token ``i + 1`` places after the root.

A published Medusa directory holds ``config.json`` (``medusa_num_heads`` ``H``,
``medusa_num_layers`` ``n``, ``base_model_name_or_path``) and ``medusa_lm_head.safetensors``
(or ``medusa_lm_head.pt``, read only with torch installed) with keys
``{i}.{j}.linear.weight`` ``(d, d)`` / ``{i}.{j}.linear.bias`` ``(d,)`` for ``j < n`` and
``{i}.{n}.weight`` ``(V, d)``. Head ``i`` computes, from the target's final-norm hidden
state ``h`` ``(d,)`` at the last accepted position (whose own next token is the root)::

    x = h;  x = x + SiLU(A_ij x + b_ij)  for j < n;  logits_i = W_i x     (V,)

The "version 2" layout has no ``{i}.{n}.weight``: ``W_i`` is the target's LM head.

Drafting (deterministic; the exact walk verifies it at any temperature): beams over the
heads (the ``W`` best paths by the sum of the heads' log-probabilities, depth ``t`` from
head ``t - 1``), or a Medusa tree given as ``medusa_choices`` (paths of top-k ranks per
head, e.g. ``[[0], [0, 0], [1]]``), each choice one valid-masked beam.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_redrafter.checkpoint_files import load_weights_file
from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.beam_search import sorted_top
from mlx_redrafter.drafters.eagle import lm_head_rows
from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


@dataclass(frozen=True)
class MedusaConfig:
    """``H`` heads of ``n`` residual blocks over hidden size ``d``; ``own_head``: each head
    has its own ``(V, d)`` output layer (version 1), else the target's LM head (version 2)."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    own_head: bool


class ResBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return x + nn.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.blocks = [ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)]
        if cfg.own_head:
            self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MedusaHeads(nn.Module):
    """The ``H`` heads; :meth:`logits` ``(H, V)`` of one hidden state."""

    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.config = cfg
        self.heads = [MedusaHead(cfg) for _ in range(cfg.num_heads)]

    def logits(self, hidden: mx.array, rows: mx.array | None, count: int) -> mx.array:
        """``(count, V)`` logits of the first ``count`` heads for ``hidden`` ``(d,)``;
        ``rows`` ``(V, d)``: the target's LM head (version 2)."""
        out = []
        for head in self.heads[:count]:
            x = hidden
            for block in head.blocks:
                x = block(x)
            out.append(head.out(x) if self.config.own_head else x @ rows.T)
        return mx.stack(out)


def file_key(name: str) -> str:
    """The checkpoint name of a :class:`MedusaHeads` parameter."""
    parts = name.split(".")  # heads.i.blocks.j.linear.weight | heads.i.out.weight
    if parts[2] == "blocks":
        return f"{parts[1]}.{parts[3]}.{'.'.join(parts[4:])}"
    return f"{parts[1]}.{{n}}.weight"


def load_medusa(path: str | Path, target: tuple[int, int] | None = None) -> MedusaHeads:
    """Read a published Medusa directory (either layout), checked against ``target``
    ``(vocab_size, hidden_size)``.

    Raises:
        ValueError: a missing, unexpected or misshapen weight, or an unreadable file.
        VocabularyMismatchError: the heads were made for another hidden size or vocabulary.
        MissingTorchError: ``medusa_lm_head.pt`` without torch installed.
    """
    path = Path(path)
    source = f"Medusa head {path}"
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        num_heads, num_layers = int(raw["medusa_num_heads"]), int(raw["medusa_num_layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{source}: {CONFIG_FILE} needs medusa_num_heads and medusa_num_layers"
        ) from e
    file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if file is None:
        raise ValueError(f"no Medusa weights in {path}: expected {' or '.join(WEIGHT_FILES)}")
    weights = load_weights_file(file)
    weights = {k.removeprefix("medusa_head."): v for k, v in weights.items()}
    bad = sorted(k for k in weights if not _KEY.match(k))
    if bad:
        raise ValueError(f"{source} ({file.name}): unexpected weights {bad[:4]}")
    if "0.0.linear.weight" not in weights:
        raise ValueError(f"{source} ({file.name}): missing weights ['0.0.linear.weight']")
    d = int(weights["0.0.linear.weight"].shape[0])
    out = f"0.{num_layers}.weight"
    own = out in weights
    vocab = int(weights[out].shape[0]) if own else (target[0] if target else 0)
    if target is not None and (vocab, d) != tuple(target):
        raise VocabularyMismatchError(
            f"{source} was made for vocabulary {vocab} and hidden size {d}; the target has "
            f"vocabulary {target[0]} and hidden size {target[1]}"
        )
    cfg = MedusaConfig(num_heads, num_layers, d, vocab, own)
    heads = MedusaHeads(cfg)
    expected = {
        file_key(k).format(n=num_layers): (k, v.shape) for k, v in tree_flatten(heads.parameters())
    }
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ValueError(f"{source} ({file.name}): missing weights {missing}, unexpected {unknown}")
    for key, (_, shape) in expected.items():
        if tuple(weights[key].shape) != tuple(shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(weights[key].shape)}, expected {tuple(shape)}"
            )
    heads.load_weights([(name, weights[key]) for key, (name, _) in expected.items()])
    heads.eval()
    return heads


class MedusaDrafter:
    """Drafts with :class:`MedusaHeads` for a target (see the module docstring).

    Args:
        heads: The heads.
        rows: ``(V, d)`` the target's LM head (used by version-2 heads).
        choices: ``medusa_choices`` (paths of top-k ranks), or ``None`` for beams over heads.
    """

    stochastic = False
    needs_host_tokens = False

    def __init__(self, heads: MedusaHeads, rows: mx.array, choices: list[list[int]] | None = None):
        self.heads = heads
        self.rows = rows
        self.choices = None if choices is None else [list(map(int, c)) for c in choices]
        if self.choices is not None and (
            not self.choices or any(not c or min(c) < 0 for c in self.choices)
        ):
            raise ValueError("medusa_choices must be non-empty paths of ranks >= 0")

    @classmethod
    def from_model(
        cls, model: nn.Module, path: str | Path, choices: list[list[int]] | None = None
    ) -> MedusaDrafter:
        args = getattr(model, "args", None)
        target = (int(args.vocab_size), int(args.hidden_size))
        heads = load_medusa(path, target)
        rows = lm_head_rows(model, None)
        dtype = rows.dtype if rows.dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32
        heads.set_dtype(dtype)
        return cls(heads, rows.astype(dtype), choices)

    def reset(self, prompt_tokens: list[int]) -> None:
        """Nothing to reset: the heads read only the last hidden state."""

    def log_probs(self, context: DraftContext, depth: int) -> mx.array:
        """``(depth, V)`` float32 log-probabilities of heads ``0 .. depth - 1``."""
        logits = self.heads.logits(context.hidden, self.rows, depth).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """Beams over the heads ``(W, L)``, or one valid-masked beam per choice."""
        depth = length - 1
        if depth > self.heads.config.num_heads:
            raise ValueError(
                f"beam length {length} needs {depth} Medusa heads; the head has "
                f"{self.heads.config.num_heads}"
            )
        lp = self.log_probs(context, depth)
        root = context.root.astype(mx.int32).reshape(1)
        if self.choices is not None:
            return self._tree(lp, root, depth)
        scores = mx.zeros((1,), mx.float32)
        paths = mx.zeros((1, 0), mx.int32)
        vocab = lp.shape[-1]
        for t in range(depth):
            cand = (scores[:, None] + lp[t][None, :]).reshape(-1)
            top = sorted_top(cand, min(width, cand.shape[0]))
            scores = cand[top]
            paths = mx.concatenate([paths[top // vocab], (top % vocab)[:, None]], axis=1)
        beams = mx.concatenate([mx.broadcast_to(root, (paths.shape[0], 1)), paths], axis=1)
        return Draft(beams=beams)

    def _tree(self, lp: mx.array, root: mx.array, depth: int) -> Draft:
        choices = [c for c in self.choices if len(c) <= depth]
        if not choices:
            raise ValueError(
                f"no medusa_choices path fits beam length {depth + 1} (at most {depth} ranks)"
            )
        ranks = max(max(c) for c in choices) + 1
        ranked = mx.argsort(-lp, axis=-1)[:, :ranks].astype(mx.int32)  # (depth, ranks)
        table = np.zeros((len(choices), depth), dtype=np.int32)
        rows = np.zeros((len(choices), depth), dtype=np.int32)
        valid = np.zeros((len(choices), depth + 1), dtype=bool)
        valid[:, 0] = True
        for b, choice in enumerate(choices):
            table[b, : len(choice)] = choice
            rows[b] = np.arange(depth)
            valid[b, 1 : len(choice) + 1] = True
        paths = ranked[mx.array(rows), mx.array(table)]
        beams = mx.concatenate([mx.broadcast_to(root, (len(choices), 1)), paths], axis=1)
        return Draft(beams=beams, valid=mx.array(valid))

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to update."""
