"""Deliberately broken copies of library functions, for tests that show a check has power.

A mutant is the function's own source with one exact substring replaced, compiled in a copy
of its module's namespace: the planted bug is precisely the one named, and a change to the
library that removes the substring fails loudly instead of silently testing nothing.
"""

from __future__ import annotations

import inspect
import textwrap

from mlx_redrafter import accept

#: Planted bugs in :func:`mlx_redrafter.accept.exact_walk`: ``name -> (original, broken)``.
WALK_MUTANTS = {
    # the sampled-chain branch forgets the mass of the children already rejected
    "sampled_branch_mass": (
        "mass = mx.where(rejected_q, left_mass[row], 1.0) - rejected_mass",
        "mass = mx.where(rejected_q, left_mass[row], 1.0)",
    ),
    # the deterministic branch tests each child with p(c) instead of p(c) / (1 - rejected)
    "deterministic_ratio": (
        "ratio = p / mx.maximum(1.0 - rejected_mass, 1e-30)",
        "ratio = p",
    ),
    # the stop node's token drawn from p with the rejected children left in
    "naive_residual": (
        "residual_draw(weights, gumbel, kid_tokens[node], live_kids[node])",
        "residual_draw(weights, gumbel, kid_tokens[node], live_kids[node] & False)",
    ),
    # the sampled child tested like a deterministic one: u < p instead of u < p / q
    "sampled_child_point_mass": (
        "ratio = mx.where(sampled, sampled_acceptance(p, kid_q[row, 0]), ratio)",
        "ratio = mx.where(sampled, p, ratio)",
    ),
    # after rejecting the sampled child, the law left is p instead of max(0, p - q)
    "sampled_residual_is_p": (
        "left = sampled_residual(p_rows, q)",
        "left = p_rows",
    ),
}


def mutant(function, original: str, broken: str):
    """``function`` with the one occurrence of ``original`` in its source replaced."""
    source = textwrap.dedent(inspect.getsource(function))
    if source.count(original) != 1:
        raise AssertionError(f"{original!r} is not in {function.__name__} exactly once")
    namespace = dict(function.__globals__)
    code = compile(source.replace(original, broken), f"<mutant of {function.__name__}>", "exec")
    exec(code, namespace)
    return namespace[function.__name__]


def walk_mutant(name: str):
    """The broken :func:`~mlx_redrafter.accept.exact_walk` named ``name``."""
    return mutant(accept.exact_walk, *WALK_MUTANTS[name])
