"""The Dovetail draft on the CPU: DGF, tree invariants, KV-cache trimming, checkpoints, pairing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dovetail_gguf.draft.io import init_draft, load_draft, read_config, save_draft
from dovetail_gguf.draft.model import DraftConfig, DraftModel, DynamicGatingFusion
from dovetail_gguf.draft.tree import TreeDrafter, order_best_first
from dovetail_gguf.engine import TreeConfig
from dovetail_gguf.errors import DraftMismatchError, InvalidArgumentError, ModelFileError
from dovetail_gguf.target import tree_layout


@pytest.fixture(scope="module")
def draft_model(smollm2_path):
    return init_draft(smollm2_path, n_layer=2, seed=1)


def pairs(n: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.integers(0, 49152, size=n).astype(np.int32)


def test_dgf_matches_the_formula():
    torch.manual_seed(0)
    d = 16
    dgf = DynamicGatingFusion(d, 1e-5)
    with torch.no_grad():
        dgf.emb_norm.weight.copy_(torch.rand(d) + 0.5)
    f, e = torch.randn(3, d), torch.randn(3, d)
    h1 = f @ dgf.w1.weight.T
    e_norm = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + 1e-5) * dgf.emb_norm.weight
    h2 = F.silu(e_norm @ dgf.w2.weight.T)
    z = torch.sigmoid(torch.cat([h1, h2], -1) @ dgf.wz.weight.T)
    torch.testing.assert_close(dgf(f, e), z * h1 + (1 - z) * h2)
    bound = (6 / (d + d)) ** 0.5  # Xavier-uniform bound of W1
    assert dgf.w1.weight.abs().max() <= bound and dgf.w1.weight.std() > bound / 4


def test_first_layer_has_no_input_norm(draft_model):
    assert isinstance(draft_model.layers[0].input_norm, torch.nn.Identity)
    assert not isinstance(draft_model.layers[1].input_norm, torch.nn.Identity)
    names = set(draft_model.state_dict())
    assert not any("embedding" in n or n == "head" for n in names)  # the target's tensors are not saved


@pytest.mark.parametrize("tree", [TreeConfig(16, 7, 10), TreeConfig(5, 3, 2), TreeConfig(30, 4, 6), TreeConfig(1, 1, 1)])
def test_tree_invariants(draft_model, tree):
    drafter = TreeDrafter(draft_model, 512, torch.device("cpu"))
    feats, toks = pairs(12, draft_model.cfg.n_embd, 0)
    t = drafter.propose(feats, toks, tree)
    n = len(t.tokens)
    assert n == tree.tokens + 1 and t.tokens[0] == toks[-1] and t.parents[0] == -1
    assert (t.parents[1:] < np.arange(1, n)).all() and (t.parents[1:] >= 0).all()  # parents precede children
    depth = tree_layout(t.tokens, t.parents).depth
    assert depth.max() <= tree.depth
    assert (np.bincount(t.parents[1:], minlength=n) <= tree.topk).all()  # top-k children at most
    assert (t.scores[1:] <= t.scores[t.parents[1:]] + 1e-6).all()  # cumulative log-probs fall along a path
    assert ((t.tokens >= 0) & (t.tokens < draft_model.cfg.n_vocab)).all()
    # children of every node come best first, so the first path is the greedy chain
    for node in range(n):
        kids = np.flatnonzero(t.parents == node)
        assert (np.diff(t.scores[kids]) <= 1e-6).all()
    again = TreeDrafter(draft_model, 512, torch.device("cpu")).propose(feats, toks, tree)
    np.testing.assert_array_equal(again.tokens, t.tokens)
    np.testing.assert_array_equal(again.parents, t.parents)


def test_cache_trimming_equals_recomputing(draft_model):
    """Scratch tree rows are dropped after each round: round 2 equals one pass over all pairs."""
    tree = TreeConfig(10, 4, 4)
    f1, t1 = pairs(9, draft_model.cfg.n_embd, 1)
    f2, t2 = pairs(4, draft_model.cfg.n_embd, 2)
    a = TreeDrafter(draft_model, 512, torch.device("cpu"))
    a.propose(f1, t1, tree)
    two_rounds = a.propose(f2, t2, tree)
    one_pass = TreeDrafter(draft_model, 512, torch.device("cpu")).propose(np.concatenate([f1, f2]), np.concatenate([t1, t2]), tree)
    np.testing.assert_array_equal(two_rounds.tokens, one_pass.tokens)
    np.testing.assert_array_equal(two_rounds.parents, one_pass.parents)
    np.testing.assert_allclose(two_rounds.scores, one_pass.scores, atol=1e-4)
    # trimming back and re-feeding gives the same tree again
    a.trim(len(t1))
    np.testing.assert_array_equal(a.propose(f2, t2, tree).tokens, one_pass.tokens)


@pytest.mark.parametrize("tokens,depth", [(1, 1), (2, 2), (3, 3), (5, 4), (6, 2)])
def test_small_trees_need_only_as_many_candidates_as_nodes(draft_model, tokens, depth):
    """The engine drafts small trees with topk = tokens: the tree must be the one topk = 10 gives."""
    f, t = pairs(7, draft_model.cfg.n_embd, 4)
    wide = TreeDrafter(draft_model, 512, torch.device("cpu")).propose(f, t, TreeConfig(tokens, depth, 10))
    narrow = TreeDrafter(draft_model, 512, torch.device("cpu")).propose(f, t, TreeConfig(tokens, depth, tokens))
    np.testing.assert_array_equal(wide.tokens, narrow.tokens)
    np.testing.assert_array_equal(wide.parents, narrow.parents)
    np.testing.assert_allclose(wide.scores, narrow.scores, atol=1e-4)


@torch.no_grad()
def test_unrolled_pass_equals_a_drafted_chain(draft_model):
    """Training-time test: row i of pass j is what inference computes for a depth-(j+1) node.

    Inference: commit the teacher pairs up to i - j, then feed each predicted
    feature back as the next node of a chain, attending to the committed rows
    and the chain so far.
    """
    from dovetail_gguf.draft.model import DraftKVCache

    m = draft_model.eval()
    n, steps = 12, 4
    f, t = pairs(n, m.cfg.n_embd, 3)
    feats, toks = torch.from_numpy(f)[None], torch.from_numpy(t.astype(np.int64))[None]
    pos = torch.arange(1, n + 1)[None]
    outs = m.unroll(feats, toks, pos, steps)
    for j in range(steps):
        for i in range(j, n):
            c = i - j + 1  # committed teacher rows
            cache = DraftKVCache(m.cfg, 64, "cpu", torch.float32)
            rows = torch.arange(c)
            cache.set_used(c)
            out = m(feats[:, :c], toks[:, :c], pos[:, :c], rows[None, :] <= rows[:, None], cache, rows)[0, -1]
            for s in range(1, j + 1):
                r = c + s - 1  # this chain node's slot and pair index
                cache.set_used(r + 1)
                mask = torch.ones(1, r + 1, dtype=torch.bool)
                out = m(out[None, None], toks[:, r : r + 1], pos[:, r : r + 1], mask, cache, torch.tensor([r]))[0, -1]
            torch.testing.assert_close(outs[j][0, i], out, atol=2e-5, rtol=1e-4)


def test_save_load_round_trip(tmp_path, draft_model, smollm2_path):
    out = save_draft(draft_model, tmp_path / "draft")
    loaded = load_draft(out, smollm2_path)
    for k, v in draft_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert read_config(out).target["tokenizer_fingerprint"] == draft_model.cfg.target["tokenizer_fingerprint"]
    with pytest.raises(InvalidArgumentError, match="already exists"):
        save_draft(draft_model, out)
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others, like the folder
    # shipping in fp16: floats rounded once, integer buffers (d2t) untouched, half the size
    half = save_draft(draft_model, tmp_path / "half", dtype=torch.float16)
    loaded = load_draft(half, smollm2_path)
    for k, v in draft_model.state_dict().items():
        expected = v.half().to(v.dtype) if v.is_floating_point() else v
        torch.testing.assert_close(loaded.state_dict()[k], expected, rtol=0, atol=0)
    assert (half / "model.safetensors").stat().st_size < 0.55 * (out / "model.safetensors").stat().st_size


def test_reduced_vocabulary_maps_to_target_ids(smollm2_path, tmp_path):
    d2t = torch.randperm(49152)[:2048].sort().values
    model = init_draft(smollm2_path, n_layer=1, draft_vocab=2048, d2t=d2t)
    assert model.head.shape == (2048, 576)
    t = TreeDrafter(model, 256, torch.device("cpu")).propose(*pairs(5, 576, 3), TreeConfig(8, 3, 3))
    assert np.isin(t.tokens[1:], d2t.numpy()).all()
    loaded = load_draft(save_draft(model, tmp_path / "small"), smollm2_path)
    torch.testing.assert_close(loaded.d2t, d2t)


def test_a_slim_mlp_draft_saves_loads_and_drafts(smollm2_path, tmp_path):
    """--intermediate-size: the MLP is as wide as asked (not the target's), and survives a round trip."""
    model = init_draft(smollm2_path, n_layer=1, draft_vocab=1024, intermediate_size=384)
    assert model.cfg.intermediate_size == 384 and model.layers[0].up.weight.shape == (384, 576)
    wide = init_draft(smollm2_path, n_layer=1, draft_vocab=1024)
    assert wide.cfg.intermediate_size == 1536  # the target's n_ff
    loaded = load_draft(save_draft(model, tmp_path / "slim"), smollm2_path)
    assert loaded.cfg.intermediate_size == 384
    t = TreeDrafter(loaded, 256, torch.device("cpu")).propose(*pairs(5, 576, 3), TreeConfig(6, 3, 2))
    assert t.tokens.size == 1 + 6  # the root, then the drafted nodes


def test_mismatched_target_is_refused(tmp_path, draft_model, gemma_path):
    out = save_draft(draft_model, tmp_path / "draft")
    with pytest.raises(DraftMismatchError, match="Smollm2.*not for"):
        load_draft(out, gemma_path)


def test_bad_draft_folders(tmp_path, smollm2_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_draft(tmp_path / "nope", smollm2_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a draft folder"):
        load_draft(tmp_path / "empty", smollm2_path)


def test_best_first_order():
    parents = np.array([-1, 0, 0, 1, 2, 2])
    scores = np.array([0, -2.0, -1.0, -3.0, -1.5, -1.2])
    order = order_best_first(parents, scores)
    assert order.tolist() == [0, 2, 5, 4, 1, 3]


def test_config_validation():
    with pytest.raises(ValueError):
        DraftConfig(n_embd=64, n_vocab=100, fusion="sum")
    with pytest.raises(ValueError):
        DraftModel(DraftConfig(n_embd=64, n_vocab=100, n_head=4, n_kv_head=4), torch.zeros(99, 64), torch.zeros(99, 64))


def test_bf16_draft_agrees_with_fp32(smollm2_path):
    """bf16 is the GPU's dtype; on the CPU the same code path runs and mostly picks the same tree."""
    feats, toks = pairs(10, 576, 4)
    trees = []
    for dtype in (torch.float32, torch.bfloat16):
        model = init_draft(smollm2_path, n_layer=2, draft_vocab=4096, seed=5)
        trees.append(TreeDrafter(model, 256, torch.device("cpu"), dtype).propose(feats, toks, TreeConfig(16, 7, 10)))
        assert model.rope_cos.dtype == torch.float32  # angles stay exact
    a, b = trees
    assert a.tokens[1] == b.tokens[1]  # the best first token
    assert len(set(a.tokens.tolist()) & set(b.tokens.tolist())) >= 0.7 * len(a.tokens)
