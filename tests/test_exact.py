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
