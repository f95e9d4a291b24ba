"""String-level rejection sampling (SLRS): a draft model of another tokenizer writes a
string, and the target verifies the first target token of that string with the string's
exact probability under the draft model.

Timor et al., "Accelerating LLM Inference with Lossless Speculative Decoding Algorithms
for Heterogeneous Vocabularies" (ICML 2025), Section 3, Algorithm 3. Per drafted target
position:

1. The draft model samples ``d1, d2, ...`` (each from its sampling distribution ``q``:
   the target's temperature / top-p / top-k / min-p on the draft's logits) until the stop
   rule ``S`` holds; ``s = d1 ⊕ ... ⊕ di``.
2. ``t = T(s)[0]``, the first token of the target tokenization of ``s``.
3. ``ψ(t)`` is the probability that steps 1-2 give ``t``: the sum, over every draft-token
   sequence that ``S`` stops and whose string's first target token is ``t``, of
   ``q(d1) q(d2 | d1) ... q(di | d<i)``.
4. The target accepts ``t`` with ``min(1, p(t) / ψ(t))``; on rejection it draws from the
   residual ``(p - min(p, ψ)) / (1 - Σ min(p, ψ))``, i.e. ``norm(max(0, p - ψ))``.

Step 4 is the ordinary chain rule (:func:`mlx_redrafter.accept.accept_chain`) with ``ψ``
as the drafted token's ``q`` (``Draft.draft_logprobs``), so the output keeps the target's
law exactly, token for token, for *any* deterministic ``T`` and ``S`` (the paper's
losslessness argument needs only that ``ψ`` be the exact law of ``t``). This module fixes
them so that ``ψ`` is computable by a trie walk:

* ``T(s)[0]`` is the longest target token that is a prefix of ``s``
  (:class:`~mlx_redrafter.drafters.string_trie.StringTrie`);
* ``S`` stops at the first ``i`` where ``s`` is no longer *open* (a proper prefix of a
  longer target token: ``T(s)[0]`` is then final), or where the path ``d1 .. di`` is not
  *expanded*: ``i = depth``, or the prefix is not among the ``width`` most probable open
  strings of its level, or less probable than ``min_mass``. These bounds depend on the
  context only, so they are part of the stop rule and ``ψ`` stays exact.

``ψ`` is computed in full, level by level: level 1 is the draft's next-token law (every
stopped token adds its mass to ``ψ[T(d)[0]]``); the expanded open strings of a level are
read in **one batched tree forward** of the draft model (prefixes shared between
tokenizations are one node; the cache is rewound after it), and their children are added
in the same way. ``t`` is then drawn from ``ψ`` directly (the same law as running the
draft and tokenizing). Draft tokens that map to no target token (a special token the
target lacks) are dropped and ``ψ`` renormalised (the draft conditioned on not writing
them). The next position continues the draft from a fixed spelling of ``t`` (greedy
longest match in draft tokens).

Cost per drafted target token: up to ``depth - 1`` batched draft forwards (level ``l``
holds up to ``(l - 1) * width`` nodes; none when no open string reaches ``min_mass``), one
forward of ``t``'s spelling, a ``(V,)`` proposal built on the host, one host
synchronisation, and host work per expanded string linear in the target tokens that extend
it (cached per string). A step drafting ``K`` tokens costs ``K`` times that, plus
re-encoding the context (as TLI and SLEM do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.draft_model import DraftRunner
from mlx_redrafter.drafters.string_trie import Children, StringTrie
from mlx_redrafter.drafters.vocab_map import reencode
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import Tree

#: Open strings expanded per level (the most probable first).
WIDTH = 8
#: Draft tokens per drafted target token at most (levels of the walk).
DEPTH = 2
#: Open strings less probable than this are not expanded.
MIN_MASS = 0.01


@dataclass
class StringLaw:
    """The proposal ``ψ`` of one target position (module doc).

    Attributes:
        psi: ``(V,)`` float64 probability of each first target token (sums to 1 less the
            mass of draft tokens that map to no target token).
        single: ``(V,)`` float64 the probability of each token's most probable single
            draft-token sequence (``<= psi``; the gap is what the other tokenizations add).
        forwards: Batched draft forwards the walk used.
        nodes: Tree nodes those forwards held.
    """

    psi: np.ndarray
    single: np.ndarray = field(default=None)  # type: ignore[assignment]
    forwards: int = 0
    nodes: int = 0

    def __post_init__(self) -> None:
        if self.single is None:
            self.single = np.zeros_like(self.psi)

    def add(self, targets: np.ndarray, mass: np.ndarray) -> None:
        """Add ``mass`` ``(n,)`` of stopped sequences to ``psi[targets]`` (``-1``: none)."""
        keep = targets >= 0
        np.add.at(self.psi, targets[keep], mass[keep])
        np.maximum.at(self.single, targets[keep], mass[keep])

    def add_children(self, kids: Children, mass: np.ndarray) -> None:
        """Add ``mass`` ``(V_d,)`` of children stopped after one open string to ``ψ``:
        ``kids.base`` for all but ``kids.longer`` (summed at once, without a scatter over
        ``V_d``)."""
        self.add(kids.longer_targets, mass[kids.longer])
        if kids.base >= 0:
            rest = mass.copy()
            rest[kids.longer] = 0.0
            self.psi[kids.base] += rest.sum()
            self.single[kids.base] = max(self.single[kids.base], rest.max())


@dataclass(frozen=True)
class _Open:
    """An expanded open string: the draft ids writing it, its bytes and its probability."""

    path: tuple[int, ...]
    string: bytes
    mass: float


def _tree(paths: list[tuple[int, ...]]) -> tuple[Tree, list[int]]:
    """The prefix tree of ``paths`` (draft ids) and the node index of each path's end."""
    index: dict[tuple[int, ...], int] = {}
    tokens, depth, parent = [], [], []
    for path in paths:
        for cut in range(1, len(path) + 1):
            prefix = path[:cut]
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(path[cut - 1])
                depth.append(cut - 1)
                parent.append(index[prefix[:-1]] if cut > 1 else -1)
    n = len(tokens)
    mask = np.eye(n, dtype=bool)
    for node in range(n):
        up = parent[node]
        while up >= 0:
            mask[node, up] = True
            up = parent[up]
    tree = Tree(
        tokens=np.array(tokens, dtype=np.int32),
        depth=np.array(depth, dtype=np.int32),
        parent=np.array(parent, dtype=np.int32),
        mask=mask,
        unpack=np.zeros((1, 1), dtype=np.int32),
    )
    return tree, [index[path] for path in paths]


def score_tree(runner: DraftRunner, tree: Tree) -> mx.array:
    """``(N, V_d)`` draft logits after each node of ``tree``, read after the runner's
    cache (evaluated); the cache is rewound to where it was."""
    logits, _ = runner.model.tree_forward(tree, runner.cache)
    mx.eval(logits)
    trim_prompt_cache(runner.cache, tree.size)
    return logits


def _expand(candidates: list[_Open], width: int, min_mass: float) -> list[_Open]:
    """The open strings the stop rule continues: the ``width`` most probable of mass at
    least ``min_mass`` (ties broken by path, so the choice is a function of the context)."""
    kept = [c for c in candidates if c.mass >= min_mass and c.mass > 0]
    return sorted(kept, key=lambda c: (-c.mass, c.path))[:width]


def string_law(
    runner: DraftRunner,
    trie: StringTrie,
    logits: mx.array,
    params: SamplingParams,
    vocab_size: int,
    width: int = WIDTH,
    depth: int = DEPTH,
    min_mass: float = MIN_MASS,
) -> StringLaw:
    """The exact proposal ``ψ`` after the runner's cache (module doc).

    Args:
        runner: The draft model; its cache holds the context (left as it was).
        trie: The target strings read through the draft tokens.
        logits: ``(V_d,)`` draft logits after the context.
        params: The sampling settings (``q`` = :meth:`SamplingParams.probs`).
        vocab_size: ``V``, the target's number of logits.
        width: Open strings expanded per level.
        depth: Draft tokens per string at most.
        min_mass: Open strings less probable than this are not expanded.
    """
    q = np.array(params.probs(logits.astype(mx.float32)), dtype=np.float64)
    law = StringLaw(np.zeros(vocab_size))
    frontier: list[_Open] = []
    if depth > 1:
        opened = np.nonzero(trie.root_open & (q > 0) & (q >= min_mass))[0]
        frontier = _expand(
            [_Open((int(d),), trie.strings[int(d)], float(q[d])) for d in opened],
            width,
            min_mass,
        )
    stopped = q.copy()
    stopped[[node.path[0] for node in frontier]] = 0.0
    law.add(trie.root_target.astype(np.int64), stopped)
    for level in range(2, depth + 1):
        if not frontier:
            break
        tree, rows = _tree([node.path for node in frontier])
        logits = score_tree(runner, tree)
        law.forwards += 1
        law.nodes += tree.size
        probs = np.array(params.probs(logits[mx.array(rows)].astype(mx.float32)), np.float64)
        kids = [trie.children(node.string) for node in frontier]
        candidates = []
        if level < depth:
            for node, row, kid in zip(frontier, probs, kids, strict=True):
                mass = node.mass * row[kid.open_ids]
                keep = (mass >= min_mass) & (mass > 0)
                candidates += [
                    _Open((*node.path, int(d)), node.string + trie.strings[int(d)], float(m))
                    for d, m in zip(kid.open_ids[keep], mass[keep], strict=True)
                ]
        chosen = _expand(candidates, width, min_mass)
        going_on: dict[tuple[int, ...], list[int]] = {}
        for node in chosen:
            going_on.setdefault(node.path[:-1], []).append(node.path[-1])
        for node, row, kid in zip(frontier, probs, kids, strict=True):
            stopped = node.mass * row
            stopped[going_on.get(node.path, [])] = 0.0
            law.add_children(kid, stopped)
        frontier = chosen
    return law


class SlrsDrafter:
    """Drafts target tokens as the first target tokens of strings a draft model of another
    tokenizer writes (module doc).

    Args:
        model: The draft model.
        target_tokenizer: The target's tokenizer.
        draft_tokenizer: The draft model's tokenizer.
        target_size: ``V``, the target's number of logits.
        width: Open strings expanded per level of the walk.
        depth: Draft tokens per string at most.
        min_mass: Open strings less probable than this are not expanded.

    Raises:
        VocabularyMismatchError: if no target token is a prefix of any draft token.
        ValueError: for ``width < 1`` or ``depth < 1``.
    """

    stochastic: bool = True
    needs_host_tokens: bool = True

    def __init__(
        self,
        model: nn.Module,
        target_tokenizer: Any,
        draft_tokenizer: Any,
        target_size: int,
        *,
        width: int = WIDTH,
        depth: int = DEPTH,
        min_mass: float = MIN_MASS,
    ):
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width} and {depth}")
        self.runner = DraftRunner(model)
        self.trie = StringTrie.from_tokenizers(
            target_tokenizer, draft_tokenizer, self.runner.vocab_size
        )
        self.target_tokenizer = target_tokenizer
        self.draft_tokenizer = draft_tokenizer
        self.target_size = target_size
        self.width = width
        self.depth = depth
        self.min_mass = min_mass
        self.forwards = 0  # batched walk forwards since construction (for measurements)

    def reset(self, prompt_tokens: list[int]) -> None:
        """Start a new sequence: an empty draft cache."""
        self.runner.reset()

    def accepted(self, tokens: list[int]) -> None:
        """Nothing to do: the next :meth:`propose` re-encodes the extended text."""

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        """A ``(1, L)`` chain of target ids, each drawn from its ``ψ`` (module doc), with
        ``log ψ`` ``(1, L-1, V)`` (``None`` when greedy: the argmax of ``ψ``).

        Raises:
            ValueError: if ``width != 1``.
        """
        if width != 1:
            raise ValueError(f"a draft model drafts one chain: use beam width 1 (got {width})")
        params = context.params
        ids = reencode(context.tokens, self.target_tokenizer, self.draft_tokenizer)
        logits = self.runner.start(ids, stable=False)
        drafted, logprobs = [context.tokens[-1]], []
        for j in range(length - 1):
            law = string_law(
                self.runner,
                self.trie,
                logits,
                params,
                self.target_size,
                self.width,
                self.depth,
                self.min_mass,
            )
            self.forwards += law.forwards
            token, logq = self._draw(law, logits, params)
            drafted.append(token)
            if logq is not None:
                logprobs.append(logq)
            if j < length - 2:
                logits = self.runner.extend(self._spelling(token))
        beams = mx.array([drafted], dtype=mx.int32)
        return Draft(beams=beams, draft_logprobs=mx.stack(logprobs)[None] if logprobs else None)

    def _spelling(self, token: int) -> list[int]:
        """Draft ids that write target ``token`` (the trie's spelling, else re-encoded)."""
        path = self.trie.spell(token)
        if path is None:
            return reencode([token], self.target_tokenizer, self.draft_tokenizer)
        return list(path)

    def _draw(
        self, law: StringLaw, logits: mx.array, params: SamplingParams
    ) -> tuple[int, mx.array | None]:
        """A target token from ``ψ`` and ``log ψ`` ``(V,)`` (``None`` when greedy)."""
        total = law.psi.sum()
        if total <= 0:  # no draft token maps to a target token: the likeliest one that does
            raw = np.array(logits.astype(mx.float32))
            raw[self.trie.root_target < 0] = -np.inf
            law.psi[int(self.trie.root_target[int(np.argmax(raw))])] = total = 1.0
        if params.greedy:
            return int(np.argmax(law.psi)), None
        with np.errstate(divide="ignore"):
            token = int(mx.random.categorical(mx.array(np.log(law.psi / total), mx.float32)).item())
            reported = law.psi
            logq = mx.array(np.log(reported / total), dtype=mx.float32)
        return token, logq
