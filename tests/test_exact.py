"""Exact mode: greedy speculative output is bit-identical to plain decoding, on every architecture here.

In exact mode (TargetConfig.exact) llama.cpp uses no repacked weight layouts,
so a row of a verified tree is computed by the same kernels as a one-token
decode. An oracle drafter proposes the target's own greedy continuation (plus
a decoy sibling per level), so long paths get accepted only if every verified
row's argmax equals plain decoding's; n-gram branches ride along.
"""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_gguf.engine import Engine, GenerateOptions
from dovetail_gguf.target import Target, TargetConfig
from dovetail_gguf.types import DraftTree, TreeConfig

PROMPTS = [
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True when n is prime.\"\"\"\n",
    "The three laws of thermodynamics are",
    "import numpy as np\n\ndef moving_average(x, k):\n",
]


class OracleDrafter:
    """Proposes the known greedy continuation below the root, with a decoy beside every node."""

    def __init__(self, prompt_len: int, continuation: list[int], decoy: int = 17):
        self.prompt_len, self.cont, self.decoy, self.pairs = prompt_len, continuation, decoy, 0
        self.max_positions = 10**9

    def trim(self, n_pairs: int) -> int:
        self.pairs = n_pairs
        return n_pairs

    def propose(self, features, tokens, tree: TreeConfig) -> DraftTree:
        self.pairs += len(tokens)
        j = self.pairs - self.prompt_len
        chain = self.cont[j + 1 : j + 1 + min(tree.depth, tree.tokens // 2)]  # chain + decoys fit the tree
        toks = [int(tokens[-1])] + chain + [self.decoy] * len(chain)
        parents = [-1] + list(range(len(chain))) + list(range(len(chain)))
        return DraftTree(np.array(toks, np.int32), np.array(parents, np.int32), np.zeros(len(toks), np.float32))


def generate(engine: Engine, prompt, n: int):
    engine.target.reset()
    gen = engine.start(prompt, GenerateOptions(max_tokens=n))
    for _ in gen:
        pass
    return gen.result


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "qwen", "gemma"])
def test_exact_mode_speculation_equals_plain_decoding(model, request, tmp_path, monkeypatch):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))  # probe the exact tree size afresh
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen": "qwen_path", "gemma": "gemma_path"}[model])
    with Target(path, TargetConfig(n_ctx=512, n_threads=2, exact=True)) as t:
        assert not t.extra_buffers
        for text in PROMPTS:
            prompt = t.tokenize(text)
            ref = generate(Engine(t), prompt, 40)
            oracle = OracleDrafter(len(prompt), ref.tokens + [0] * 8)
            spec = generate(Engine(t, oracle, TreeConfig(12, 6, 2), adaptive=False, ngram=True), prompt, 40)
            assert spec.tokens == ref.tokens, text
            assert spec.stats.mean_accepted_tokens > 2.5  # long accepted paths: every row agreed with plain decoding


@pytest.mark.slow
def test_the_shipped_qwen_draft_is_lossless_in_exact_mode(qwen_path):
    """The default Qwen pair (shipped draft, chat requests, a fixed small tree): plain decoding's
    tokens, with draft tokens accepted along the way."""
    from dovetail_gguf import Dovetail
    from dovetail_gguf.models import default_draft_for
    from dovetail_gguf.gguf_io import read_facts

    draft = default_draft_for(read_facts(qwen_path))
    if draft is None:
        pytest.skip("no shipped draft for Qwen2.5-Coder-0.5B")
    cfg = TargetConfig(n_ctx=512, n_threads=2, exact=True)
    chats = [[{"role": "user", "content": c}] for c in
             ("Write a Python function that reverses a string.", "What does a list comprehension do?")]
    with Dovetail(qwen_path, False, target_config=cfg) as plain, \
            Dovetail(qwen_path, tree=TreeConfig(6, 4, 2), target_config=cfg, adaptive=False) as spec:
        assert spec.drafter_path == draft
        for chat in chats:
            a, b = plain.chat(chat, max_tokens=32), spec.chat(chat, max_tokens=32)
            assert b.tokens == a.tokens
            assert b.stats.accepted_tokens > b.stats.rounds  # the draft's tokens were accepted, not only bonus tokens


@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_exact_mode_plain_steps_equal_tree_rows_at_any_context_length(model, request):
    """In exact mode a one-token decode carries a throw-away second row, so llama.cpp computes it as
    it computes tree rows: bit-equal to a verified chain's root past 256 and 512 cells too, on two
    threads (a lone row's attention is split across threads there and summed in another order)."""
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen": "qwen_path"}[model])
    rng = np.random.default_rng(0)
    with Target(path, TargetConfig(n_ctx=1024, n_threads=2, exact=True)) as t:
        for filled in (100, 255, 300, 511, 700):
            t.reset()
            t.prefill(rng.integers(100, 5000, size=filled).astype(np.int32), outputs=False)
            single, _ = t.decode_one(1234)
            single = single.copy()
            t.truncate(filled)
            chain = t.verify_tree(np.array([1234, 5, 6], dtype=np.int32), np.array([-1, 0, 1], dtype=np.int32))
            np.testing.assert_array_equal(single, chain.logits[0], err_msg=f"{filled} cells")
            t.commit([0])
            assert t.n_past == filled + 1 and t.committed_tokens[-1] == 1234  # the spare row left nothing
        t.reset()


@pytest.mark.slow
def test_exact_mode_speculation_equals_plain_decoding_past_256_cells(smollm2_path, tmp_path, monkeypatch):
    """The oracle's long accepted paths, with the answer running from cell ~200 to ~330."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    with Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=2, exact=True)) as t:
        prompt = t.tokenize("Write a long essay about the history of the printing press. " * 15)[:200]
        ref = generate(Engine(t), prompt, 130)
        oracle = OracleDrafter(len(prompt), ref.tokens + [0] * 8)
        spec = generate(Engine(t, oracle, TreeConfig(12, 6, 2), adaptive=False, ngram=True), prompt, 130)
        assert spec.tokens == ref.tokens
        assert spec.stats.mean_accepted_tokens > 2.5


def test_committed_cells_sit_where_plain_decoding_puts_them(smollm2_path):
    """KV invariant 2: after commit, the accepted path's cells follow the committed ones in position
    order, as plain decoding leaves them (commit relies on llama.cpp's allocator placing a batch's
    rows in consecutive free cells, and re-evaluates accepted nodes that sit elsewhere). Checked by
    effect, bit for bit in exact mode: the next decode after a commit equals the one after plain
    decoding of the same tokens; with the accepted path off the batch's first path (re-evaluated)
    and on it (kept in place). A llama.cpp upgrade that moves cells fails here."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 5000, size=40).astype(np.int32)
    # root 7 -> 8 -> 9 (the first path), and root -> 10 -> 11 (laid out after it)
    tokens = np.array([7, 8, 9, 10, 11], np.int32)
    parents = np.array([-1, 0, 1, 0, 3], np.int32)
    with Target(smollm2_path, TargetConfig(n_ctx=256, n_threads=2, exact=True)) as t:
        for path, accepted in (([0, 1, 2], [7, 8, 9]), ([0, 3, 4], [7, 10, 11])):
            t.reset()
            t.prefill(prompt, outputs=False)
            t.verify_tree(tokens, parents)
            reevaluated = t.commit(path)
            assert reevaluated == (0 if accepted[1] == 8 else 2)
            after_commit = t.decode_one(42)[0].copy()
            t.reset()
            t.prefill(prompt, outputs=False)
            for tok in accepted:
                t.decode_one(tok)
            np.testing.assert_array_equal(after_commit, t.decode_one(42)[0], err_msg=str(path))
        t.reset()
