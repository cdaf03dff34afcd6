"""The llama.cpp target wrapper on the real SmolLM2 GGUF: tree verification, commits, long runs."""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_gguf.errors import ContextFullError, InvalidArgumentError
from dovetail_gguf.target import Target, TargetConfig, tree_layout

PROMPT = "The history of the printing press begins in"


def random_tree(rng: np.random.Generator, n: int, main_path: int) -> np.ndarray:
    """Parents of a random tree whose nodes 0..main_path-1 form a chain laid out first."""
    parents = np.empty(n, dtype=np.int32)
    parents[0] = -1
    parents[1:main_path] = np.arange(main_path - 1)
    for i in range(main_path, n):
        parents[i] = rng.integers(0, i)
    return parents


def paths_of(parents: np.ndarray) -> list[list[int]]:
    n = len(parents)
    leaves = sorted(set(range(n)) - set(parents[1:].tolist()))
    out = []
    for leaf in leaves:
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = parents[node]
        out.append(path[::-1])
    return out


SHAPES = {
    "chain": np.array([-1, 0, 1, 2, 3, 4, 5, 6], dtype=np.int32),
    "wide": np.array([-1] + [0] * 15, dtype=np.int32),
    "unbalanced": np.array([-1, 0, 1, 2, 3, 4, 0, 6, 1, 8, 8, 2, 11, 0, 13, 14], dtype=np.int32),
    "random32": random_tree(np.random.default_rng(1), 32, 6),
}


def test_tree_layout_derives_depths_and_paths():
    parents = SHAPES["unbalanced"]
    lay = tree_layout(np.arange(len(parents)), parents)
    assert lay.depth.tolist() == [0, 1, 2, 3, 4, 5, 1, 2, 2, 3, 3, 3, 4, 1, 2, 3]
    paths = paths_of(parents)
    assert lay.n_paths == len(paths)
    for s, path in enumerate(paths):  # node j carries seq s exactly when it lies on path s
        for j in range(len(parents)):
            ids = set(lay.seq_ids[j, : lay.n_seq_ids[j]].tolist())
            assert (s in ids) == (j in path)
    assert lay.seq_ids[0, : lay.n_seq_ids[0]].tolist() == list(range(lay.n_paths))  # the root is on every path


@pytest.mark.parametrize("bad", [[0, 0], [-1, 1], [-1, -1], [-1, 2, 0]])
def test_tree_layout_rejects_malformed_parents(bad):
    with pytest.raises(InvalidArgumentError):
        tree_layout(np.zeros(len(bad)), np.array(bad))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_call_equals_each_path_alone(target, shape):
    """Batches of 2-63 rows use one kernel family on the CPU, so this holds bit for bit."""
    parents = SHAPES[shape]
    rng = np.random.default_rng(len(parents))
    tokens = rng.integers(0, target.n_vocab, size=len(parents)).astype(np.int32)
    target.reset()
    prompt = target.tokenize(PROMPT)
    target.prefill(prompt)
    res = target.verify_tree(tokens, parents)
    tree_logits, tree_hidden = res.logits.copy(), res.hidden.copy()
    target.commit([0])
    for path in paths_of(parents):
        target.truncate(len(prompt))
        chain = target.verify_tree(tokens[path], np.arange(-1, len(path) - 1))
        np.testing.assert_array_equal(chain.logits, tree_logits[path])
        np.testing.assert_array_equal(chain.hidden, tree_hidden[path])
        target.commit([0])
    target.reset()


def test_commit_keeps_exactly_the_accepted_path(target):
    target.reset()
    prompt = target.tokenize(PROMPT)
    target.prefill(prompt)
    parents = SHAPES["unbalanced"]
    tokens = np.random.default_rng(5).integers(100, 5000, size=len(parents)).astype(np.int32)
    target.verify_tree(tokens, parents)
    path = [0, 1, 8, 10]  # not the first path: its cells are not contiguous
    target.commit(path)
    assert target.n_past == len(prompt) + len(path)
    assert target.committed_tokens.tolist() == prompt.tolist() + tokens[path].tolist()
    # the cache holds nothing else, compact and in order (commit re-evaluated the nodes off the first
    # path): the next decode equals, bit for bit, the same decode after a from-scratch prefill
    committed = target.committed_tokens
    nxt, _ = target.decode_one(42)
    nxt = nxt.copy()
    with Target(target.path, TargetConfig(n_ctx=1024, n_threads=2, n_ubatch=32)) as fresh:
        fresh.prefill(committed)
        ref, _ = fresh.decode_one(42)
        np.testing.assert_array_equal(nxt, ref)
    target.reset()


def test_a_prefill_without_outputs_leaves_the_same_cache(target):
    """outputs=False skips the LM head and the hidden states, not the KV cache: the next decode
    is bit for bit the same, and later evaluations output every row again."""
    prompt = target.tokenize(PROMPT)
    target.reset()
    logits, hidden = target.prefill(prompt)
    assert logits is not None and hidden.shape == (prompt.size, target.n_embd)
    want, _ = target.decode_one(42)
    want = want.copy()
    target.reset()
    assert target.prefill(prompt, outputs=False) == (None, None)
    got, got_hidden = target.decode_one(42)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got_hidden).sum() > 0  # hidden states are back on
    res = target.verify_tree(np.array([7, 8, 9], dtype=np.int32), np.array([-1, 0, 0], dtype=np.int32))
    assert np.isfinite(res.logits).all() and (np.abs(res.hidden).sum(axis=1) > 0).all()
    target.commit([0])
    target.reset()


def test_commit_validates_the_path(target):
    target.reset()
    target.prefill(target.tokenize(PROMPT))
    target.verify_tree(np.array([1, 2, 3], dtype=np.int32), np.array([-1, 0, 0]))
    with pytest.raises(InvalidArgumentError):
        target.commit([0, 2, 1])  # 1 is not a child of 2
    with pytest.raises(InvalidArgumentError):
        target.commit([1])  # must start at the root
    target.reset()
    with pytest.raises(InvalidArgumentError):
        target.commit([0])  # nothing verified


def test_rejects_bad_tokens_and_oversized_trees(target):
    target.reset()
    target.prefill(target.tokenize(PROMPT))
    with pytest.raises(InvalidArgumentError):
        target.verify_tree(np.array([1, target.n_vocab], dtype=np.int32), np.array([-1, 0]))
    with pytest.raises(InvalidArgumentError):
        target.decode_one(-1)
    n = target.max_tree_nodes + 1
    with pytest.raises(InvalidArgumentError):
        target.verify_tree(np.ones(n, dtype=np.int32), np.arange(-1, n - 1))
    target.reset()


def test_context_full_is_an_error_not_a_crash(smollm2_path):
    with Target(smollm2_path, TargetConfig(n_ctx=32, n_threads=2)) as t:
        t.prefill(np.arange(100, 130, dtype=np.int32))
        with pytest.raises(ContextFullError):
            t.verify_tree(np.array([1, 2, 3], dtype=np.int32), np.array([-1, 0, 1]))
        with pytest.raises(ContextFullError):
            t.prefill(np.arange(100, 140, dtype=np.int32))


def _rounds(t: Target, rng, n_rounds: int, contiguous: bool, on_full: str | None) -> None:
    """Verify random trees and commit a random path, as the engine does.

    on_full: None (the context must not fill), "reset" (start over from the newest half).
    """
    for _ in range(n_rounds):
        n = int(rng.integers(2, 12))
        main = int(rng.integers(1, n + 1))
        parents = random_tree(rng, n, main)
        tokens = rng.integers(0, t.n_vocab, size=n).astype(np.int32)
        depth = tree_layout(tokens, parents).depth.max()
        if t.n_past + max(depth + 1, n) > min(t.n_ctx, t.n_cells):
            assert on_full, "the context filled up"
            keep = t.committed_tokens[t.n_past // 2 :]
            t.reset()
            t.prefill(keep)
        t.verify_tree(tokens, parents)
        if contiguous:  # accept a prefix of the chain laid out first
            path = list(range(int(rng.integers(1, main + 1))))
        else:  # accept the path to a random node
            node, path = int(rng.integers(0, n)), []
            while node >= 0:
                path.append(node)
                node = parents[node]
            path = path[::-1]
        t.commit(path)
        assert t.n_past <= t.n_ctx


def _from_scratch_next_logits(path, tokens: np.ndarray) -> np.ndarray:
    # n_ubatch 32 keeps every step in the 2-63 row kernel family the rounds used
    with Target(path, TargetConfig(n_ctx=2048, n_threads=2, n_ubatch=32)) as fresh:
        logits, _ = fresh.prefill(tokens)
    return logits


@pytest.mark.slow
def test_rounds_with_contiguous_cells_match_from_scratch_exactly(smollm2_path):
    """Exact while the attention's KV window stays the same: llama.cpp pads it to multiples
    of 256 cells, and a wider window changes the summation order (measured: 0.3-0.5 logits
    of drift on chains alone past 256 cells)."""
    with Target(smollm2_path, TargetConfig(n_ctx=2048, n_threads=2)) as t:
        t.prefill(t.tokenize(PROMPT))
        _rounds(t, np.random.default_rng(0), 50, contiguous=True, on_full=None)
        assert t.n_past < 255
        nxt, _ = t.decode_one(42)
        ref = _from_scratch_next_logits(smollm2_path, np.append(t.committed_tokens, []).astype(np.int32))
        np.testing.assert_array_equal(nxt, ref)


@pytest.mark.slow
def test_long_runs_never_exhaust_the_cache(smollm2_path):
    """1,000 rounds on n_ctx=2048 with random accepted paths, starting over from the newest
    half of the history whenever the context fills.

    Holes left by rejected nodes and the attention window's width change the
    floating-point summation order, so the comparison with a from-scratch
    evaluation is approximate: the argmax agrees and no logit moves by more
    than 1.0 (SmolLM2's logits span about 30; measured drift 0.3-0.6).
    """
    with Target(smollm2_path, TargetConfig(n_ctx=2048, n_threads=2, n_ubatch=32)) as t:
        t.prefill(t.tokenize(PROMPT))
        _rounds(t, np.random.default_rng(1), 1000, contiguous=False, on_full="reset")
        nxt, _ = t.decode_one(int(t.tokenize(" the", add_special=False)[0]))
        nxt = nxt.copy()
        ref = _from_scratch_next_logits(smollm2_path, t.committed_tokens)
    assert int(np.argmax(nxt)) == int(np.argmax(ref))
    assert np.abs(nxt - ref).max() < 1.0


@pytest.mark.parametrize("next_call", ["decode_one", "prefill", "verify_tree", "truncate"])
def test_an_uncommitted_tree_leaves_no_cell_behind(target, next_call):
    """A tree verified but never committed is dropped by the next evaluation: the cache then holds
    exactly the committed tokens, and the next decode equals, bit for bit, one without the tree."""
    target.reset()
    prompt = target.tokenize(PROMPT)
    target.prefill(prompt)
    ref = target.decode_one(42)[0].copy()
    target.truncate(prompt.size)
    tokens = np.random.default_rng(9).integers(100, 5000, size=len(SHAPES["unbalanced"])).astype(np.int32)
    target.verify_tree(tokens, SHAPES["unbalanced"])
    if next_call == "decode_one":
        got = target.decode_one(42)[0]
    elif next_call == "prefill":
        got = target.prefill(np.array([42], dtype=np.int32))[0]
    elif next_call == "verify_tree":
        got = target.verify_tree(np.array([42], dtype=np.int32), np.array([-1])).logits[0]
        target.commit([0])
    else:
        target.truncate(prompt.size)
        got = target.decode_one(42)[0]
    np.testing.assert_array_equal(got, ref)
    assert target._ctx.seq_pos_range(0) == (0, target.n_past - 1)
    for seq in range(1, 8):  # the tree's other paths are gone
        assert target._ctx.seq_pos_range(seq) == (-1, -1)
    target.reset()


def test_decode_one_equals_a_one_node_tree(target):
    target.reset()
    target.prefill(target.tokenize(PROMPT))
    n = target.n_past
    a, h = target.decode_one(7)
    a, h = a.copy(), h.copy()
    target.truncate(n)
    res = target.verify_tree(np.array([7], dtype=np.int32), np.array([-1]))
    np.testing.assert_array_equal(res.logits[0], a)
    np.testing.assert_array_equal(res.hidden[0], h)
    target.commit([0])
    target.reset()


def one_token_decode_and_tree_root(t: Target, context: np.ndarray, root: int, n_nodes: int):
    """(logits, hidden) of ``root`` decoded alone after ``context``, then of the same token as a chain's root."""
    t.reset()
    t.prefill(context)
    one, hid = (a.copy() for a in t.decode_one(root))
    t.truncate(context.size)
    res = t.verify_tree(np.array([root] + [11] * (n_nodes - 1), dtype=np.int32), SHAPES["chain"][:n_nodes])
    row, row_hid = res.logits[0].copy(), res.hidden[0].copy()
    t.commit([0])
    t.reset()
    return one, hid, row, row_hid


@pytest.mark.parametrize("n_nodes", [2, 4, 8])
def test_first_row_of_a_tree_equals_a_one_token_decode_below_256_cells(target, n_nodes):
    """What greedy equality with plain decoding rests on: the root of a tree is computed exactly as a
    one-token decode. It holds while the KV cache has fewer than 256 cells; past that, llama.cpp
    0.3.36 splits a one-token decode's attention across threads (README, "Known limitation")."""
    prompt = target.tokenize(PROMPT * 8)
    assert prompt.size > 60
    for n_ctx in (20, 60, min(prompt.size, 200)):
        root = int(prompt[n_ctx]) if n_ctx < prompt.size else 7
        one, hid, row, row_hid = one_token_decode_and_tree_root(target, prompt[:n_ctx], root, n_nodes)
        np.testing.assert_array_equal(row, one)
        np.testing.assert_array_equal(row_hid, hid)


def test_past_256_cells_rows_are_the_same_on_one_and_two_threads(target, smollm2_path):
    """Past 256 KV cells stock llama.cpp splits a lone row's attention over the cache across threads,
    so a two-thread one-token decode differs from a one-thread one; the invariant kernels keep it
    whole: one-token decodes and tree rows agree on one and two threads."""
    prompt = target.tokenize(PROMPT * 40)
    n_ctx = 300
    assert prompt.size > n_ctx
    root = int(prompt[n_ctx])
    one_2, _, row_2, _ = one_token_decode_and_tree_root(target, prompt[:n_ctx], root, 3)
    single = Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=1))
    try:
        one_1, _, row_1, _ = one_token_decode_and_tree_root(single, prompt[:n_ctx], root, 3)
    finally:
        single.close()
    np.testing.assert_array_equal(row_1, row_2)  # tree rows: the same on 1 and 2 threads
    np.testing.assert_array_equal(row_2, one_1)  # ... and equal to the one-thread one-token decode
    np.testing.assert_array_equal(one_2, one_1)  # ... and so does the two-thread one
