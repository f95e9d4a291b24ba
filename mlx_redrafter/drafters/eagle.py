"""The feature-level drafter: an :class:`~.eagle_head.EagleHead` drafting chains, beams or
EAGLE-2 dynamic trees for any mlx-lm target.

State: the head's own KV cache over entries ``(f_j, x_{j+1})`` for every accepted position
``j < position`` (``position`` = index of the root token). The cache is a fixed-capacity
buffer ``(1, Hkv, capacity, hd)`` whose last slot is scratch; entries are written at their
position, so rolling back is free (a later step overwrites what it does not keep) and
attention masks keys by position (``key < position`` plus the query's tree ancestors).

One step, all lazy (drawn before the engine's host synchronisation):

1. ``context.recent_hidden`` / ``recent_tokens`` (the last ``C`` accepted positions and the
   token after each) are turned into entries; those not yet in the cache (position >= the
   previous root's) are written. The last one, the root's entry, attends the cache and
   gives the depth-1 distribution.
2. Growing: at each depth the ``k`` best nodes so far (cumulative draft log-probability)
   are run through the layer (their entries: the parent's predicted feature and their own
   token; they attend the cache and their tree ancestors) and each proposes its ``k``
   best children.
3. Selection: beam search keeps the ``W = k`` paths of the last depth; a dynamic tree
   keeps the ``N`` best nodes of every depth (ancestor-closed: a child scores below its
   parent), one beam per node (the engine's packing merges shared prefixes).

The target's prompt pass gives every prompt position's state to :meth:`prime`.

The head is either an :class:`~.eagle_head.EagleHead` (EAGLE-1/2, features: the target's
final-norm output) or an :class:`~.eagle3_head.Eagle3Head` (features: the target's
residual streams at the inputs of the layers in :attr:`EagleDrafter.feature_layers`; the
engine asks :class:`~mlx_redrafter.target.Target` for them); both go through
``head.inputs`` (residual and attention input of an entry), ``head.layer`` and
``head.logits``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.eagle3_head import Eagle3Head, tap_layers
from mlx_redrafter.drafters.eagle_head import EagleHead, load_head
from mlx_redrafter.drafters.redrafter import compute_dtype, find_input_embedding
from mlx_redrafter.drafters.sampled_chain import to_target_space
from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError

#: Capacity of the head's cache grows in steps of this many entries.
CACHE_STEP = 512
#: Default number of recent accepted positions the engine passes (>= beam length).
DEFAULT_WINDOW = 8


def lm_head_rows(model: nn.Module, ids: np.ndarray | None) -> mx.array:
    """``(K, d)`` rows of ``model``'s LM head for target ids ``ids`` (all rows when None).

    Reads ``lm_head`` or, for tied embeddings, ``model.embed_tokens``; quantized tables
    are dequantized.
    """
    inner = getattr(model, "model", model)
    table = getattr(model, "lm_head", None)
    if table is None:
        table = getattr(inner, "embed_tokens", None)
    if table is None or not hasattr(table, "weight"):
        raise ValueError("cannot find the target's LM head (lm_head or tied embed_tokens)")
    index = None if ids is None else mx.array(np.asarray(ids, dtype=np.int32))
    weight = table.weight if index is None else table.weight[index]
    scales = getattr(table, "scales", None)
    if scales is not None:
        biases = getattr(table, "biases", None)
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        weight = mx.dequantize(
            weight,
            pick(scales),
            None if biases is None else pick(biases),
            group_size=table.group_size,
            bits=table.bits,
            **({"mode": table.mode} if hasattr(table, "mode") else {}),
        )
    return weight


@dataclass(frozen=True)
class Candidates:
    """Every node a growing pass created (lazy), over depths ``1 .. D``.

    Attributes:
        paths: ``(M, D)`` int32 target ids of each node's path after the root (0-padded).
        depth: ``(M,)`` int32 node depth ``1 .. D``.
        scores: ``(M,)`` float32 cumulative draft log-probability.
        last: ``(k, D)`` paths of the ``k`` best nodes of the last depth (beam search).
    """

    paths: mx.array
    depth: mx.array
    scores: mx.array
    last: mx.array


class EagleDrafter:
    """Drafts with a feature-level head for ``model`` (see the module docstring).

    Args:
        head: The head (:class:`EagleHead` or :class:`~.eagle3_head.Eagle3Head`).
        rows: ``(K, d)`` the target's LM-head rows of the draft vocabulary, or ``None``
            for a head with its own output layer.
        embed: The target's input embedding (ids -> ``(..., d)``).
        draft_vocab: ``(K,)`` target ids of the draft vocabulary, or ``None`` (``K = V``).
        tree_nodes: ``N`` for an EAGLE-2 dynamic tree (``W`` is then the children expanded
            per node); ``None`` for beam search (``W = 1``: a chain).
        window: Recent accepted positions the engine passes (``>= L``).
        sample: When sampling (``temp > 0``) with ``W = 1`` and no tree, draw the chain from
            the head under the target's transforms (verified with ``min(1, p/q)``);
            otherwise drafts are deterministic (the exact walk verifies them either way).
        feature_layers: Target layers whose inputs (pre-norm residual streams,
            concatenated) are the features the head reads (EAGLE-3); ``None``: the
            target's final-norm output. The engine passes it to
            :class:`~mlx_redrafter.target.Target` as ``taps``.
    """

    stochastic = False
    needs_host_tokens = False

    def __init__(
        self,
        head: EagleHead,
        rows: mx.array | None,
        embed,
        draft_vocab: np.ndarray | None = None,
        tree_nodes: int | None = None,
        window: int = DEFAULT_WINDOW,
        sample: bool = True,
        feature_layers: tuple[int, ...] | None = None,
    ):
        self.sample = sample
        self.head = head
        self.rows = rows
        self.dtype = rows.dtype if rows is not None else head.fc.weight.dtype
        self.feature_layers = feature_layers
        self.embed = embed
        self.vocab = None if draft_vocab is None else mx.array(draft_vocab.astype(np.int32))
        self.tree_nodes = tree_nodes
        self.hidden_window = int(window)
        cfg = head.config
        self._shape = (1, cfg.num_key_value_heads, 0, cfg.head_dim)
        self.reset([])

    @classmethod
    def from_model(
        cls, model: nn.Module, path: str | Path, tree_nodes: int | None = None
    ) -> EagleDrafter:
        """Load the head at ``path`` for target ``model``, checked against it."""
        head, vocab = load_head(path)
        return cls.for_target(model, head, vocab, tree_nodes=tree_nodes, source=path)

    @classmethod
    def for_target(
        cls,
        model: nn.Module,
        head: EagleHead | Eagle3Head,
        vocab: np.ndarray | None = None,
        tree_nodes: int | None = None,
        source: str | Path = "",
    ) -> EagleDrafter:
        """A drafter of ``head`` (draft vocabulary ``vocab`` (K,) or ``None``) for target
        ``model``, checked against it (``source`` names the head in errors); the head is
        cast to the dtype the target computes in. An EAGLE-3 head reads the target
        layers :func:`~.eagle3_head.tap_layers` names and, without its own embedding,
        embeds with the target's (then its width must be the target's).

        Raises:
            VocabularyMismatchError: hidden size or vocabulary differ (both named).
            ValueError: too few target layers for EAGLE-3's taps.
        """
        path = source
        cfg = head.config
        reads = int(getattr(cfg, "target_hidden_size", cfg.hidden_size))
        args = getattr(model, "args", None)
        d = int(getattr(args, "hidden_size", 0) or 0)
        v = int(getattr(args, "vocab_size", 0) or 0)
        if (d, v) != (reads, cfg.vocab_size):
            raise VocabularyMismatchError(
                f"eagle head {path} was made for hidden size {reads} and vocabulary "
                f"{cfg.vocab_size}; the target has hidden size {d} and vocabulary {v}"
            )
        layers = None
        embed = find_input_embedding(model)
        if isinstance(head, Eagle3Head):
            layers = tap_layers(len(model.layers))
            if cfg.has_embedding:
                embed = head.embed_tokens
            elif cfg.hidden_size != d:
                raise VocabularyMismatchError(
                    f"eagle3 head {path} has width {cfg.hidden_size} and no embed_tokens; "
                    f"the target's embedding has width {d}"
                )
        rows = None if cfg.own_head else lm_head_rows(model, vocab)
        dtype = compute_dtype(model)
        head.set_dtype(dtype)
        rows = None if rows is None else rows.astype(dtype)
        return cls(head, rows, embed, vocab, tree_nodes=tree_nodes, feature_layers=layers)

    def with_tree(self, tree_nodes: int | None) -> EagleDrafter:
        """The same head drafting dynamic trees of ``tree_nodes`` (``None``: beams)."""
        other = copy.copy(self)
        other.tree_nodes = tree_nodes
        other.reset([])
        return other

    # -- sequence state ----------------------------------------------------------------

    def reset(self, prompt_tokens: list[int]) -> None:
        """Forget the previous sequence."""
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.cached = mx.array(0, dtype=mx.int32)  # entries below this position are written

    def _reserve(self, bound: int) -> None:
        """Grow the cache so positions ``< bound`` fit below the scratch slot."""
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if bound + 1 <= capacity:
            return
        new = (bound + 1 + CACHE_STEP - 1) // CACHE_STEP * CACHE_STEP
        dtype = self.dtype
        grow = mx.zeros((*self._shape[:2], new - capacity, self._shape[3]), dtype=dtype)
        if self.keys is None:
            # two buffers: item assignment writes in place, so one shared array would
            # hold the values in the keys' slots
            self.keys, self.values = grow, mx.zeros_like(grow)
        else:
            # the old scratch slot becomes an ordinary (unwritten) slot: nothing reads it
            self.keys = mx.concatenate([self.keys, grow], axis=2)
            self.values = mx.concatenate([self.values, grow], axis=2)

    def _write(self, features: mx.array, next_tokens: mx.array, positions: mx.array) -> mx.array:
        """Write the entries at ``positions`` (n,) not yet cached; returns their queries
        ``(1, H, n, hd)`` and layer inputs ``(n, d)``."""
        x, z = self.head.inputs(self.embed(next_tokens), features.astype(self.dtype))
        q, k, v = self.head.layer.self_attn.qkv(z[None], positions)
        scratch = self.keys.shape[2] - 1
        slots = mx.where(positions >= self.cached, positions, scratch)
        self.keys[:, :, slots] = k
        self.values[:, :, slots] = v
        return q, x

    def prime(self, hidden: mx.array, next_tokens: mx.array, start: int = 0) -> None:
        """The prompt pass: entries for positions ``start .. start+n-1`` (lazy).

        Args:
            hidden: ``(n, d)`` the target's states at those prompt positions.
            next_tokens: ``(n,)`` the token after each (the prompt shifted, then the root).
            start: First position read (``> 0``: the entries below it were restored with
                :meth:`restore_sequence`).
        """
        n = hidden.shape[0]
        if start == 0:
            self.cached = mx.array(0, dtype=mx.int32)
        self._reserve(start + n)
        self._write(hidden, next_tokens, start + mx.arange(n, dtype=mx.int32))
        self.cached = mx.array(start + n, dtype=mx.int32)

    def save_sequence(self) -> tuple[mx.array | None, mx.array | None, mx.array]:
        """The sequence's draft cache ``(keys, values, cached)``, for a prompt cache."""
        return self.keys, self.values, self.cached

    def restore_sequence(self, state: tuple, length: int) -> int:
        """Continue a saved sequence whose first ``length + 1`` tokens are unchanged;
        returns how many positions' entries are kept (``<= length``)."""
        self.keys, self.values, cached = state
        keep = min(length, int(cached.item())) if self.keys is not None else 0
        self.cached = mx.array(keep, dtype=mx.int32)
        return keep

    # -- drafting ----------------------------------------------------------------------

    def _attend(self, q: mx.array, x: mx.array, mask: mx.array, tree_k, tree_v) -> mx.array:
        """Layer output ``(n, d)`` of entries ``x`` with queries ``q`` over the cache and
        the tree entries so far (bool ``mask`` (n, capacity + tree))."""
        keys = mx.concatenate([self.keys, *tree_k], axis=2) if tree_k else self.keys
        values = mx.concatenate([self.values, *tree_v], axis=2) if tree_v else self.values
        out = self.head.layer.self_attn.attend(q, keys, values, mask)[0]
        return self.head.layer.finish(x, out)

    def _log_probs(self, out: mx.array) -> mx.array:
        logits = self.head.logits(out, self.rows).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def _to_target(self, ids: mx.array) -> mx.array:
        return ids if self.vocab is None else self.vocab[ids]

    def _advance(self, context: DraftContext, depth: int) -> tuple[mx.array, mx.array]:
        """Write the newly accepted entries; returns the root entry's output ``(1, d)`` and
        the cache keys every draft node sees ``(capacity,)`` bool."""
        rows, nxt = context.recent_hidden, context.recent_tokens
        c = rows.shape[0]
        position = context.position.astype(mx.int32)
        self._reserve(len(context.tokens) + 2 * (depth + c) + 1)
        positions = position - c + mx.arange(c, dtype=mx.int32)
        q, x = self._write(rows, nxt, positions)
        self.cached = position
        capacity = self.keys.shape[2]
        key_pos = mx.arange(capacity, dtype=mx.int32)
        visible = (key_pos < position) & (key_pos < capacity - 1)
        return self._attend(q[:, :, -1:], x[-1:], visible[None], [], []), visible

    def _node(
        self, token: mx.array, feature: mx.array, position: mx.array, mask: mx.array, tree_k, tree_v
    ) -> mx.array:
        """Outputs ``(k, d)`` of draft nodes with target ids ``token`` ``(k,)`` and parent
        features ``(k, d)`` at ``position``; their keys join ``tree_k/v``."""
        x, z = self.head.inputs(self.embed(token), feature, from_target=False)
        pos = mx.broadcast_to(position, token.shape)
        q, kk, vv = self.head.layer.self_attn.qkv(z[None], pos)
        tree_k.append(kk)
        tree_v.append(vv)
        return self._attend(q, x, mask, tree_k, tree_v)

    def sample_chain(self, context: DraftContext, depth: int) -> tuple[mx.array, mx.array]:
        """A chain drawn from the head under the target's sampling transforms.

        Returns:
            ``chain (1, depth)`` target ids after the root and ``log_q (depth, V)`` float32,
            the normalised log-probabilities each token was drawn from (``-inf`` off the
            draft vocabulary).
        """
        out, visible = self._advance(context, depth)
        position = context.position.astype(mx.int32)
        k = self.head.config.draft_size
        gumbel = mx.random.gumbel(shape=(depth, k))
        tokens, log_q = [], []
        tree_k: list[mx.array] = []
        tree_v: list[mx.array] = []
        for t in range(depth):
            if t:
                mask = mx.concatenate([visible, mx.ones((t,), mx.bool_)])[None]
                out = self._node(tokens[-1], out, position - 1 + t, mask, tree_k, tree_v)
            weights = context.params.logits(self.head.logits(out, self.rows).astype(mx.float32))
            step = (weights - mx.logsumexp(weights, axis=-1, keepdims=True))[0]
            drawn = mx.argmax(step + gumbel[t], keepdims=True)
            tokens.append(self._to_target(drawn))
            log_q.append(step)
        log_q = to_target_space(mx.stack(log_q), self.vocab, self.head.config.vocab_size)
        return mx.concatenate(tokens)[None], log_q

    def grow(self, context: DraftContext, k: int, depth: int) -> Candidates:
        """Advance the cache to ``context.position`` and grow ``depth`` levels of ``k``."""
        out, visible = self._advance(context, depth)
        position = context.position.astype(mx.int32)
        capacity = visible.shape[0]
        logp = self._log_probs(out)[0]  # (K,)
        top = mx.argsort(-logp)[:k]
        scores = logp[top]
        paths = self._to_target(top)[:, None]  # (k, 1)
        all_paths, all_depth, all_scores = [paths], [mx.ones((k,), mx.int32)], [scores]
        front_paths, front_scores = paths, scores
        front_tok, front_feat = top, mx.broadcast_to(out, (k, out.shape[-1]))
        ancestors = mx.zeros((k, 0), dtype=mx.bool_)
        tree_k: list[mx.array] = []
        tree_v: list[mx.array] = []
        eye = mx.eye(k, dtype=mx.bool_)
        for t in range(1, depth):
            own = mx.concatenate([ancestors, eye], axis=1)  # (k, k * t)
            mask = mx.concatenate([mx.broadcast_to(visible, (k, capacity)), own], axis=1)
            tgt = self._to_target(front_tok)
            out = self._node(tgt, front_feat, position - 1 + t, mask, tree_k, tree_v)  # (k, d)
            logp = self._log_probs(out)  # (k, K)
            child = mx.argsort(-logp, axis=-1)[:, :k]  # (k, k)
            child_scores = (front_scores[:, None] + mx.take_along_axis(logp, child, -1)).reshape(-1)
            parent = mx.repeat(mx.arange(k), k)
            child_tok = child.reshape(-1)
            cand_paths = mx.concatenate(
                [front_paths[parent], self._to_target(child_tok)[:, None]], axis=1
            )
            all_paths.append(cand_paths)
            all_depth.append(mx.full((k * k,), t + 1, mx.int32))
            all_scores.append(child_scores)
            best = mx.argsort(-child_scores)[:k]
            chosen = parent[best]
            front_paths, front_scores = cand_paths[best], child_scores[best]
            front_tok, front_feat = child_tok[best], out[chosen]
            ancestors = mx.concatenate([ancestors[chosen], eye[chosen]], axis=1)
        width = depth
        padded = [mx.pad(p, [(0, 0), (0, width - p.shape[1])]) for p in all_paths]
        return Candidates(
            paths=mx.concatenate(padded),
            depth=mx.concatenate(all_depth),
            scores=mx.concatenate(all_scores),
            last=front_paths,
        )

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """Beam search (``W`` beams, chain at ``W = 1``) or a dynamic tree of ``N`` nodes
        with ``W`` children per expanded node; beams ``(W or N, L)``."""
        if context.recent_hidden is None or context.recent_tokens is None:
            raise ValueError("the eagle drafter needs the engine's recent states and tokens")
        if length > self.hidden_window:
            raise ValueError(
                f"beam length {length} exceeds the drafter's window {self.hidden_window}"
            )
        depth = length - 1
        root = mx.broadcast_to(context.root.astype(mx.int32), (1,))
        if self.sample and width == 1 and self.tree_nodes is None and not context.params.greedy:
            chain, log_q = self.sample_chain(context, depth)
            beams = mx.concatenate([root[None], chain], axis=1)
            return Draft(beams=beams, proposal=log_q, state=self.state())
        cand = self.grow(context, width, depth)
        if self.tree_nodes is None:
            beams = mx.concatenate([mx.broadcast_to(root, (width, 1)), cand.last], axis=1)
            return Draft(beams=beams, state=self.state())
        n = min(self.tree_nodes, int(cand.paths.shape[0]))
        # a child never outscores its parent; the depth term breaks ties toward parents
        order = mx.argsort(-(cand.scores - 1e-4 * cand.depth.astype(mx.float32)))[:n]
        paths, depths = cand.paths[order], cand.depth[order]
        beams = mx.concatenate([mx.broadcast_to(root, (n, 1)), paths], axis=1)
        valid = mx.arange(length)[None, :] <= depths[:, None]
        return Draft(beams=beams, valid=valid, state=self.state())

    def state(self) -> list[mx.array]:
        """Arrays to evaluate in the step's synchronisation (the cache)."""
        return [self.keys, self.values, self.cached]

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to do: the next proposal writes the accepted entries."""
