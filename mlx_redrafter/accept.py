"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

Every rule takes the packed tree (host structure + lazy device tokens), the target's
logits at every tree node and returns an :class:`Acceptance` of *lazy, fixed-shape* arrays,
so a decoding step needs a single host synchronisation (to read ``num_accepted``).

Rules
-----
``greedy``
    Per beam, the accepted length is the longest prefix whose drafted tokens equal the
    target's argmax at their parent; the best beam wins (ties: lowest index); the target's
    argmax after the last accepted token is emitted too. Identical to AR greedy decoding.

``exact`` (default for ``temp > 0``): recursive rejection sampling over the tree.
    Drafts from beam search (or lookup) are deterministic: conditional on the context, the
    draft tree is a fixed set of candidate children at each node, i.e. the proposal
    distribution is a point mass (``q = 1`` on the proposed child). Starting at the root
    with residual ``r := p(. | node)`` (the target's sampling distribution after the user's
    transforms), visit the node's distinct children ``c_1 .. c_m`` in the drafter's order;
    accept ``c_i`` with probability ``r(c_i) / sum(r)``; on acceptance descend to ``c_i``
    and start again there; on rejection set ``r(c_i) = 0``. If every child is rejected,
    emit a sample from ``r / sum(r)`` and stop; at a leaf, emit a sample from
    ``p(. | leaf)``.

    *Why the emitted token has law p.* Let ``R_0 = p`` and ``R_i`` be ``R_{i-1}`` with
    ``c_i`` removed (unnormalised). Token ``x`` is emitted at this node either by accepting
    child ``c_i = x`` (only possible for one i) or, if all children are rejected, by the
    final residual draw. P(reach the test of c_i) = ``|R_{i-1}| / |R_0|`` (telescoping: each
    rejection happens with probability ``|R_i| / |R_{i-1}|``). So for ``x = c_i``:
    ``P = |R_{i-1}|/|R_0| * R_{i-1}(x)/|R_{i-1}| = p(x)`` since ``R_{i-1}(x) = p(x)``; and
    for ``x`` not a child: ``P = |R_m|/|R_0| * R_m(x)/|R_m| = p(x)``. Hence the token at
    every depth is distributed as ``p(. | prefix)``, whatever the draft — the output has
    the target's distribution exactly. The acceptance uniforms are fresh per test, and the
    draft never depends on them.

    *Cost.* Since ``|R_i| = 1 - p(c_1) - ... - p(c_i)``, the tests need only the children's
    probabilities ``(N, C)`` and one normaliser per node; the single sampled token is a
    Gumbel-max draw over ``V`` at the node where the walk stops, with that node's
    (rejected) children masked out.

    *A sampled first beam* (``Draft.proposal``: a ReDrafter head's chain drawn from ``q``).
    At a node of beam 0 its child ``c_1`` is a sample from the node's ``q``, independent
    of the walk's uniforms. It is tested first, with the speculative-sampling ratio:
    accepted with probability ``min(1, p(c_1)/q(c_1))``. That emits ``x`` via ``c_1`` with
    probability ``min(p(x), q(x))``; it rejects with probability ``M = sum max(0, p - q)``,
    after which the law still to be produced is ``R_1 = max(0, p - q) / M`` (the chain
    rule's argument below). The remaining, deterministic children are then tested
    against ``R_1`` exactly as above, and a stop draws from ``R_1`` with the rejected
    children removed. Every path emits ``min(p, q) + M R_1 = p``. The rest of beam 0 is
    sampled from ``q`` given ``c_1`` after ``c_1`` was drawn, so a descent to ``c_1`` is
    the same situation one token later; other subtrees are deterministic.

``chain`` (drafts *sampled* from a proposal ``q``, e.g. a draft model at T > 0, width 1):
    the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) —
    accept ``x_j`` with probability ``min(1, p(x_j)/q(x_j))``, otherwise emit a sample from
    ``norm(max(0, p - q))`` and stop; after a fully accepted chain emit a bonus sample from
    ``p``.

    *Why the emitted token has law p.* At one position ``x ~ q``; the token is ``x``
    accepted with probability ``q(x) min(1, p(x)/q(x)) = min(p(x), q(x))``. Rejection has
    probability ``1 - sum_x min(p, q) = sum_x max(0, p - q) =: Z``, and then the token is
    ``max(0, p(x) - q(x)) / Z``. Together: ``min(p, q) + max(0, p - q) = p``. Given an
    accepted ``x_j`` the next position is the same situation one token later (the draft's
    next token is sampled from ``q(. | prefix, x_j)`` and fresh uniforms decide), so by
    induction every emitted token follows ``p(. | prefix)``.

Valid masks
-----------
A tree packed with a ``valid`` mask (:func:`~mlx_redrafter.tree.pack`) has no nodes for
unusable positions, so the exact walk never sees them; the greedy, chain and ReDrafter
rules, which walk ``tree.unpack`` beam by beam, stop at the first unusable position.

``redrafter`` (ReDrafter's published rule, **approximate**, for comparison only): every
    beam is tested on its own with ``min(1, p/q)`` where ``q`` is the head's probability of
    the beam token, the longest accepted beam is kept and a token is drawn from
    ``norm(relu(p - q))`` at its first rejection. Beams from deterministic beam search are
    not samples from ``q``, and choosing the best of several beams biases the result, so
    this rule does not preserve the target distribution (``tests/test_exact_sampling.py``
    shows a goodness-of-fit test rejecting it).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_redrafter import fast_math
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import Tree

RULES = ("exact", "redrafter")
#: Below this residual mass the chain rule draws from ``p`` (``p == q`` up to rounding).
RESIDUAL_FLOOR = 1e-6


@dataclass
class Acceptance:
    """Result of verifying one tree (all arrays lazy).

    Attributes:
        num_accepted: ``()`` int32, drafted tokens accepted (0 .. L-1).
        drafted: ``(L-1,)`` int32, the drafted tokens of the chosen path; the first
            ``num_accepted`` of them are kept.
        path: ``(L,)`` int32 packed node indices of the chosen path, root first; nodes
            ``path[: num_accepted + 1]`` stay in the target's cache.
        next_root: ``()`` int32, the target's own token after the accepted ones.
        last_node: ``()`` int32, ``path[num_accepted]`` (where the next draft starts).
    """

    num_accepted: mx.array
    drafted: mx.array
    path: mx.array
    next_root: mx.array
    last_node: mx.array


def _finish(
    tree: Tree, tokens: mx.array, best: mx.array, num: mx.array, next_root: mx.array
) -> Acceptance:
    unpack = mx.array(tree.unpack)
    path = unpack[best]
    last = mx.take(path, num)
    return Acceptance(
        num_accepted=num.astype(mx.int32),
        drafted=tokens[path[1:]],
        path=path,
        next_root=next_root.astype(mx.int32),
        last_node=last,
    )


def usable_mask(tree: Tree) -> mx.array:
    """``(W, L)`` bool: positions of ``tree.unpack`` that may be accepted."""
    if tree.usable is None:
        return mx.ones(tree.unpack.shape, dtype=mx.bool_)
    return mx.array(tree.usable)


def accept_greedy(tree: Tree, tokens: mx.array, logits: mx.array) -> Acceptance:
    """Greedy (argmax matching) acceptance.

    Args:
        tree: The packed tree (host structure).
        tokens: ``(N,)`` int32 packed node tokens (may be lazy).
        logits: ``(N, V)`` target logits (processed) at every node.
    """
    choice = mx.argmax(SamplingParams().logits(logits), axis=-1)  # (N,)
    unpack = mx.array(tree.unpack)  # (W, L)
    drafted = tokens[unpack[:, 1:]]  # (W, L-1)
    expected = choice[unpack[:, :-1]]  # (W, L-1)
    ok = (drafted == expected) & usable_mask(tree)[:, 1:]
    matches = mx.cumprod(ok.astype(mx.int32), axis=1)
    lengths = matches.sum(axis=1)  # (W,)
    best = mx.argmax(lengths)  # first maximum: lowest beam index wins ties
    num = lengths[best]
    next_root = mx.take(choice, mx.take(unpack[best], num))
    return _finish(tree, tokens, best, num, next_root)


def children_table(tree: Tree) -> np.ndarray:
    """``(N, C)`` int32 children of every node in packed (= drafter) order, -1 padded."""
    n = len(tree.tokens)
    kids: list[list[int]] = [[] for _ in range(n)]
    for node in range(1, n):
        kids[int(tree.parent[node])].append(node)
    width = max(1, max(len(k) for k in kids))
    table = np.full((n, width), -1, dtype=np.int32)
    for node, k in enumerate(kids):
        table[node, : len(k)] = k
    return table


def sampled_rows(tree: Tree, proposal: mx.array | None) -> int:
    """How many nodes have a sampled first child: ``R`` = beam 0's drafted length (0 when
    ``proposal`` is ``None``). Beam 0's nodes are ``0 .. L-1`` in order, so node ``j < R``
    has child ``j + 1`` drawn from ``proposal[j]``.

    Raises:
        ValueError: if beam 0 is not fully usable or ``proposal`` has too few rows.
    """
    if proposal is None:
        return 0
    length = tree.unpack.shape[1]
    if tree.usable is not None and not tree.usable[0].all():
        raise ValueError("a sampled beam 0 (Draft.proposal) must be fully valid")
    if proposal.shape[0] < length - 1:
        raise ValueError(f"proposal has {proposal.shape[0]} rows for {length - 1} drafted tokens")
    return length - 1


def exact_randomness(
    tree: Tree,
    vocab_size: int,
    samples: int = 1,
    key: mx.array | None = None,
    children: np.ndarray | None = None,
) -> tuple[mx.array, mx.array]:
    """Fresh randomness for :func:`exact_walk`: uniforms ``(S, L, C)``, Gumbel ``(S, V)``.

    One Gumbel vector per draw: the walk emits exactly one sampled token (at the node where
    it stops), so one vector serves whichever node that is. ``children``: the tree's
    :func:`children_table` when the caller has it (else it is built here).
    """
    depth = tree.unpack.shape[1]
    width = (children_table(tree) if children is None else children).shape[1]
    key_u, key_g = mx.random.split(key) if key is not None else (None, None)
    uniforms = mx.random.uniform(shape=(samples, depth, width), key=key_u)
    gumbel = mx.random.gumbel(shape=(samples, vocab_size), key=key_g)
    return uniforms, gumbel


def accept_exact(
    tree: Tree, tokens: mx.array, log_weights: mx.array, proposal: mx.array | None = None
) -> Acceptance:
    """Exact recursive rejection sampling over a draft tree (module doc).

    Args:
        tree: The packed tree.
        tokens: ``(N,)`` int32 packed node tokens.
        log_weights: ``(N, V)`` unnormalised log-weights of the target's sampling
            distribution at every node (``SamplingParams.log_weights``; ``-inf`` = excluded).
        proposal: ``(L-1, V)`` log ``q`` of a sampled beam 0 (``Draft.proposal``), or
            ``None`` for a deterministic tree.
    """
    table = children_table(tree)
    uniforms, gumbel = exact_randomness(tree, log_weights.shape[-1], children=table)
    rows = sampled_rows(tree, proposal)
    log_q = None if proposal is None else proposal[:rows]
    num, node, next_root = _compiled_walk(
        mx.array(table), tokens, log_weights, uniforms, gumbel, log_q
    )
    return _finish(tree, tokens, _beam_of(tree, node[0]), num[0], next_root[0])


def sampled_acceptance(p: mx.array, q: mx.array) -> mx.array:
    """Acceptance probability of a child drawn from ``q``: ``min(1, p/q)`` (``p/q`` here;
    a uniform below it accepts). Shapes ``(S,)``."""
    return p / mx.maximum(q, 1e-30)


def sampled_residual(p: mx.array, q: mx.array) -> mx.array:
    """What is left of ``p`` after a draft sampled from ``q`` was rejected: ``max(0, p - q)``
    (unnormalised; its sum is the rejection probability).

    Args:
        p: ``(R, V)`` normalised target distribution.
        q: ``(R, V)`` normalised proposal distribution.

    Returns:
        ``(R, V)`` non-negative weights.
    """
    return mx.maximum(p - q, 0.0)


def residual_draw(
    log_weights: mx.array, gumbel: mx.array, rejected: mx.array, live: mx.array
) -> mx.array:
    """Gumbel-max draw from a distribution with its rejected tokens removed.

    Args:
        log_weights: ``(S, V)`` log-weights of the distribution at each draw's node.
        gumbel: ``(S, V)`` standard Gumbel noise.
        rejected: ``(S, C)`` int32 tokens to exclude (the node's children).
        live: ``(S, C)`` bool, which entries of ``rejected`` are real.

    Returns:
        ``(S,)`` int32 tokens drawn from ``norm(p with the rejected tokens zeroed)``; from
        ``p`` itself when that leaves nothing (only reachable through rounding: a child
        holding all the mass is accepted with probability 1).
    """
    vocab = mx.arange(log_weights.shape[-1])
    hit = ((vocab[None, None, :] == rejected[..., None]) & live[..., None]).any(axis=1)
    scores = log_weights + gumbel
    masked = mx.where(hit, -mx.inf, scores)
    empty = mx.isinf(masked.max(axis=-1, keepdims=True))
    return mx.argmax(mx.where(empty, scores, masked), axis=-1).astype(mx.int32)


def exact_walk(
    children: mx.array,
    tokens: mx.array,
    log_weights: mx.array,
    uniforms: mx.array,
    gumbel: mx.array,
    log_q: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """The walk of :func:`accept_exact`, for ``S`` independent draws at once.

    Only the children's probabilities enter the tests: the residual mass at a node is one
    minus the mass of the children rejected there (after a sampled child's rejection:
    ``sum max(0, p - q)`` minus theirs), so the walk itself touches nothing of size ``V``.
    The one sampled token is drawn at the node where the walk stops, whose children (if
    any) were all rejected.

    Args:
        children: ``(N, C)`` int32 children table (-1 padded), drafter order.
        tokens: ``(N,)`` int32 node tokens.
        log_weights: ``(N, V)`` unnormalised log-weights of the target distribution per node.
        uniforms: ``(S, L, C)`` uniforms in [0, 1).
        gumbel: ``(S, V)`` standard Gumbel noise.
        log_q: ``(R, V)`` normalised log ``q`` of a sampled beam 0: node ``j < R`` has its
            first child drawn from ``log_q[j]`` (:func:`sampled_rows`); ``None``: none.

    Returns:
        ``(num_accepted, last_node, next_root)``, each ``(S,)`` int32.
    """
    samples, levels, width = uniforms.shape
    log_norm = fast_math.logsumexp(log_weights)  # (N, 1)
    live_kids = children >= 0  # (N, C)
    kid_tokens = tokens[mx.maximum(children, 0)]  # (N, C)
    kid_logw = mx.take_along_axis(log_weights, kid_tokens, axis=-1)  # (N, C)
    kid_probs = mx.where(live_kids, mx.exp(kid_logw - log_norm), 0.0).astype(mx.float32)
    rows = 0 if log_q is None else log_q.shape[0]
    if rows:
        q = fast_math.exp(log_q.astype(mx.float32))  # (R, V)
        p_rows = fast_math.exp(log_weights[:rows].astype(mx.float32) - log_norm[:rows])
        left = sampled_residual(p_rows, q)  # (R, V) the law left after rejecting c_1 ~ q
        left_mass = left.sum(axis=-1)  # (R,)
        kid_q = mx.take_along_axis(q, kid_tokens[:rows], axis=-1)  # (R, C)
        kid_left = mx.take_along_axis(left, kid_tokens[:rows], axis=-1)  # (R, C)
    node = mx.zeros((samples,), dtype=mx.int32)
    num = mx.zeros((samples,), dtype=mx.int32)
    stopped = mx.zeros((samples,), dtype=mx.bool_)
    stop_rejected_q = mx.zeros((samples,), dtype=mx.bool_)  # stopped after rejecting c_1 ~ q
    for level in range(levels):
        rejected_mass = mx.zeros((samples,), dtype=mx.float32)
        chosen = mx.full((samples,), -1, dtype=mx.int32)
        sampled = (node < rows) if rows else mx.zeros((samples,), dtype=mx.bool_)
        row = mx.minimum(node, max(rows - 1, 0))
        rejected_q = mx.zeros((samples,), dtype=mx.bool_)  # c_1 ~ q rejected at this node
        for i in range(width):
            child = children[node, i]  # (S,)
            live = (child >= 0) & (chosen < 0) & ~stopped
            p = kid_probs[node, i]  # (S,)
            if rows:
                # after rejecting c_1 ~ q the law left is `left`, of mass left_mass
                p = mx.where(rejected_q, kid_left[row, i], p)
                mass = mx.where(rejected_q, left_mass[row], 1.0) - rejected_mass
                ratio = p / mx.maximum(mass, 1e-30)
                if i == 0:
                    ratio = mx.where(sampled, sampled_acceptance(p, kid_q[row, 0]), ratio)
            else:
                ratio = p / mx.maximum(1.0 - rejected_mass, 1e-30)
            take = live & (uniforms[:, level, i] < ratio)
            drop = live & ~take
            if rows and i == 0:
                rejected_q = drop & sampled
                drop = drop & ~sampled  # its mass is accounted for by left_mass
            rejected_mass = rejected_mass + mx.where(drop, p, 0.0)
            chosen = mx.where(take, child, chosen)
        descended = chosen >= 0
        stop_rejected_q = stop_rejected_q | (~descended & ~stopped & rejected_q)
        stopped = stopped | ~descended
        num = num + descended.astype(mx.int32)
        node = mx.where(descended, chosen, node).astype(mx.int32)
    weights = log_weights[node]  # (S, V)
    if rows:
        left_weights = mx.log(left[mx.minimum(node, rows - 1)])  # (S, V)
        # nothing left only through rounding (p == q): that rejection had probability ~0
        empty = mx.isinf(left_weights.max(axis=-1, keepdims=True))
        use_left = stop_rejected_q[:, None] & ~empty
        weights = mx.where(use_left, left_weights, weights)
    next_root = residual_draw(weights, gumbel, kid_tokens[node], live_kids[node])
    return num, node, next_root


# One fused graph per tree shape (a few distinct shapes per run): ~1 ms less per step.
_compiled_walk = mx.compile(exact_walk)


def chain_residual(p: mx.array, q: mx.array) -> mx.array:
    """The chain rule's distribution after a rejection: ``norm(max(0, p - q))``.

    Args:
        p: ``(..., V)`` target distribution.
        q: ``(..., V)`` proposal distribution (all zeros after a fully accepted chain, which
            makes this the bonus distribution ``p``).

    Returns:
        ``(..., V)`` normalised residual; ``p`` where the residual mass is below
        :data:`RESIDUAL_FLOOR` (``p == q`` up to rounding, so a rejection has probability
        below the floor).
    """
    residual = mx.maximum(p - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    return mx.where(mass > RESIDUAL_FLOOR, residual / mx.maximum(mass, 1e-30), p)


def accept_chain(
    tree: Tree, tokens: mx.array, probs: mx.array, draft_logprobs: mx.array
) -> Acceptance:
    """The standard speculative-sampling rule for one sampled chain (module doc).

    Args:
        tree: The packed tree of a single beam (``W == 1``).
        tokens: ``(N,)`` int32 node tokens.
        probs: ``(N, V)`` target distribution per node.
        draft_logprobs: ``(1, L-1, V)`` log-probabilities of the proposal ``q`` the drafted
            tokens were sampled from (target vocabulary, after the sampling transforms).

    Raises:
        ValueError: if the tree has more than one beam.
    """
    width, length = tree.unpack.shape
    if width != 1:
        raise ValueError(f"the chain rule verifies one sampled beam (W = 1), got W = {width}")
    path = mx.array(tree.unpack[0])  # (L,)
    q = mx.exp(draft_logprobs[:, : length - 1].astype(mx.float32))  # (1, L-1, V)
    uniforms = mx.random.uniform(shape=(1, length - 1))
    gumbel = mx.random.gumbel(shape=(1, probs.shape[-1]))
    num, next_root = chain_walk(
        tokens[path[1:]][None], probs[path][None], q, uniforms, gumbel, usable_mask(tree)[:, 1:]
    )
    return _finish(tree, tokens, mx.array(0), num[0], next_root[0])


def chain_walk(
    drafted: mx.array,
    p: mx.array,
    q: mx.array,
    uniforms: mx.array,
    gumbel: mx.array,
    usable: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The chain rule for ``S`` independent chains at once.

    Args:
        drafted: ``(S, K)`` int32 drafted tokens, ``drafted[:, j] ~ q[:, j]``.
        p: ``(S, K+1, V)`` target distribution before each drafted token and after the
            last one (for the bonus token).
        q: ``(S, K, V)`` proposal distribution each drafted token was sampled from.
        uniforms: ``(S, K)`` acceptance uniforms in [0, 1).
        gumbel: ``(S, V)`` standard Gumbel noise for the emitted draw.
        usable: Optional ``(S, K)`` (or broadcastable) bool, positions that may be accepted.

    Returns:
        ``(num_accepted, next_root)``, each ``(S,)`` int32.
    """
    p_tok = mx.take_along_axis(p[:, :-1], drafted[..., None], axis=-1)[..., 0]  # (S, K)
    q_tok = mx.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]  # (S, K)
    ok = uniforms * q_tok < p_tok  # u < min(1, p/q), without dividing by q
    if usable is not None:
        ok = ok & usable
    num = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)  # (S,)
    q_pad = mx.concatenate([q, mx.zeros_like(q[:, :1])], axis=1)  # (S, K+1, V)
    at = num[:, None, None]
    p_at = mx.take_along_axis(p, at, axis=1)[:, 0]  # (S, V)
    q_at = mx.take_along_axis(q_pad, at, axis=1)[:, 0]  # (S, V)
    dist = chain_residual(p_at, q_at)
    next_root = mx.argmax(mx.log(dist) + gumbel, axis=-1).astype(mx.int32)
    return num.astype(mx.int32), next_root


def accept_redrafter(
    tree: Tree, tokens: mx.array, probs: mx.array, draft_logprobs: mx.array, temp: float = 1.0
) -> Acceptance:
    """ReDrafter's published rule (approximate; see the module doc).

    Args:
        tree: The packed tree.
        tokens: ``(N,)`` int32 node tokens.
        probs: ``(N, V)`` target distribution per node.
        draft_logprobs: ``(W, L-1, V)`` the head's log-probs along each beam.
        temp: Temperature applied to the head's distribution too (as ReDrafter does).
    """
    width, length = tree.unpack.shape
    uniforms = mx.random.uniform(shape=(1, width, length - 1))
    gumbel = mx.random.gumbel(shape=(1, probs.shape[-1]))
    unpack = mx.array(tree.unpack)
    # a valid mask may have shortened the tree to L' <= L columns
    logprobs = draft_logprobs[:, : length - 1].astype(mx.float32)
    q = mx.softmax(logprobs / max(temp, 1e-6), axis=-1)
    num, best, next_root = redrafter_walk(
        unpack, tokens, probs, q, uniforms, gumbel, usable_mask(tree)[:, 1:]
    )
    return _finish(tree, tokens, best[0], num[0], next_root[0])


def redrafter_walk(
    unpack: mx.array,
    tokens: mx.array,
    probs: mx.array,
    q: mx.array,
    uniforms: mx.array,
    gumbel: mx.array,
    usable: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """ReDrafter's rule for ``S`` independent draws at once.

    Args:
        unpack: ``(W, L)`` node index of every beam position.
        tokens: ``(N,)`` node tokens.
        probs: ``(N, V)`` target distribution per node.
        q: ``(W, L-1, V)`` head distribution at each drafted position.
        uniforms: ``(S, W, L-1)`` acceptance uniforms.
        gumbel: ``(S, V)`` Gumbel noise for the final draw.
        usable: Optional ``(W, L-1)`` bool, drafted positions that may be accepted.

    Returns:
        ``(num_accepted, best_beam, next_root)``, each ``(S,)`` int32.
    """
    drafted = tokens[unpack[:, 1:]]  # (W, L-1)
    p_tok = mx.take_along_axis(probs[unpack[:, :-1]], drafted[..., None], axis=-1)[..., 0]
    q_tok = mx.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]
    ratio = mx.minimum(1.0, p_tok / mx.maximum(q_tok, 1e-30))  # (W, L-1)
    ok = uniforms < ratio[None]
    if usable is not None:
        ok = ok & usable[None]
    lengths = mx.cumprod(ok.astype(mx.int32), axis=2).sum(axis=2)  # (S, W)
    best = mx.argmax(lengths, axis=1).astype(mx.int32)  # (S,)
    num = mx.take_along_axis(lengths, best[:, None], axis=1)[:, 0]
    node = unpack[best, num]  # (S,)
    q_pad = mx.concatenate([q, mx.zeros_like(q[:, :1])], axis=1)  # (W, L, V)
    residual = mx.maximum(probs[node] - q_pad[best, num], 0.0)  # (S, V)
    empty = residual.sum(axis=-1, keepdims=True) <= 0
    residual = mx.where(empty, probs[node], residual)
    next_root = mx.argmax(mx.log(residual) + gumbel, axis=-1).astype(mx.int32)
    return num.astype(mx.int32), best, next_root


def _beam_of(tree: Tree, node: mx.array) -> mx.array:
    """``()`` index of the first beam whose path contains ``node``."""
    unpack = mx.array(tree.unpack)  # (W, L)
    contains = (unpack == node).any(axis=1)
    return mx.argmax(contains)
