"""The parallel (ParallelSpec) head: group-wise mask, alignment, tree, training, losslessness."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlx_redrafter  # noqa: F401  (before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from engine_walks import assert_engine_follows_walks
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from test_train import (
    assert_groups_match_rescoring,
    base_options,
    greedy_responses,
    one_blas_thread,
    second_order_language,
    write_distilled,
)
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import ParallelDrafter, head_kind, load_drafter
from mlx_redrafter.drafters.base import Draft, DraftContext
from mlx_redrafter.drafters.factorized_tree import factorized_tree
from mlx_redrafter.drafters.group_mask import CONTEXT, group_attention_mask
from mlx_redrafter.drafters.parallel import ParallelConfig, ParallelHead, load_head
from mlx_redrafter.hidden_window import HiddenWindow
from mlx_redrafter.target import Target
from mlx_redrafter.train.evaluate import decode_walks, leading_run
from mlx_redrafter.train.objective import PAD, build_position_table
from mlx_redrafter.train.parallel_evaluate import batch_logits
from mlx_redrafter.train.parallel_fit import ParallelTrainer
from mlx_redrafter.train.parallel_objective import context_rows

__all__ = ["one_blas_thread"]  # the module-scoped fixture of test_train, used here too

D = 64


def random_head(vocab: int, k: int = 3, context: int = 3, seed: int = 0) -> ParallelHead:
    mx.random.seed(seed)
    head = ParallelHead(ParallelConfig(vocab, D, k, context=context, num_heads=2))
    mx.eval(head.parameters())
    return head


# ------------------------------------------------------------------------- the mask


def packed_layout(length: int, anchors: list[int], context: int, k: int):
    """A packed sequence: hidden items ``h_0 .. h_{T-1}``, one root item ``x_{t+1}`` per
    anchor, then each anchor's ``k`` masks. Returns ``(group, window, positions, source)``;
    ``source`` names each item (``("h", p)``, ``("x", p)`` or ``("m", g, j)``)."""
    source = [("h", p) for p in range(length)] + [("x", t + 1) for t in anchors]
    source += [("m", g, j) for g in range(len(anchors)) for j in range(1, k + 1)]
    group = np.array([CONTEXT if s[0] != "m" else s[1] for s in source], np.int32)
    window = np.zeros((len(anchors), len(source)), bool)
    for g, t in enumerate(anchors):
        for i, s in enumerate(source):
            window[g, i] = (s[0] == "h" and t - context < s[1] <= t) or s == ("x", t + 1)
    positions = [s[1] if s[0] != "m" else anchors[s[1]] + 1 + s[2] for s in source]
    return mx.array(group), mx.array(window), mx.array(positions)[None], source


def check_group_mask(visible: np.ndarray, group: np.ndarray) -> None:
    """Assert the training mask's rules: real items never read masks; a mask never reads
    another group's masks; a mask reads its own group."""
    is_mask = group != CONTEXT
    real_reads_mask = ~is_mask[:, None] & is_mask[None, :] & visible
    assert not real_reads_mask.any(), "a real item attends to a mask"
    other_group = is_mask[:, None] & is_mask[None, :] & (group[:, None] != group[None, :])
    assert not (visible & other_group).any(), "a mask attends to another group's mask"
    own_group = is_mask[:, None] & (group[:, None] == group[None, :])
    assert visible[own_group].all(), "a mask does not see its own group"


def leak_across_groups(group: mx.array, window: mx.array) -> mx.array:
    """Wrong: every mask sees every mask."""
    is_mask = group != CONTEXT
    return group_attention_mask(group, window) | (is_mask[:, None] & is_mask[None, :])


def real_reads_masks(group: mx.array, window: mx.array) -> mx.array:
    """Wrong: context items see the masks (a bidirectional packed sequence)."""
    return group_attention_mask(group, window) | (group != CONTEXT)[None, :]


def one_wrong_entry(group: mx.array, window: mx.array) -> mx.array:
    """Wrong in a single entry: the first mask of group 1 sees the last mask of group 0."""
    visible = np.array(group_attention_mask(group, window))
    g = np.array(group)
    visible[np.flatnonzero(g == 1)[0], np.flatnonzero(g == 0)[-1]] = True
    return mx.array(visible)


@pytest.mark.parametrize(
    "mask_fn, caught",
    [
        (group_attention_mask, False),
        (leak_across_groups, True),
        (real_reads_masks, True),
        (one_wrong_entry, True),
    ],
)
def test_training_mask_rules_and_that_the_check_catches_wrong_masks(mask_fn, caught):
    group, window, _, source = packed_layout(10, [2, 3, 6, 8], context=3, k=3)
    visible = np.array(mask_fn(group, window))
    if caught:
        with pytest.raises(AssertionError):
            check_group_mask(visible, np.array(group))
        return
    check_group_mask(visible, np.array(group))
    # masks of anchor t read exactly h_{t-2..t}, x_{t+1} and their own group
    for i, s in enumerate(source):
        if s[0] == "m":
            t = [2, 3, 6, 8][s[1]]
            seen = {source[j] for j in np.flatnonzero(visible[i]) if source[j][0] != "m"}
            assert seen == {("h", t - 2), ("h", t - 1), ("h", t), ("x", t + 1)}


def test_packed_groups_equal_per_position_examples_and_a_leak_breaks_it():
    """Packing anchors of one sequence under the group mask gives every anchor's masks
    exactly the logits of its own per-position example (training = inference layout)."""
    vocab, length, context, k = 40, 12, 3, 3
    head = random_head(vocab, k, context, seed=1)
    hidden = mx.random.normal((length, D), key=mx.random.key(0))
    tokens = mx.random.randint(0, vocab, (length,), key=mx.random.key(1))
    embed = nn.Embedding(vocab, D)
    anchors = [0, 1, 4, 7, 10]
    group, window, positions, source = packed_layout(length, anchors, context, k)
    items = [
        head.hidden_proj(hidden[s[1]])
        if s[0] == "h"
        else head.token_proj(embed(tokens[s[1]]))
        if s[0] == "x"
        else head.mask_embedding[s[2] - 1] + head.mask_position[s[2] - 1]
        for s in source
    ]
    items = mx.stack(items)[None]
    is_mask = np.array([s[0] == "m" for s in source])
    packed = head.outputs(items, positions, group_attention_mask(group, window)[None])
    packed = np.array(packed[0])[is_mask].reshape(len(anchors), k, -1)
    index = np.array(anchors)[:, None] - np.arange(context - 1, -1, -1)[None, :]
    per_position = head.logits(
        hidden[mx.array(np.maximum(index, 0))],
        mx.array(index >= 0),
        embed(tokens[mx.array(anchors) + 1]),
    )
    np.testing.assert_allclose(packed, np.array(per_position), rtol=1e-4, atol=1e-4)
    first_two = head.logits(
        hidden[mx.array(np.maximum(index, 0))],
        mx.array(index >= 0),
        embed(tokens[mx.array(anchors) + 1]),
        depths=2,
    )
    np.testing.assert_allclose(np.array(first_two), np.array(per_position)[:, :2], atol=1e-5)
    leaked = head.outputs(items, positions, leak_across_groups(group, window)[None])
    leaked = np.array(leaked[0])[is_mask].reshape(len(anchors), k, -1)
    assert np.abs(leaked - np.array(per_position)).max() > 1e-2


# -------------------------------------------------------------------------- alignment


def test_alignment_table_of_the_docstring():
    """T = 8, C = 3, k = 3, r = 3 (parallel_objective's table), x_j = 10 + j."""
    tokens = np.arange(10, 18, dtype=np.int32)
    table = build_position_table([(tokens, 3)], length=4)
    rows = np.arange(table.size)
    index, valid = context_rows(table, rows, 3)
    slots = np.where(valid, table.position[index], -1)
    assert slots.tolist() == [
        [-1, -1, 0],
        [-1, 0, 1],
        [0, 1, 2],
        [1, 2, 3],
        [2, 3, 4],
        [3, 4, 5],
    ]
    assert table.windows[:, 0].tolist() == [11, 12, 13, 14, 15, 16]  # g0 = x_{t+1}
    targets = np.where(table.in_loss, table.windows[:, 1:], PAD)
    assert targets.tolist() == [
        [PAD, 13, 14],
        [13, 14, 15],
        [14, 15, 16],
        [15, 16, 17],
        [16, 17, PAD],
        [17, PAD, PAD],
    ]
    # two sequences, a long prompt: slots never cross a sequence or read a dropped row
    table = build_position_table([(tokens, 3), (np.arange(20, 40, dtype=np.int32), 12)], 4)
    index, valid = context_rows(table, np.arange(table.size), 3)
    assert (table.sequence[index] == table.sequence[:, None]).all()
    first = np.flatnonzero(table.sequence == 1)[0]
    assert table.position[first] == 8 and valid[first].tolist() == [False, False, True]
    assert (table.position[index][valid] == (table.position[:, None] - [2, 1, 0])[valid]).all()


# ----------------------------------------------------------------------------- tree


def brute_force_top(logprobs: np.ndarray, width: int) -> list[tuple[float, tuple[int, ...]]]:
    depth, vocab = logprobs.shape
    paths = [
        (float(sum(logprobs[j, p[j]] for j in range(depth))), p)
        for p in itertools.product(range(vocab), repeat=depth)
    ]
    return sorted(paths, key=lambda x: -x[0])[:width]


def test_tree_holds_the_best_paths_and_the_budget_keeps_the_best_prefixes():
    rng = np.random.default_rng(0)
    for _trial in range(20):
        depth, vocab, width = 3, 5, int(rng.integers(1, 7))
        logprobs = np.array(nn.log_softmax(mx.array(rng.normal(size=(depth, vocab)) * 2)))
        paths, scores, keep = factorized_tree(mx.array(logprobs), width)
        want = brute_force_top(logprobs, width)
        np.testing.assert_allclose(np.array(scores)[:, -1], [s for s, _ in want], atol=1e-5)
        assert np.array(keep).all()
        budget = int(rng.integers(1, width * depth + 1))
        paths, scores, keep = (
            np.array(a) for a in factorized_tree(mx.array(logprobs), width, budget)
        )
        prefixes = {}
        for w in range(width):
            for j in range(depth):
                prefixes[tuple(paths[w, : j + 1])] = (scores[w, j], keep[w, j])
        kept = {p for p, (_, k) in prefixes.items() if k}
        assert len(kept) == min(budget, len(prefixes))
        assert all(p[:-1] in kept for p in kept if len(p) > 1)  # closed under prefixes
        worst_kept = min(s for s, k in prefixes.values() if k)
        assert all(s <= worst_kept + 1e-6 for s, k in prefixes.values() if not k)


def test_hidden_window_follows_the_accepted_positions():
    rows = mx.arange(8, dtype=mx.float32)[:, None] * mx.ones((1, 2))
    window = HiddenWindow.start(rows[:2], 4)  # a two-token prompt: two real rows
    assert window.count.item() == 2 and np.array(window.rows)[:, 0].tolist() == [0, 0, 0, 1]
    path = mx.array([[10.0, 10], [11, 11], [12, 12], [13, 13]])
    window = window.advance(path, mx.array(2, mx.int32))
    assert window.count.item() == 4
    assert np.array(window.rows)[:, 0].tolist() == [1, 10, 11, 12]
    window = window.advance(path + 10, mx.array(0, mx.int32))
    assert np.array(window.rows)[:, 0].tolist() == [10, 11, 12, 20]


# ----------------------------------------------------------------------------- drafting


class Recorder:
    """A parallel drafter that keeps every context it is asked with; with ``oracle`` (the
    true sequence) it proposes the true continuation instead (long accepted runs)."""

    def __init__(self, drafter: ParallelDrafter, oracle: list[int] | None = None):
        self.drafter = drafter
        self.oracle = oracle
        self.hidden_window = drafter.hidden_window
        self.needs_host_tokens = False
        self.stochastic = False
        self.contexts: list[DraftContext] = []

    def reset(self, prompt_tokens: list[int]) -> None:
        self.contexts = []

    def propose(self, context: DraftContext, width: int, length: int) -> Draft:
        self.contexts.append(context)
        draft = self.drafter.propose(context, width, length)
        if self.oracle is None:
            return draft
        p = int(context.position.item())
        chain = (self.oracle[p : p + length] + [0] * length)[:length]
        return Draft(beams=mx.array([chain] * width, dtype=mx.int32))

    def accepted(self, tokens: list[int]) -> None:
        pass


def _tokens(model, tok, prompt, max_tokens, **kw) -> list[int]:
    return [r.token for r in gen.stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = TokenizerWrapper(byte_tokenizer())
    tok.eos_token_ids = {10**6}
    return tok


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_output_equals_ar_and_the_window_holds_the_real_hidden_states(arch, tokenizer):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=3, scale=2.0, vocab_size=vocab)
    target = Target(model)
    rng = np.random.default_rng(7)
    for i, (width, length, budget) in enumerate([(1, 4, None), (3, 4, 5), (4, 3, None)]):
        prompt = rng.integers(3, vocab, size=int(rng.integers(1, 12))).tolist()
        ar = _tokens(model, tokenizer, prompt, 40)
        head = random_head(vocab, k=3, context=4, seed=i)
        oracle = prompt + ar if i % 2 == 0 else None
        drafter = Recorder(ParallelDrafter.from_model(model, head, budget=budget), oracle)
        stats = gen.StepStats()
        spec = _tokens(
            model, tokenizer, prompt, 40, drafter=drafter, beam_width=width,
            beam_length=length, stats=stats,
        )  # fmt: skip
        assert spec == ar
        if budget is not None:
            assert max(stats.tree_sizes) <= budget + 1
        if oracle is not None:
            assert max(stats.accepted) == length - 1  # the window advances by whole runs
        # recent_hidden = the target's own hidden states at the last C accepted positions
        full = np.array(target.forward(mx.array(prompt + ar), target.make_cache())[1])
        for context in drafter.contexts:
            t = int(context.position.item()) - 1  # the anchor: the position before g0
            count = int(context.recent_count.item())
            assert count == min(4, t + 1)
            got = np.array(context.recent_hidden)[4 - count :]
            np.testing.assert_allclose(got, full[t - count + 1 : t + 1], rtol=1e-3, atol=1e-3)


def test_lengths_beyond_k_are_refused(tokenizer):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model("llama", seed=3, vocab_size=vocab)
    drafter = ParallelDrafter.from_model(model, random_head(vocab, k=2))
    with pytest.raises(ValueError, match="k \\+ 1"):
        _tokens(model, tokenizer, [5, 6], 8, drafter=drafter, beam_width=1, beam_length=4)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", seed=3)
    m.freeze()
    return m


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """A parallel head (k = 3, C = 3) trained on the second-order language."""
    data = second_order_language(80)
    options = base_options(
        tmp_path_factory.mktemp("parallel"), head="parallel", k=3, context=3, epochs=6,
        eval_beams=[2],
    )  # fmt: skip
    trainer = ParallelTrainer(model, data[:64], data[64:], options, progress=False)
    result = trainer.fit()
    trainer.write_outputs(result)
    return trainer, result


def test_parallel_head_learns_the_language(trained):
    trainer, result = trained
    assert result.finished and trainer.state.step >= 200
    final = result.final_eval
    assert final.topk[0, 0] >= 0.9, final.summary()
    assert final.tokens_per_step[1] > 2.5, final.summary()
    assert final.tokens_per_step[2] >= final.tokens_per_step[1] - 1e-9
    history = [e["loss"] for e in trainer.state.history]
    assert np.mean(history[-10:]) < 0.1 * np.mean(history[:5])


def test_category_groups_equal_scoring_their_sequences_alone(model, trained):
    trainer, _ = trained
    assert_groups_match_rescoring(model, trainer.head, trainer.head.config.num_masks + 1)


def test_trained_head_round_trips_and_decodes_losslessly(trained, model, tmp_path):
    trainer, _ = trained
    out = Path(trainer.options.out)
    assert head_kind(out) == "parallel"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "parallel_spec_drafter" and config["num_masks"] == 3
    head = load_head(out, model=model)
    want = dict(tree_flatten(trainer.head.parameters()))
    got = dict(tree_flatten(head.parameters()))
    assert want.keys() == got.keys()
    assert all(mx.array_equal(want[k], got[k]).item() for k in want)
    assert head.draft_vocab is None and trainer.head.draft_vocab is None
    drafter = load_drafter(out, model)
    assert isinstance(drafter, ParallelDrafter) and drafter.hidden_window == 3


def test_engine_accepts_exactly_what_training_simulates(tmp_path):
    """Self-distil a tiny target, train a parallel head, decode the held-out prompts with
    the engine (greedy, W = 1, L = k + 1): output = AR, and the accepted count at every
    step is the teacher-forced one (so training's context rows are the engine's window)."""
    model = tiny_model("llama", seed=7)
    model.freeze()
    target = Target(model)
    data = greedy_responses(target, 56, 24)
    options = base_options(
        tmp_path, head="parallel", k=3, context=3, epochs=4, feature_dtype="float32"
    )
    trainer = ParallelTrainer(model, data[:48], data[48:], options, progress=False)
    trainer.fit()
    table = trainer.data.heldout_table
    logits = batch_logits(
        trainer.head, trainer.embedding, table, trainer.heldout_features, np.arange(table.size)
    )
    top1 = np.array(trainer.head.to_target_ids(mx.argmax(logits, axis=-1)))
    walks = decode_walks(table, leading_run((top1 == table.windows[:, 1:]) & table.in_loss))
    drafter = ParallelDrafter.from_model(model, trainer.head)
    assert_engine_follows_walks(target, drafter, data[48:], walks, 4)
    assert sum(map(sum, walks)) >= 10  # the head does get drafts accepted


def test_cli_fit_parallel_writes_a_head_the_drafter_loader_opens(tiny_model_dir, tmp_path, capsys):
    from mlx_redrafter.models import load
    from mlx_redrafter.train.__main__ import main

    data = write_distilled(tmp_path / "data", second_order_language(24, seed=3))
    out = tmp_path / "head"
    argv = ["fit", "--head", "parallel", "--k", "3", "--context", "2", "--model"]
    argv += [str(tiny_model_dir), "--data", str(data), "--out", str(out), "--epochs", "1"]
    argv += ["--batch-size", "64", "--draft-vocab", "20", "--heldout-fraction", "0.25", "--quiet"]
    assert main(argv) == 0
    assert "wrote head to" in capsys.readouterr().out
    report = json.loads((out / "training.json").read_text())
    assert report["options"]["head"] == "parallel" and report["options"]["beam_length"] == 4
    model, _ = load(str(tiny_model_dir))
    drafter = load_drafter(out, model)
    assert isinstance(drafter, ParallelDrafter)
    assert drafter.head.config.draft_vocab_size == 20 and drafter.hidden_window == 2
    assert main([*argv, "--soft-targets", "0.5"]) == 2
    assert "soft-targets" in capsys.readouterr().err
    # ``train evaluate`` scores a parallel head too, at L <= k + 1
    scores = tmp_path / "scores.json"
    evaluate = ["evaluate", "--head", str(out), "--data", str(data), "--model", str(tiny_model_dir)]
    assert (
        main([*evaluate, "--beam-length", "4", "--beam-widths", "1,2", "--json", str(scores)]) == 0
    )
    assert "(parallel), L = 4" in capsys.readouterr().out
    (row,) = json.loads(scores.read_text())
    assert row["sequences"] == 24 and len(row["top1_by_depth"]) == 3
    assert set(row["decode_tokens_per_step"]) == {"1", "2"}
    assert main([*evaluate, "--beam-length", "5"]) == 2
    assert "drafts 3 tokens, so L <= 4" in capsys.readouterr().err
