"""String-level rejection sampling (SLRS): a draft model of another tokenizer proposes
target tokens through the strings it writes, with their exact string-level probability.

Timor et al. (ICML 2025), the third lossless heterogeneous-vocabulary method. The draft
model writes text in its own tokens; a drafted *target* token is a string ``s`` the draft
writes, and its proposal probability ``ψ(s)`` sums the draft's probability over every
draft-token sequence that spells ``s``. The target verifies it with the ordinary chain
rule on the normalised proposal ``Q`` (below): accept with ``min(1, p(t) / Q(t))``, on
rejection resample from ``norm(max(0, p - Q))``
(:func:`mlx_redrafter.accept.accept_chain`), so the output keeps the target's law
exactly, token for token.

The proposal, one target token at a time (after the context, and after each drafted
token the path that spelled it):

* The draft writes tokens ``d1, d2, ...`` (each from its sampling distribution ``q``:
  the target's temperature / top-p / top-k / min-p on the draft's logits) and stops at
  the first token boundary where its string is a target token's byte string ``s``: it
  proposes that token. A string that is no target token and no prefix of one is a dead
  end, and so is one past the bounds below. ``ψ(t)`` is the probability of stopping at
  ``t``: the sum, over every draft-token sequence ``d1 .. dk`` spelling ``bytes(t)``
  whose earlier boundaries are no target token, of ``q(d1) q(d2 | d1) ... q(dk | d<k)``.
  (The first-boundary rule makes the stops disjoint events, so ``ψ`` sums to at most 1;
  summing over *every* spelling would count a path through ``"a" + "b"`` both for ``a``
  and ``ab``.)
* Dead ends are resampled (the draft starts over), so the drafted token is a sample of
  ``Q = ψ / Σψ``; it is drawn directly from ``Q``, which is computed in full, and
  ``Q`` is the ``q`` of the chain rule (``Draft.draft_logprobs``). The next position
  continues from the most probable spelling of the drafted token.

``ψ`` is computed exactly by walking the trie of target strings (:class:`StringTrie`)
through draft tokens, level by level: level 1 is the draft's next-token distribution
(terminal tokens add their mass to ``ψ``); the ``width`` most probable open strings are
expanded, all of a level in one batched tree forward of the draft model (shared prefixes
are one node; the cache is rewound after it), and so on up to ``depth`` draft tokens per
target token. Open strings not expanded (beyond the ``width`` most probable, or less
probable than ``min_mass``) are dead ends: they belong to the proposal's definition (the bound), so
``ψ`` stays the exact law of what is sampled.

Cost per drafted target token: one host synchronisation, up to ``depth - 1`` batched
draft forwards (level ``l`` holds up to ``(l - 1) * width`` nodes; none when no open
string reaches ``min_mass``), one forward of the chosen
spelling (``<= depth`` tokens), and host work linear in the target tokens that extend the
expanded strings (cached per string). A step drafting ``K`` tokens costs ``K`` times that,
plus re-encoding the context (as TLI and SLEM do).

Where it pays (the paper's analysis): the number of spellings of a string grows
exponentially with its length, and only strings the draft vocabulary splits finely (small
draft vocabularies, target tokens the draft lacks) gain from them; with two large
byte-level BPE vocabularies that share most short tokens, nearly every draft token is
already a target token and stops at level 1 (``ψ`` is then the draft's ``q`` on the
shared tokens, as in TLI but without renormalising).
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
from mlx_redrafter.drafters.string_trie import StringTrie
from mlx_redrafter.drafters.vocab_map import reencode
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import Tree

#: Open strings expanded per level (the most probable first).
WIDTH = 8
#: Draft tokens per drafted target token (levels of the walk).
DEPTH = 2
#: Open strings less probable than this are not expanded (a walk forward is skipped when
#: none is more probable).
MIN_MASS = 0.01


@dataclass
class StringLaw:
    """The proposal ``ψ`` of one target token (module doc).

    Attributes:
        psi: ``(V,)`` float64 mass of stopping at each target token (sums to <= 1).
        spellings: ``target id -> (mass, draft ids)``, the most probable spelling found
            for each target token of ``psi > 0``.
        forwards: Batched draft forwards the walk used.
        nodes: Tree nodes those forwards held.
    """

    psi: np.ndarray
    spellings: dict[int, tuple[float, tuple[int, ...]]] = field(default_factory=dict)
    forwards: int = 0
    nodes: int = 0

    def one_spelling(self) -> np.ndarray:
        """``(V,)`` the mass of each token's most probable spelling alone (``<= psi``; the
        gap is what the other spellings add)."""
        single = np.zeros_like(self.psi)
        for target, (mass, _) in self.spellings.items():
            single[target] = mass
        return single

    def add(self, targets: np.ndarray, mass: np.ndarray, spelling: list[tuple[int, ...]]):
        """Add ``mass`` ``(n,)`` to ``psi[targets]``, keeping each token's best spelling."""
        np.add.at(self.psi, targets, mass)
        for target, m, path in zip(targets.tolist(), mass.tolist(), spelling, strict=True):
            if m > self.spellings.get(target, (0.0,))[0]:
                self.spellings[target] = (m, path)


@dataclass(frozen=True)
class _Open:
    """An open string: the draft ids spelling it, its bytes and its probability."""

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
        depth: Draft tokens per target token.
        min_mass: Open strings less probable than this are dead ends.
    """
    q = np.array(params.probs(logits.astype(mx.float32)), dtype=np.float64)
    law = StringLaw(np.zeros(vocab_size))
    terminal = np.nonzero((trie.root_target >= 0) & (q > 0))[0]
    law.add(trie.root_target[terminal], q[terminal], [(int(d),) for d in terminal])
    frontier = _most_probable(
        [
            _Open((int(d),), trie.strings[int(d)], float(q[d]))
            for d in np.nonzero(trie.root_open & (q >= min_mass) & (q > 0))[0]
        ],
        width,
    )
    for level in range(2, depth + 1):
        if not frontier:
            break
        tree, rows = _tree([node.path for node in frontier])
        logits = score_tree(runner, tree)
        law.forwards += 1
        law.nodes += tree.size
        probs = np.array(params.probs(logits[mx.array(rows)].astype(mx.float32)), np.float64)
        opened = []
        for node, row in zip(frontier, probs, strict=True):
            ends, open_ids = trie.children(node.string)
            if ends:
                drafts, targets = np.array(ends, dtype=np.int64).T
                law.add(targets, node.mass * row[drafts], [(*node.path, int(d)) for d in drafts])
            if level < depth:
                opened += [
                    _Open((*node.path, d), node.string + trie.strings[d], node.mass * row[d])
                    for d in open_ids
                    if node.mass * row[d] >= min_mass and row[d] > 0
                ]
        frontier = _most_probable(opened, width)
    return law


def _most_probable(nodes: list[_Open], width: int) -> list[_Open]:
    return sorted(nodes, key=lambda node: -node.mass)[:width]


class SlrsDrafter:
    """Drafts target tokens as strings written by a draft model of another tokenizer.

    Args:
        model: The draft model.
        target_tokenizer: The target's tokenizer.
        draft_tokenizer: The draft model's tokenizer.
        target_size: ``V``, the target's number of logits.
        width: Open strings expanded per level of the walk.
        depth: Draft tokens per drafted target token.
        min_mass: Open strings less probable than this are not expanded.

    Raises:
        VocabularyMismatchError: if no draft token spells a target token.
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
        """A ``(1, L)`` chain of target ids, each drawn from its ``Q`` (module doc), with
        ``log Q`` ``(1, L-1, V)`` (``None`` when greedy: the argmax of ``Q``).

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
                logits = self.runner.extend(list(law.spellings[token][1]))
        beams = mx.array([drafted], dtype=mx.int32)
        return Draft(beams=beams, draft_logprobs=mx.stack(logprobs)[None] if logprobs else None)

    def _draw(
        self, law: StringLaw, logits: mx.array, params: SamplingParams
    ) -> tuple[int, mx.array | None]:
        """A target token from ``Q = ψ / Σψ`` and ``log Q`` ``(V,)`` (``None`` when greedy)."""
        total = law.psi.sum()
        if total <= 0:  # every string dead-ends: propose the draft's likeliest terminal token
            raw = np.array(logits.astype(mx.float32))
            raw[self.trie.root_target < 0] = -np.inf
            best = int(np.argmax(raw))
            target = int(self.trie.root_target[best])
            law.psi[target] = 1.0
            law.spellings[target] = (1.0, (best,))
            total = 1.0
        if params.greedy:
            return int(np.argmax(law.psi)), None
        with np.errstate(divide="ignore"):
            logq = mx.array(np.log(law.psi / total), dtype=mx.float32)
        return int(mx.random.categorical(logq).item()), logq
