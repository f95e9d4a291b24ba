"""Apple's top-50 logit warp in ReDrafter beam search (``--draft-top-k``).

* With ``top_k=50`` the beams, their scores and the kept log-probabilities (the ReDrafter
  rule's input) equal an independent float64 numpy version of Apple's
  ``beam_search_candidates`` (``maintain_logits``, ``warp_logits(top_k=50)`` filling
  ``-50000``, the other beams started at ``LOG_0``, ``topk`` over ``W * K``), on random
  heads with a 96-token vocabulary; without the warp the beams differ in some rows.
* ``generate --draft-top-k 50`` prints AR's text; a bad ``K`` or a head of another kind is
  one error line.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_head import make_config, random_checkpoint, reference_logits, to_mx
from test_published_heads import tiny_target_published

from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.drafters.beam_search import BeamSearcher
from mlx_redrafter.drafters.logit_warp import warp_top_k
from mlx_redrafter.drafters.redrafter import ReDrafter, ReDrafterConfig, head_from_weights
from mlx_redrafter.generate import main as generate_main
from mlx_redrafter.sampling import SamplingParams

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

D, V, TOP_K = 6, 96, 50
LOG_0 = -50000.0


def apple_beam_search(
    weights: dict, config: dict, hidden: np.ndarray, root: int, table: np.ndarray, width, length
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apple's beam search in float64 numpy: ``(beams (W, L), scores (W,),
    log-probs (W, L-1, V))``; each beam's logits recomputed from its whole history."""
    log_p_beam = np.array([0.0] + [LOG_0] * (width - 1))
    beams = np.full((width, 1), root)
    kept = np.zeros((width, 0, V))
    for _ in range(length - 1):
        logits = reference_logits(weights, config, np.tile(hidden, (width, 1)), beams, table)
        logits = logits - logits.max(axis=-1, keepdims=True)  # maintain_logits
        kth = np.sort(logits, axis=-1)[:, -TOP_K][:, None]
        logits = np.where(logits < kth, LOG_0, logits)  # warp_logits
        top = logits.max(axis=-1, keepdims=True)
        log_p = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        candidates = (log_p + log_p_beam[:, None]).reshape(-1)
        chosen = np.argsort(-candidates, kind="stable")[:width]
        parent, token = chosen // V, chosen % V
        log_p_beam = candidates[chosen]
        beams = np.concatenate([beams[parent], token[:, None]], axis=1)
        kept = np.concatenate([kept[parent], log_p[parent][:, None]], axis=1)
    return beams, log_p_beam, kept


def random_case(seed: int):
    config = make_config(d=D, vocab=V, exit_dim=10, layers=2, rnn=seed % 2 == 0)
    # flat logits (weights at half the default init): the tail outside the top 50 carries
    # mass that differs between beams, so the warp changes which beams win
    weights = {k: 0.5 * v for k, v in random_checkpoint(config, seed=seed).items()}
    head = head_from_weights(ReDrafterConfig.from_dict(config), to_mx(weights))
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, D)).astype(np.float32)
    emb = nn.Embedding(V, D)
    emb.weight = mx.array(table)
    hidden = rng.standard_normal(D).astype(np.float32)
    return config, weights, head, emb, table, hidden


def test_warp_is_apples():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, V)).astype(np.float32)
    logits[1, :60] = 2.0  # ties with the 50th largest are kept
    got = np.array(warp_top_k(mx.array(logits), TOP_K))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    kth = np.sort(logits, axis=-1)[:, -TOP_K][:, None]
    np.testing.assert_allclose(got, np.where(logits < kth, LOG_0, shifted), atol=1e-6)
    assert (got > LOG_0).sum(axis=-1).tolist() == [50, 60, 50]


@pytest.mark.parametrize("width", [2, 4])
def test_warped_beams_are_apples_and_unwarped_ones_are_not(width):
    length = 4
    differ = 0
    for seed in range(6):
        config, weights, head, emb, table, hidden = random_case(seed)
        want_beams, want_scores, want_lp = apple_beam_search(
            weights, config, hidden, 5, table, width, length
        )
        got = BeamSearcher(head, emb, top_k=TOP_K)(mx.array(hidden), mx.array(5), width, length)
        np.testing.assert_array_equal(np.array(got.beams), want_beams)
        np.testing.assert_allclose(np.array(got.scores), want_scores, rtol=1e-5, atol=1e-4)
        # the drafter option: its kept log-probs (the ReDrafter rule's) are Apple's too
        drafter = ReDrafter(head, emb, keep_logprobs=True, top_k=TOP_K)
        context = DraftContext(
            mx.array(hidden), mx.array(5), mx.array(0), [5], params=SamplingParams()
        )
        draft = drafter.propose(context, width, length)
        np.testing.assert_array_equal(np.array(draft.beams), want_beams)
        np.testing.assert_allclose(np.array(draft.draft_logprobs), want_lp, rtol=1e-5, atol=1e-3)
        plain = BeamSearcher(head, emb)(mx.array(hidden), mx.array(5), width, length)
        differ += int((np.array(plain.beams) != want_beams).any(axis=1).sum())
    assert differ > 0  # without the warp, Apple's beams are not reproduced


def _generate(model_dir, flags: list[str], capsys) -> tuple[int, str, str]:
    code = generate_main(
        ["--model", str(model_dir), "--prompt", "the cat sat", "--max-tokens", "16", *flags]
    )
    out, err = capsys.readouterr()
    return code, out.split("\nPrompt: ")[0], err


def test_cli_flag(tiny_model_dir, head_dir, tmp_path, capsys):
    shape = ["--beam-width", "3", "--beam-length", "4"]
    code, text, err = _generate(tiny_model_dir, ["--drafter", str(head_dir), *shape], capsys)
    warped = _generate(
        tiny_model_dir, ["--drafter", str(head_dir), "--draft-top-k", "50", *shape], capsys
    )
    ar = _generate(tiny_model_dir, ["--drafter", "none"], capsys)
    assert code == warped[0] == ar[0] == 0 and text == warped[1] == ar[1], err
    eagle = tiny_target_published(tiny_model_dir, tmp_path / "eagle")
    for drafter, k in ((head_dir, "0"), (eagle, "50")):
        code, _, err = _generate(
            tiny_model_dir, ["--drafter", str(drafter), "--draft-top-k", k], capsys
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "ReDrafter heads only" in lines[0], lines
