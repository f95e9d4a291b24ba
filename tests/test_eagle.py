"""The feature-level (EAGLE-style) drafter: head math, its own KV cache, losslessness,
exact sampling, checkpoints.

* The head's next features and logits, and every candidate the drafter grows (chains,
  beams, dynamic trees), equal a float64 numpy reference written from the math of the
  ``eagle_head`` docstring (random weights; GQA or not, fc bias or not, a reduced draft
  vocabulary read with ``lm_head_rows``, an own output layer).
* After a whole engine run, the drafter's cache equals the entries recomputed from scratch
  from the target's states over the final sequence; a wrong ``_path_next`` fails the check.
* Greedy output equals AR on three architectures with a random head and an oracle-like
  head, for chains, beams and dynamic trees, EOS and ``max_tokens`` landing on accepted
  drafts.
* At T = 1 the dynamic tree keeps the target's law (chi-square on the first two tokens);
  the walk with a naive residual fails the same test.
* A head made for another target is refused with both shapes named; checkpoints
  round-trip in EAGLE-1's weight names.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mutants import walk_mutant
from test_exact_sampling import PROMPT, Setup, engine_joint, goodness_of_fit, tvd_bound
from tiny_models import byte_tokenizer, tiny_model

from mlx_redrafter import accept
from mlx_redrafter import engine as gen
from mlx_redrafter.drafters import eagle as eagle_module
from mlx_redrafter.drafters import head_kind, load_drafter
from mlx_redrafter.drafters.base import DraftContext
from mlx_redrafter.drafters.eagle import EagleDrafter, lm_head_rows
from mlx_redrafter.drafters.eagle_head import (
    EagleConfig,
    EagleHead,
    is_eagle_dir,
    load_head,
    rope,
    save_head,
)
from mlx_redrafter.drafters.vocab_map import VocabularyMismatchError
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.target import Target

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

# ----------------------------------------------------------------------------- reference


def randomize(head: EagleHead, seed: int) -> EagleHead:
    """Every parameter drawn afresh (norm weights near 1), so no term is the identity."""
    rng = np.random.default_rng(seed)
    params = []
    for name, value in tree_flatten(head.parameters()):
        shape = value.shape
        if "norm" in name:
            new = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            new = 0.3 * rng.standard_normal(shape)
        else:
            new = rng.standard_normal(shape) / np.sqrt(shape[-1])
        params.append((name, mx.array(new.astype(np.float32))))
    head.update(tree_unflatten(params))
    mx.eval(head.parameters())
    return head


class Reference:
    """The head in float64 numpy, from the module docstring's equations::

        x_j = fc([e(x_{j+1}); f_j]);  h_j = x_j + attn(x_j);
        o_j = h_j + mlp(rmsnorm(h_j));  logits_j = o_j @ rows.T (or lm_head)

    with Llama's attention (RoPE in the ``rotate_half`` form, key-value head ``h // (H /
    Hkv)`` for query head ``h``, scale ``hd^-1/2``) and SwiGLU MLP.
    """

    def __init__(self, head: EagleHead, embed_table: np.ndarray, rows: np.ndarray | None):
        self.cfg = head.config
        self.w = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(head.parameters())}
        self.embed_table = np.asarray(embed_table, dtype=np.float64)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.float64)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``x`` ``(heads, n, hd)`` rotated by ``rotate_half`` (Hugging Face Llama)."""
        hd = x.shape[-1]
        inv_freq = 1.0 / self.cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
        freqs = np.outer(positions, inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)
        rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1)
        return x * np.cos(emb) + rotated * np.sin(emb)

    def entries(self, tokens: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Layer inputs ``(n, d)``: ``tokens`` are the *next* tokens of each feature."""
        cat = np.concatenate([self.embed_table[tokens], features], axis=-1)
        out = cat @ self.w["fc.weight"].T
        return out + self.w["fc.bias"] if self.cfg.bias else out

    def qkv(self, x: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """``q (H, n, hd)``, ``k, v (Hkv, n, hd)`` of entries ``x`` ``(n, d)`` (roped)."""
        c, w = self.cfg, self.w
        n = x.shape[0]

        def heads(name: str, count: int) -> np.ndarray:
            y = x @ w[f"layers.0.self_attn.{name}.weight"].T
            return y.reshape(n, count, c.head_dim).transpose(1, 0, 2)

        q = self._rope(heads("q_proj", c.num_attention_heads), positions)
        k = self._rope(heads("k_proj", c.num_key_value_heads), positions)
        return q, k, heads("v_proj", c.num_key_value_heads)

    def layer(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Causal layer over entries ``x`` ``(n, d)`` at ``positions``: outputs ``(n, d)``."""
        c, w = self.cfg, self.w
        p = "layers.0."
        n = x.shape[0]
        q, k, v = self.qkv(x, positions)
        group = c.num_attention_heads // c.num_key_value_heads
        causal = np.tril(np.ones((n, n), dtype=bool))
        outs = []
        for h in range(c.num_attention_heads):
            scores = q[h] @ k[h // group].T / np.sqrt(c.head_dim)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            outs.append(probs @ v[h // group])
        attn = np.concatenate(outs, axis=-1) @ w[p + "self_attn.o_proj.weight"].T
        hid = x + attn
        normed = hid / np.sqrt((hid**2).mean(-1, keepdims=True) + c.rms_norm_eps)
        normed = normed * w[p + "post_attention_layernorm.weight"]
        gate = normed @ w[p + "mlp.gate_proj.weight"].T
        up = normed @ w[p + "mlp.up_proj.weight"].T
        mlp = (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        return hid + mlp

    def logits(self, out: np.ndarray) -> np.ndarray:
        table = self.w["lm_head.weight"] if self.cfg.own_head else self.rows
        return out @ table.T

    def log_probs(self, out: np.ndarray) -> np.ndarray:
        z = self.logits(out)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def walk(self, features: np.ndarray, next_tokens: np.ndarray, path: list[int]) -> list:
        """Draft log-probs ``(K,)`` before each token of a drafted ``path`` (target ids) and
        after its last, the true entries being ``(features, next_tokens)`` (the last entry's
        next token is the root). The depth-``t`` node's entry is (the depth ``t-1`` output,
        its token) at the position after its parent's; it sees the true entries and its
        ancestors only, so a causal pass over the extended sequence computes it."""
        feats, toks = list(features), list(next_tokens)
        out = []
        for i in range(len(path) + 1):
            outs = self.layer(self.entries(np.array(toks), np.array(feats)), np.arange(len(toks)))
            out.append(self.log_probs(outs[-1]))
            if i < len(path):
                feats.append(outs[-1])
                toks.append(path[i])
        return out

    def path_log_probs(self, features, next_tokens, path: list[int]) -> list[float]:
        """Each drafted token's log-prob in ``path`` (see :meth:`walk`)."""
        steps = self.walk(features, next_tokens, path)
        return [float(steps[i][self.draft_index(t)]) for i, t in enumerate(path)]

    vocab: np.ndarray | None = None

    def draft_index(self, target_id: int) -> int:
        if self.vocab is None:
            return target_id
        return int(np.flatnonzero(self.vocab == target_id)[0])


CONFIGS = {
    # GQA, fc bias, full vocabulary, rows of a random LM head
    "gqa_bias_full": dict(heads=4, kv=2, hd=16, bias=True, reduced=False, own=False),
    # plain multi-head attention, no fc bias, a reduced draft vocabulary read from an
    # untied tiny target with lm_head_rows
    "mha_nobias_reduced": dict(heads=4, kv=4, hd=16, bias=False, reduced=True, own=False),
    # one key-value head, a head size that is not d / H, an own output layer
    "mqa_own_head": dict(heads=2, kv=1, hd=24, bias=True, reduced=True, own=True),
}
D, V = 64, 96


class Case:
    """A random head, its target-side tables and the numpy reference for one config."""

    def __init__(self, name: str, seed: int = 0):
        spec = CONFIGS[name]
        rng = np.random.default_rng(seed)
        self.vocab = None
        if spec["reduced"]:
            self.vocab = np.sort(rng.choice(V, size=40, replace=False)).astype(np.int32)
        cfg = EagleConfig(
            hidden_size=D,
            vocab_size=V,
            num_attention_heads=spec["heads"],
            num_key_value_heads=spec["kv"],
            head_dim=spec["hd"],
            intermediate_size=96,
            rope_theta=[10000.0, 500.0][seed % 2],
            bias=spec["bias"],
            draft_vocab_size=None if self.vocab is None else int(self.vocab.size),
            own_head=spec["own"],
        )
        self.head = randomize(EagleHead(cfg), seed)
        if spec["reduced"] and not spec["own"]:
            target = tiny_model("mistral", seed=seed, vocab_size=V)  # untied LM head
            self.embed = target.model.embed_tokens
            self.rows = lm_head_rows(target, self.vocab)
            np.testing.assert_array_equal(
                np.array(self.rows), np.array(target.lm_head.weight)[self.vocab]
            )
        else:
            self.embed = nn.Embedding(V, D)
            self.embed.weight = mx.array(rng.standard_normal((V, D)).astype(np.float32))
            table = rng.standard_normal((V, D)).astype(np.float32) / 2
            self.rows = mx.array(table if self.vocab is None else table[self.vocab])
        rows = None if spec["own"] else np.array(self.rows)
        self.ref = Reference(self.head, np.array(self.embed.weight), rows)
        self.ref.vocab = self.vocab
        # a sequence: target features f_j and tokens x_j (x_{n} is the root)
        self.n = 11
        self.features = rng.standard_normal((self.n, D)).astype(np.float32)
        self.tokens = rng.integers(0, V, size=self.n + 1).astype(np.int32)

    def drafter(self, tree_nodes: int | None = None) -> EagleDrafter:
        return EagleDrafter(self.head, self.rows, self.embed, self.vocab, tree_nodes=tree_nodes)

    def context(self, drafter: EagleDrafter, window: int) -> DraftContext:
        """Prime with the entries before the window, then the engine's context at the root
        ``x_n`` (position ``n``), the last ``window`` entries passed as recent rows."""
        n, c = self.n, window
        primed = n - c + 2  # the window overlaps the primed entries by two
        drafter.reset([])
        drafter.prime(mx.array(self.features[:primed]), mx.array(self.tokens[1 : primed + 1]))
        return DraftContext(
            hidden=mx.array(self.features[-1]),
            root=mx.array(self.tokens[n]),
            position=mx.array(n, dtype=mx.int32),
            tokens=self.tokens[: n + 1].tolist(),
            recent_hidden=mx.array(self.features[n - c :]),
            recent_count=mx.array(c, dtype=mx.int32),
            recent_tokens=mx.array(self.tokens[n - c + 1 : n + 1]),
        )


def test_rope_is_llamas_rotate_half():
    """The module's RoPE is mlx's non-traditional rope (Llama's half split) at any
    positions, including repeated ones (tree depths)."""
    x = mx.random.normal((2, 3, 5, 16), key=mx.random.key(1))
    positions = mx.array([0, 3, 3, 7, 100])
    got = rope(x, positions, 10000.0)
    for i, p in enumerate(positions.tolist()):
        want = mx.fast.rope(
            x[:, :, i : i + 1], 16, traditional=False, base=10000.0, scale=1.0, offset=p
        )
        np.testing.assert_allclose(np.array(got[:, :, i : i + 1]), np.array(want), atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_features_and_logits_equal_the_numpy_reference(name):
    case = Case(name, seed=list(CONFIGS).index(name))
    ref = case.ref
    n = case.n
    positions = np.arange(n) + 3  # any offset: positions are explicit
    out = case.head(
        case.embed(mx.array(case.tokens[1:]))[None],
        mx.array(case.features)[None],
        mx.array(positions),
        "causal",
    )[0]
    logits = case.head.logits(out, case.rows)
    want = ref.layer(ref.entries(case.tokens[1:], case.features), positions)
    np.testing.assert_allclose(np.array(out), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(logits), ref.logits(want), rtol=1e-4, atol=1e-4)
    assert logits.shape == (n, V if case.vocab is None else case.vocab.size)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [1, 3])
def test_grown_candidates_score_as_the_reference(name, k):
    """Every node the drafter grows (depths 1..3, ``k`` children of the ``k`` best nodes)
    carries the reference's cumulative log-probability of its path; the nodes expanded
    are the best ``k`` of their depth and each one's children its best ``k`` tokens."""
    case = Case(name, seed=list(CONFIGS).index(name))
    drafter = case.drafter()
    depth = 3
    cand = drafter.grow(case.context(drafter, window=5), k, depth)
    mx.eval(cand.paths, cand.scores, cand.depth)
    paths, scores, depths = np.array(cand.paths), np.array(cand.scores), np.array(cand.depth)
    ref = case.ref
    feats, toks = case.features, case.tokens[1:]
    want = {}
    for path, score, dep in zip(paths, scores, depths, strict=True):
        key = tuple(int(t) for t in path[:dep])
        lp = ref.path_log_probs(feats, toks, list(key))
        want[key] = sum(lp)
        np.testing.assert_allclose(score, want[key], rtol=1e-4, atol=1e-4)
    assert len(want) == k + 2 * k * k  # distinct nodes
    # depth 1: the root's k best tokens
    root_lp = ref.log_probs(ref.layer(ref.entries(toks, feats), np.arange(case.n))[-1])
    best = np.argsort(-root_lp)[:k]
    ids = best if case.vocab is None else case.vocab[best]
    assert {p[0] for p in want if len(p) == 1} == set(ids.tolist())
    for dep in (1, 2):
        level = sorted((p for p in want if len(p) == dep), key=lambda p: -want[p])
        expanded = {p[:dep] for p in want if len(p) == dep + 1}
        assert expanded == set(level[:k])
        for parent in expanded:
            kids = [p for p in want if len(p) == dep + 1 and p[:dep] == parent]
            assert len(kids) == k


@pytest.mark.parametrize("name", ["gqa_bias_full", "mha_nobias_reduced"])
def test_proposals_are_the_best_chain_beams_and_tree(name):
    """Chain: the reference's greedy path; beams: the ``W`` best paths of the last depth;
    dynamic tree: the ``N`` best nodes, ancestor-closed, each a valid-masked beam."""
    case = Case(name, seed=5)
    ref = case.ref
    feats, toks = case.features, case.tokens[1:]
    root = int(case.tokens[case.n])

    chain = case.drafter()
    beams = np.array(chain.propose(case.context(chain, 6), 1, 5).beams)
    table = np.arange(V) if case.vocab is None else case.vocab
    greedy = []
    for _ in range(4):
        greedy.append(int(table[int(np.argmax(ref.walk(feats, toks, greedy)[-1]))]))
    assert beams.tolist() == [[root, *greedy]]

    tree = case.drafter(tree_nodes=7)
    draft = tree.propose(case.context(tree, 6), 3, 4)
    beams, valid = np.array(draft.beams), np.array(draft.valid)
    assert beams.shape == (7, 4) and (beams[:, 0] == root).all()
    nodes = [tuple(b[1 : v.sum()]) for b, v in zip(beams, valid, strict=True)]
    assert len(set(nodes)) == 7
    for node in nodes:  # ancestor-closed
        assert all(node[:i] in nodes for i in range(1, len(node)))
    cand = tree.grow(case.context(tree, 6), 3, 3)
    mx.eval(cand.paths)
    all_nodes = [
        tuple(int(t) for t in p[:d])
        for p, d in zip(np.array(cand.paths), np.array(cand.depth), strict=True)
    ]
    score = {p: sum(ref.path_log_probs(feats, toks, list(p))) for p in all_nodes}
    kept = sorted(score, key=lambda p: -score[p])[:7]
    assert set(nodes) == set(kept)

    beam = case.drafter()  # beam search over the same candidates: the 3 best of depth 3
    beams = np.array(beam.propose(case.context(beam, 6), 3, 4).beams)
    deepest = sorted((p for p in score if len(p) == 3), key=lambda p: -score[p])[:3]
    assert (beams[:, 0] == root).all() and {tuple(b[1:]) for b in beams} == set(deepest)


# ----------------------------------------------------------------------------- engine

ARCHS = ["llama", "qwen3", "gemma3_text"]


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(byte_tokenizer())


def random_head(model, seed: int, draft_vocab: np.ndarray | None = None) -> EagleHead:
    cfg = EagleConfig.for_target(
        model, draft_vocab_size=None if draft_vocab is None else int(draft_vocab.size)
    )
    return randomize(EagleHead(cfg), seed)


class OracleEagle(EagleDrafter):
    """A random head whose draft log-probs at depth ``t`` favour the AR continuation's
    token ``t`` after the root (``sequence``: prompt + AR output), except at one depth
    of every ``wrong_every``-th proposal, where a wrong token is favoured instead. Every
    node's path, cache, tree attention and selection are the drafter's own. It records
    the tokens the engine accepts."""

    def __init__(self, model, sequence: list[int], seed: int = 0, wrong_every: int = 3, **kw):
        super().__init__(
            random_head(model, seed), lm_head_rows(model, None), model.model.embed_tokens, **kw
        )
        self.sequence = mx.array(sequence + [0] * 64, dtype=mx.int32)
        self.size = int(model.args.vocab_size)
        self.wrong_every = wrong_every
        self.calls = 0

    @classmethod
    def of(
        cls, drafter: EagleDrafter, sequence: list[int], size: int, wrong_every: int = 3
    ) -> OracleEagle:
        """``drafter`` (a loaded head, any draft vocabulary, target vocabulary ``size``)
        under the same bias."""
        other = cls.__new__(cls)
        other.__dict__.update(vars(drafter))
        other.sequence = mx.array(sequence + [0] * 64, dtype=mx.int32)
        other.size, other.wrong_every, other.calls = size, wrong_every, 0
        return other

    def reset(self, prompt_tokens: list[int]) -> None:
        super().reset(prompt_tokens)
        self.emitted: list[int] = []

    def grow(self, context: DraftContext, k: int, depth: int):
        self.calls += 1
        self._position, self._depth = context.position, 0
        wrong = self.wrong_every and self.calls % self.wrong_every == 0
        self._wrong_at = 1 + self.calls % depth if wrong else 0
        return super().grow(context, k, depth)

    def _log_probs(self, out: mx.array) -> mx.array:
        base = super()._log_probs(out)
        self._depth += 1
        truth = self.sequence[self._position + self._depth]
        if self._depth == self._wrong_at:
            truth = (truth + 1) % self.size
        ids = mx.arange(self.size) if self.vocab is None else self.vocab  # target ids
        logits = base + 30.0 * (ids == truth)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def accepted(self, tokens: list[int]) -> None:
        self.emitted.extend(tokens)


def _prompts(seed: int, vocab: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [1, *rng.integers(2, 30, size=count - 1).tolist()]  # incl. a one-token prompt
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _run(model, tok, prompt, max_tokens, **kw) -> list[gen.GenerationResponse]:
    return list(gen.stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw))


def _tokens(model, tok, prompt, max_tokens, **kw) -> list[int]:
    return [r.token for r in _run(model, tok, prompt, max_tokens, **kw)]


#: (beam width W, beam length L, tree nodes N or None): chain, beams, dynamic trees
SHAPES = [(1, 6, None), (3, 4, None), (3, 5, 6), (2, 6, 10)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_ar(arch, tokenizer, tmp_path, monkeypatch):
    """Oracle-like and random heads, chains, beams and dynamic trees: AR's tokens, with
    multi-token blocks accepted in every shape (oracle)."""
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=3, scale=2.0, vocab_size=vocab)
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    # a random head with a reduced draft vocabulary, loaded as a user would
    ids = np.sort(np.random.default_rng(1).choice(vocab, size=48, replace=False))
    save_head(tmp_path / "head", random_head(model, 7, ids), ids)
    best = {shape: 0 for shape in SHAPES}
    accepted = 0
    for i, prompt in enumerate(_prompts(ARCHS.index(arch), vocab, 3)):
        ar = _tokens(model, tokenizer, prompt, 48)
        for width, length, nodes in SHAPES:
            oracle = OracleEagle(model, prompt + ar, seed=i, tree_nodes=nodes)
            stats = gen.StepStats()
            out = _tokens(
                model,
                tokenizer,
                prompt,
                48,
                drafter=oracle,
                beam_width=width,
                beam_length=length,
                stats=stats,
            )
            assert out == ar, f"{arch} prompt {i} W{width} L{length} N{nodes}"
            best[(width, length, nodes)] = max(best[(width, length, nodes)], *stats.accepted)
            accepted += sum(stats.accepted)
        width, length, nodes = SHAPES[i % len(SHAPES)]
        rand = load_drafter(tmp_path / "head", model, tree_nodes=nodes)
        out = _tokens(
            model, tokenizer, prompt, 48, drafter=rand, beam_width=width, beam_length=length
        )
        assert out == ar, f"{arch} prompt {i}: random head"
    assert all(b >= length - 2 for b, (_, length, _) in zip(best.values(), SHAPES, strict=True))
    assert accepted > 3 * len(SHAPES) * 48 // 2, accepted


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_and_max_tokens_inside_accepted_blocks(arch, tokenizer, monkeypatch):
    vocab = len(tokenizer._tokenizer)
    model = tiny_model(arch, seed=5, scale=2.0, vocab_size=vocab)
    inside = {"stop": 0, "length": 0}
    for i, prompt in enumerate(_prompts(11 + ARCHS.index(arch), vocab, 4)):
        monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
        ar_full = _tokens(model, tokenizer, prompt, 40)
        eos = ar_full[14 + i]
        monkeypatch.setattr(tokenizer, "eos_token_ids", {eos})
        width, length, nodes = [(1, 6, None), (3, 6, 8)][i % 2]
        # full acceptance emits tokens 6k as a step's own: 5 and 16 are drafted
        for max_tokens in (5, 16, 40):
            ar = _tokens(model, tokenizer, prompt, max_tokens)
            oracle = OracleEagle(model, prompt + ar_full, seed=i, wrong_every=0, tree_nodes=nodes)
            responses = _run(
                model,
                tokenizer,
                prompt,
                max_tokens,
                drafter=oracle,
                beam_width=width,
                beam_length=length,
            )
            assert [r.token for r in responses] == ar
            last = responses[-1]
            assert last.finish_reason == ("stop" if ar[-1] == eos else "length")
            inside[last.finish_reason] += last.from_draft
    assert inside["stop"] >= 1 and inside["length"] >= 1, inside


# ----------------------------------------------------------------------------- the draft cache


def cache_error(model, tokenizer, arch_seed: int, width: int, length: int, nodes) -> float:
    """Run the engine with an oracle-like head, then compare the drafter's cache with the
    entries recomputed from scratch: the target's states over the final sequence (one
    plain forward), the token after each, the reference's keys and values at positions
    ``0 .. n-1`` (``n`` = the last root's position). Returns the largest difference."""
    vocab = len(tokenizer._tokenizer)
    prompt = _prompts(arch_seed, vocab, 2)[1]
    ar = _tokens(model, tokenizer, prompt, 50)
    drafter = OracleEagle(model, prompt + ar, seed=arch_seed, tree_nodes=nodes)
    stats = gen.StepStats()
    out = _tokens(
        model,
        tokenizer,
        prompt,
        50,
        drafter=drafter,
        beam_width=width,
        beam_length=length,
        stats=stats,
    )
    # long accepted blocks, and rollbacks (steps that rejected drafted tokens)
    assert out == ar and sum(stats.accepted) > 15 and min(stats.accepted) < length - 1
    full = prompt + [out[0]] + drafter.emitted
    assert full[: len(prompt) + 50] == prompt + ar
    n = int(drafter.cached.item())
    assert n == len(full) - 1
    target = Target(model)
    _, hidden = target.forward(mx.array(full[:n]), target.make_cache())
    ref = Reference(drafter.head, np.array(model.model.embed_tokens.weight), None)
    x = ref.entries(np.array(full[1 : n + 1]), np.array(hidden))
    _, keys, values = ref.qkv(x, np.arange(n))
    got_k = np.array(drafter.keys[0, :, :n])
    got_v = np.array(drafter.values[0, :, :n])
    return float(max(np.abs(got_k - keys).max(), np.abs(got_v - values).max()))


CACHE_RUNS = [("llama", 1, 6, None), ("gemma3_text", 3, 5, 8), ("qwen3", 3, 4, None)]


@pytest.mark.parametrize("arch, width, length, nodes", CACHE_RUNS)
def test_draft_cache_equals_recomputation_from_scratch(
    arch, width, length, nodes, tokenizer, monkeypatch
):
    """After accepts and rollbacks (and the cache growing: 16-entry steps), every cached
    entry is the one the final sequence gives."""
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    monkeypatch.setattr(eagle_module, "CACHE_STEP", 16)
    model = tiny_model(arch, seed=2, scale=2.0, vocab_size=len(tokenizer._tokenizer))
    assert cache_error(model, tokenizer, ARCHS.index(arch), width, length, nodes) < 2e-4


def _next_drafted_token(result):
    """A planted bug: the entry of the last accepted node paired with the drafted token
    after it (the rejected one) instead of the new root."""
    return mx.concatenate([result.drafted, result.next_root[None]])


def test_draft_cache_check_has_teeth(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    monkeypatch.setattr(gen, "_path_next", _next_drafted_token)
    model = tiny_model("llama", seed=2, scale=2.0, vocab_size=len(tokenizer._tokenizer))
    assert cache_error(model, tokenizer, 0, 1, 6, None) > 1e-2


# ----------------------------------------------------------------------------- exact sampling

SAMPLE_DRAWS = 300
SAMPLE_SHAPE = (3, 4, 8)  # W children per expanded node, L, N tree nodes


class ProbableEagle(EagleDrafter):
    """A dynamic-tree drafter whose depth-1 log-probs are the target's own after the
    context, its favourite demoted to last (the other depths: the random head's). The
    root's children then carry real mass without the favourite, so after they are all
    rejected the residual carries most of the law: a wrong residual moves the target's
    largest cell."""

    def __init__(self, model, **kw):
        super().__init__(
            random_head(model, 1), lm_head_rows(model, None), model.model.embed_tokens, **kw
        )
        self.model = model

    def grow(self, context: DraftContext, k: int, depth: int):
        self._tokens, self._first = list(context.tokens), True
        return super().grow(context, k, depth)

    def _log_probs(self, out: mx.array) -> mx.array:
        if not self._first:
            return super()._log_probs(out)
        self._first = False
        logits = self.model(mx.array(self._tokens)[None])[0, -1:]
        logits = mx.where(logits == logits.max(), logits.min() - 10.0, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def sampling_setup():
    return Setup(seed=0)


def sampled_draws(setup: Setup, tokenizer, seed: int) -> np.ndarray:
    """``(SAMPLE_DRAWS, 2)`` first two tokens ``stream_generate`` emits at T = 1 (the
    second from the first speculative step), one seed per draw."""
    width, length, nodes = SAMPLE_SHAPE
    drafter = ProbableEagle(setup.model, tree_nodes=nodes)
    params = SamplingParams(temp=1.0)
    draws = []
    for i in range(SAMPLE_DRAWS):
        mx.random.seed(seed + i)
        draws.append(
            _tokens(
                setup.model,
                tokenizer,
                PROMPT,
                2,
                sampler=params,
                drafter=drafter,
                beam_width=width,
                beam_length=length,
            )
        )
    return np.array(draws)


def test_dynamic_tree_sampling_keeps_the_target_law(sampling_setup, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    joint = engine_joint(sampling_setup, SamplingParams(temp=1.0))
    draws = sampled_draws(sampling_setup, tokenizer, 3000)
    p_value, tvd, _ = goodness_of_fit(draws, joint)
    assert p_value > 1e-3, f"p={p_value:.2e} tvd={tvd:.4f}"
    assert tvd < tvd_bound(joint, len(draws))


def test_dynamic_tree_sampling_with_a_naive_residual_fails(sampling_setup, tokenizer, monkeypatch):
    """Power: the walk drawing the stop node's token from ``p`` with the rejected children
    left in fails the same test (same draws, same seeds)."""
    monkeypatch.setattr(tokenizer, "eos_token_ids", {10**6})
    monkeypatch.setattr(accept, "_compiled_walk", walk_mutant("naive_residual"))
    joint = engine_joint(sampling_setup, SamplingParams(temp=1.0))
    draws = sampled_draws(sampling_setup, tokenizer, 3000)
    p_value, tvd, _ = goodness_of_fit(draws, joint)
    assert p_value < 1e-3, f"p={p_value:.3f} tvd={tvd:.4f}"


# ----------------------------------------------------------------------------- checkpoints


def _tiny_target():
    return tiny_model("llama", seed=1, vocab_size=V)  # d = 64, V = 96


@pytest.mark.parametrize(
    "shape, named",
    [
        (dict(hidden_size=32, vocab_size=V), ("hidden size 32", "hidden size 64")),
        (dict(hidden_size=D, vocab_size=120), ("vocabulary 120", "vocabulary 96")),
    ],
)
def test_a_head_for_another_target_is_refused_naming_both(shape, named, tmp_path):
    cfg = EagleConfig(
        **shape, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64
    )
    save_head(tmp_path / "head", EagleHead(cfg))
    model = _tiny_target()
    for load in (
        lambda: EagleDrafter.from_model(model, tmp_path / "head"),
        lambda: load_drafter(tmp_path / "head", model, tree_nodes=8),
    ):
        with pytest.raises(VocabularyMismatchError) as err:
            load()
        assert all(s in str(err.value) for s in named), str(err.value)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip(name, tmp_path):
    case = Case(name, seed=2)
    path = tmp_path / "head"
    save_head(path, case.head, case.vocab, extra={"training": {"steps": 3}})
    raw = json.loads((path / "config.json").read_text())
    assert raw["draft_kind"] == "eagle" and raw["num_hidden_layers"] == 1
    assert raw["training"] == {"steps": 3}
    assert is_eagle_dir(path) and head_kind(path) == "eagle"
    head, vocab = load_head(path)
    assert asdict(head.config) == asdict(case.head.config)
    if case.vocab is None:
        assert vocab is None
    else:
        np.testing.assert_array_equal(vocab, case.vocab)
    want = dict(tree_flatten(case.head.parameters()))
    got = dict(tree_flatten(head.parameters()))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(np.array(got[key]), np.array(want[key]))
    # EAGLE-1's names: the files' keys are exactly these
    keys = set(mx.load(str(path / "model.safetensors")))
    layer = {f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}
    layer |= {f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    layer |= {"layers.0.post_attention_layernorm.weight", "fc.weight"}
    layer |= {"fc.bias"} if case.head.config.bias else set()
    layer |= {"draft_vocab"} if case.vocab is not None else set()
    layer |= {"lm_head.weight"} if case.head.config.own_head else set()
    assert keys == layer


def test_eagle1_files_and_malformed_heads(tmp_path, head_dir):
    """An EAGLE-1 checkpoint's copy of the embedding is ignored; a missing weight, a wrong
    shape or a draft vocabulary without its size are refused naming the key; a ReDrafter
    head directory is not an eagle head."""
    model = _tiny_target()
    head = randomize(EagleHead(EagleConfig.for_target(model)), 4)
    path = tmp_path / "eagle1"
    save_head(path, head)
    weights = dict(mx.load(str(path / "model.safetensors")))
    mx.save_safetensors(
        str(path / "model.safetensors"), {**weights, "embed_tokens.weight": mx.zeros((V, D))}
    )
    drafter = EagleDrafter.from_model(model, path, tree_nodes=6)
    assert drafter.tree_nodes == 6 and drafter.with_tree(None).tree_nodes is None
    np.testing.assert_array_equal(np.array(drafter.head.fc.weight), np.array(head.fc.weight))
    bad = {k: v for k, v in weights.items() if k != "layers.0.mlp.up_proj.weight"}
    mx.save_safetensors(str(path / "model.safetensors"), bad)
    with pytest.raises(ValueError, match="up_proj"):
        load_head(path)
    wrong = {**weights, "fc.weight": mx.zeros((D, D))}
    mx.save_safetensors(str(path / "model.safetensors"), wrong)
    with pytest.raises(ValueError, match="fc.weight"):
        load_head(path)
    lonely = {**weights, "draft_vocab": mx.arange(5, dtype=mx.int32)}
    mx.save_safetensors(str(path / "model.safetensors"), lonely)
    with pytest.raises(ValueError, match="draft_vocab"):
        load_head(path)
    assert head_kind(head_dir) == "redrafter" and not is_eagle_dir(head_dir)
    assert not isinstance(load_drafter(head_dir, model), EagleDrafter)


def test_loaded_head_drafts_like_the_saved_one(tmp_path):
    """``from_model`` reads the target's LM-head rows of the saved draft vocabulary and
    embedding: the loaded drafter proposes what the in-memory one does."""
    model = tiny_model("mistral", seed=2, vocab_size=V)  # untied LM head
    ids = np.arange(10, 70, dtype=np.int32)
    head = random_head(model, 3, ids)
    save_head(tmp_path / "head", head, ids, dtype=mx.float16)
    loaded = EagleDrafter.from_model(model, tmp_path / "head", tree_nodes=7)
    assert loaded.head.fc.weight.dtype == mx.float32
    np.testing.assert_array_equal(np.array(loaded.rows), np.array(model.lm_head.weight)[ids])
    fp16 = EagleHead(head.config)
    fp16.update(
        tree_unflatten([(k, v.astype(mx.float16)) for k, v in tree_flatten(head.parameters())])
    )
    fp16.set_dtype(mx.float32)
    here = EagleDrafter(fp16, lm_head_rows(model, ids), model.model.embed_tokens, ids, tree_nodes=7)
    rng = np.random.default_rng(0)
    features = mx.array(rng.standard_normal((9, D)).astype(np.float32))
    tokens = mx.array(rng.integers(0, V, size=10).astype(np.int32))
    drafts = []
    for drafter in (loaded, here):
        drafter.reset([])
        drafter.prime(features[:8], tokens[1:9])
        ctx = DraftContext(
            features[-1],
            tokens[9],
            mx.array(9, dtype=mx.int32),
            tokens.tolist(),
            recent_hidden=features[-4:],
            recent_count=mx.array(4, dtype=mx.int32),
            recent_tokens=tokens[-4:],
        )
        drafts.append(drafter.propose(ctx, 3, 4))
    assert np.array(drafts[0].beams).tolist() == np.array(drafts[1].beams).tolist()
    beams, valid = np.array(drafts[0].beams), np.array(drafts[0].valid)
    assert np.isin(beams[:, 1:][valid[:, 1:]], ids).all()  # target ids of the draft vocabulary
