"""One answer per request: with the default (invariant) kernels a row's logits are the same in any
batch, so greedy speculative output is bit-identical to plain decoding, at any context length, on
every architecture here, whatever the engine learned before and whatever the prediction.

An oracle drafter proposes the target's own greedy continuation (plus a decoy sibling per level),
so long paths get accepted only if every verified row's argmax equals plain decoding's; n-gram
branches ride along. With the fast kernels (llama.cpp's own choice) several of these fail.
"""

from __future__ import annotations

import numpy as np
import pytest

import json
import os
import platform
import subprocess
import sys

from dovetail_gguf.costs import cost_key, read_entry
from dovetail_gguf.engine import Engine, GenerateOptions
from dovetail_gguf.invariance import Invariance
from dovetail_gguf.gguf_io import read_facts
from dovetail_gguf.kernels import llama_cpp_patched, repack_invariant
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
def test_speculation_equals_plain_decoding(model, request, tmp_path, monkeypatch):
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen": "qwen_path", "gemma": "gemma_path"}[model])
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))  # probe afresh (after the model is assembled)
    with Target(path, TargetConfig(n_ctx=512, n_threads=2)) as t:
        assert t.extra_buffers == repack_invariant(t.facts.quant_types)  # Qwen's Q4_K weights repacked, patched
        for text in PROMPTS:
            prompt = t.tokenize(text)
            ref = generate(Engine(t), prompt, 40)
            oracle = OracleDrafter(len(prompt), ref.tokens + [0] * 8)
            spec = generate(Engine(t, oracle, TreeConfig(12, 6, 2), adaptive=False, ngram=True), prompt, 40)
            assert spec.tokens == ref.tokens, text
            assert spec.stats.mean_accepted_tokens > 2.5  # long accepted paths: every row agreed with plain decoding


@pytest.mark.slow
def test_the_shipped_qwen_draft_is_lossless(qwen_path):
    """The default Qwen pair (shipped draft, chat requests, a fixed small tree): plain decoding's
    tokens, with draft tokens accepted along the way."""
    from dovetail_gguf import Dovetail
    from dovetail_gguf.models import default_draft_for
    from dovetail_gguf.gguf_io import read_facts

    draft = default_draft_for(read_facts(qwen_path))
    if draft is None:
        pytest.skip("no shipped draft for Qwen2.5-Coder-0.5B")
    cfg = TargetConfig(n_ctx=512, n_threads=2)
    chats = [[{"role": "user", "content": c}] for c in
             ("Write a Python function that reverses a string.", "What does a list comprehension do?")]
    with Dovetail(qwen_path, False, target_config=cfg) as plain, \
            Dovetail(qwen_path, tree=TreeConfig(6, 4, 2), target_config=cfg, adaptive=False) as spec:
        assert spec.drafter_path == draft
        for chat in chats:
            a, b = plain.chat(chat, max_tokens=32), spec.chat(chat, max_tokens=32)
            assert b.tokens == a.tokens
            assert b.stats.accepted_tokens > b.stats.rounds  # the draft's tokens were accepted, not only bonus tokens


LONG_CONTEXTS = (100, 255, 300, 511, 700, 1100)  # cells in use: past 256, 512 and 1,024


def lone_and_tree_rows(t: Target, filled: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """After ``filled`` random tokens: a one-token decode's logits, and the same token's as a tree's root."""
    t.reset()
    t.prefill(rng.integers(100, 5000, size=filled).astype(np.int32), outputs=False)
    single = t.decode_one(1234)[0].copy()
    t.truncate(filled)
    chain = t.verify_tree(np.array([1234, 5, 6], dtype=np.int32), np.array([-1, 0, 1], dtype=np.int32))
    root = chain.logits[0].copy()
    t.commit([0])
    assert t.n_past == filled + 1 and t.committed_tokens[-1] == 1234  # a throw-away row left nothing
    return single, root


@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_one_token_decodes_equal_tree_rows_at_any_context_length(model, request):
    """Past 512 KV cells stock llama.cpp splits a lone row's attention across threads and sums the
    parts in another order; the invariant kernels compute it as they compute tree rows."""
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen": "qwen_path"}[model])
    rng = np.random.default_rng(0)
    with Target(path, TargetConfig(n_ctx=2048, n_threads=2)) as t:
        for filled in LONG_CONTEXTS:
            single, root = lone_and_tree_rows(t, filled, rng)
            np.testing.assert_array_equal(single, root, err_msg=f"{filled} cells")
        t.reset()


def rows_against_one_token_decodes(t: Target, filled: int, sizes, rng) -> dict[int, int]:
    """Verify chains of each size in ``sizes`` after ``filled`` random committed tokens; per size, how
    many of its rows differ from the same tokens decoded one at a time (0: bit-equal)."""
    t.reset()
    t.prefill(rng.integers(3, t.n_vocab, size=filled).astype(np.int32), outputs=False)
    tokens = rng.integers(3, t.n_vocab, size=max(sizes)).astype(np.int32)
    one_by_one = np.stack([t.decode_one(int(tok))[0].copy() for tok in tokens])
    assert np.isfinite(one_by_one).all()
    t.truncate(filled)
    differ = {}
    for k in sizes:
        rows = t.verify_tree(tokens[:k], np.arange(-1, k - 1)).logits.copy()
        t.truncate(filled)
        differ[k] = int((rows != one_by_one[:k]).any(axis=1).sum())
    t.reset()
    return differ


# tree sizes either side of llama.cpp's row blocks (repack's 4, the tiled matmul's 8, tinyBLAS tiles)
# up to the largest tree the invariant kernels allow (TILE_ROWS - 1); every size costs minutes here
KERNEL_EDGES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63)


@pytest.mark.slow
@pytest.mark.parametrize("model,sizes,contexts", [("smollm2", KERNEL_EDGES, (600, 1100)), ("qwen", KERNEL_EDGES, (1100,))])
def test_a_tree_of_any_size_computes_each_row_as_a_one_token_decode_past_512_and_1024_cells(model, sizes, contexts,
                                                                                            request):
    """A chain of k rows verified in one batch, k from 1 to 63, against the same tokens decoded one at
    a time, past 512 and 1,024 committed cells: bit-equal row for row. Qwen's Q4_K/Q6_K weights take
    llama.cpp's tiled K-quant matmul from 8 rows in a stock build (fails here with
    GGML_CPU_TILED_MM_MIN_ROWS=8); SmolLM2 is Q4_1 (tinyBLAS from 2 rows)."""
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen": "qwen_path"}[model])
    rng = np.random.default_rng(11)
    with Target(path, TargetConfig(n_ctx=2048, n_threads=2)) as t:
        assert t.max_tree_nodes == max(sizes)
        for filled in contexts:
            differ = rows_against_one_token_decodes(t, filled, sizes, rng)
            assert differ == {k: 0 for k in sizes}, f"rows differing per batch size after {filled} cells"


@pytest.mark.parametrize("outtype,repacked", [("q4_k_m", "Q4_K"), ("q4_0", "Q4_0"), ("q2_k", "Q2_K")])
def test_repacked_rows_equal_one_token_decodes(random_llama, outtype, repacked, tmp_path, monkeypatch):
    """Weights in llama.cpp's repacked layouts (its "extra buffer types": on x86 Q4_0, IQ4_NL, Q4_K;
    Q2_K with AVX-512)
    run a GEMM over each block of 4 rows of a batch and a GEMV over the rest. With the patch the two
    compute a row alike, so the invariant kernels load them repacked and every row of a chain of 1 to
    63 equals a one-token decode, at a short context and past 512 cells; the engine's probe agrees.
    Stock llama.cpp's Q4_K GEMV adds one product per 256 weights and its GEMM one per 64: there a
    chain of 4+ rows differs."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    path = random_llama(outtype)
    assert repacked in read_facts(path).quant_types
    with Target(path, TargetConfig(n_ctx=1024, n_threads=2)) as t:
        assert t.extra_buffers == repack_invariant(read_facts(path).quant_types)
        if not t.extra_buffers:
            pytest.skip("this llama.cpp build or CPU takes no repacked layouts in the invariant kernels")
        probed, t.max_tree_nodes = t.invariance.tree_rows, max(KERNEL_EDGES)  # measure every size here
        for filled in (20, 600):
            differ = rows_against_one_token_decodes(t, filled, KERNEL_EDGES, np.random.default_rng(filled))
            assert differ == {k: 0 for k in KERNEL_EDGES}, f"rows differing per batch size after {filled} cells"
        assert probed == max(KERNEL_EDGES)  # the engine's own probe lets trees use every size


def test_repacked_layouts_only_for_types_whose_kernels_agree():
    """The invariant kernels keep llama.cpp's repacked layouts only where every repacked type's GEMV
    and GEMM agree (patched build, x86, no AMX kernels): not for a file with MXFP4 weights."""
    from dovetail_gguf.kernels import REPACK_MARK, _cpu_library_holds
    from dovetail_gguf.llama_runtime import system_info

    if not _cpu_library_holds(REPACK_MARK) or platform.machine().lower() not in ("x86_64", "amd64") \
            or "AMX_INT8 = 1" in system_info():
        assert not repack_invariant({"Q4_K": 1})
        return
    assert repack_invariant({"Q4_K": 169, "Q6_K": 29, "F32": 57})  # a Q4_K_M file
    assert repack_invariant({"Q5_0": 133, "Q8_0": 13})  # nothing repacked: harmless
    assert repack_invariant({"Q2_K": 100, "Q4_0": 3, "IQ4_NL": 1})
    assert not repack_invariant({"Q4_K": 100, "MXFP4": 24})


_SPLIT_KV_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_invariance import lone_and_tree_rows
from dovetail_gguf.target import Target, TargetConfig
with Target(sys.argv[1], TargetConfig(n_ctx=2048, n_threads=2)) as t:
    t.pair_single = False  # lone rows run alone, whatever the probe chose
    equal = []
    for filled in (600, 900, 1100):
        single, root = lone_and_tree_rows(t, filled, np.random.default_rng(filled))
        equal.append(bool((single == root).all()))
    print(json.dumps({"equal": equal, "lone_rows_agree": t.invariance.lone_rows_agree}))
"""


@pytest.mark.skipif(not llama_cpp_patched(), reason="llama.cpp without patches/llama-cpp-batch-invariant.patch")
def test_the_patch_is_what_makes_a_lone_row_equal_a_tree_row(smollm2_path, tmp_path):
    """The patch's GGML_CPU_FA_SPLIT_KV=0 at work: in a process where it is 1 (llama.cpp's own
    behaviour), a lone row past 512 cells is split across threads along the KV cache and differs
    from the same row in a tree; with the patch's setting, the default, they are equal and the probe
    lets lone rows run alone. (With the patch's FP32 accumulator a split row agrees more often than
    in a stock build, so the comparison runs at three contexts.)"""
    def child(split_kv: str | None) -> dict:
        env = dict(os.environ, DOVETAIL_CACHE=str(tmp_path / (split_kv or "default")))
        env.pop("GGML_CPU_FA_SPLIT_KV", None)
        if split_kv is not None:
            env["GGML_CPU_FA_SPLIT_KV"] = split_kv
        out = subprocess.run([sys.executable, "-c", _SPLIT_KV_CHILD, str(smollm2_path), os.path.dirname(__file__)],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert child(None) == {"equal": [True] * 3, "lone_rows_agree": True}
    assert not all(child("1")["equal"])


def test_the_probe_is_cached_per_machine_file_and_threads(smollm2_path, tmp_path, monkeypatch, caplog):
    """The first target probes and caches; the next reads the cache; a damaged entry is probed again."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    caplog.set_level("INFO", logger="dovetail_gguf")
    with Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=2)) as t:
        assert "probing llama.cpp's kernels" in caplog.text
        found = t.invariance
        assert Invariance(**read_entry(cost_key(t) + "/invariance")) == found
        assert found.complete and found.tree_rows == 63 and found.tiled_prefill
        assert found.lone_rows_agree == llama_cpp_patched()  # stock llama.cpp splits a lone row past 512 cells
        assert t.max_tree_nodes == 63 and t.pair_single == (not found.lone_rows_agree)
        key = cost_key(t) + "/invariance"
    caplog.clear()
    with Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=2)) as t:
        assert "probing" not in caplog.text and t.invariance == found
        assert found.describe() in caplog.text  # the one line saying what was chosen
    doc = json.loads((tmp_path / "verify_costs.json").read_text())
    doc[key] = {"tree_rows": "many"}
    (tmp_path / "verify_costs.json").write_text(json.dumps(doc))
    with Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=2)) as t:
        assert "probing" in caplog.text and t.invariance == found
    caplog.clear()
    with Target(smollm2_path, TargetConfig(n_ctx=128, n_threads=2)) as t:  # too small to probe it all: not cached
        assert t.invariance.complete is False or "probing" not in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("prompt_len", [200, 450, 950])
def test_speculation_equals_plain_decoding_past_256_512_and_1024_cells(smollm2_path, prompt_len, tmp_path, monkeypatch):
    """The oracle's long accepted paths, with the answer crossing 256, 512 and 1,024 cells."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    with Target(smollm2_path, TargetConfig(n_ctx=2048, n_threads=2)) as t:
        prompt = t.tokenize("Write a long essay about the history of the printing press. " * 80)[:prompt_len]
        ref = generate(Engine(t), prompt, 130)
        oracle = OracleDrafter(len(prompt), ref.tokens + [0] * 8)
        spec = generate(Engine(t, oracle, TreeConfig(12, 6, 2), adaptive=False, ngram=True), prompt, 130)
        assert spec.tokens == ref.tokens
        assert spec.stats.mean_accepted_tokens > 2.5


def run(engine: Engine, prompt, n: int, prediction=None) -> list[int]:
    gen = engine.start(prompt, GenerateOptions(max_tokens=n, prediction=prediction))
    for _ in gen:
        pass
    return gen.result.tokens


@pytest.mark.slow
def test_the_same_request_gets_the_same_answer_whatever_came_before(qwen_path):
    """One engine, one request asked five times between others that change its learned state (costs,
    acceptance, the cache's prefix), and with a right, a wrong and an empty prediction: always the
    cold answer of plain decoding. The prompts run past 256 cells, and the repeats reuse a cached prefix."""
    from dovetail_gguf import Dovetail

    cfg = TargetConfig(n_ctx=2048, n_threads=2)
    code = open(__file__).read()[:2400]
    ask = [{"role": "user", "content": "Add type hints to this code and return it whole:\n" + code}]
    others = [[{"role": "user", "content": "Add type hints to this code and return it whole:\n" + code[:1200]}],
              [{"role": "user", "content": "Write a haiku about rivers."}]]
    with Dovetail(qwen_path, False, target_config=cfg) as plain, Dovetail(qwen_path, target_config=cfg) as spec:
        prompt = np.asarray(plain.chat_prompt_tokens(ask), dtype=np.int32)
        assert prompt.size > 300
        want = run(plain.engine, prompt, 48)
        answers = []
        for i in range(5):
            answers.append(run(spec.engine, prompt, 48))
            run(spec.engine, spec.chat_prompt_tokens(others[i % 2]), 24)
        assert answers == [want] * 5
        text = plain.target.detokenize(want)
        for prediction in (text, "def nothing():\n    return None\n" * 8, ""):
            assert run(spec.engine, prompt, 48, prediction=prediction) == want
        spec.engine.target.truncate(prompt.size - 40)  # a warm prefix ending inside the prompt
        assert run(spec.engine, prompt, 48) == want


def test_committed_cells_sit_where_plain_decoding_puts_them(smollm2_path):
    """KV invariant 2: after commit, the accepted path's cells follow the committed ones in position
    order, as plain decoding leaves them (commit relies on llama.cpp's allocator placing a batch's
    rows in consecutive free cells, and re-evaluates accepted nodes that sit elsewhere). Checked by
    effect, bit for bit: the next decode after a commit equals the one after plain
    decoding of the same tokens; with the accepted path off the batch's first path (re-evaluated)
    and on it (kept in place). A llama.cpp upgrade that moves cells fails here."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 5000, size=40).astype(np.int32)
    # root 7 -> 8 -> 9 (the first path), and root -> 10 -> 11 (laid out after it)
    tokens = np.array([7, 8, 9, 10, 11], np.int32)
    parents = np.array([-1, 0, 1, 0, 3], np.int32)
    with Target(smollm2_path, TargetConfig(n_ctx=256, n_threads=2)) as t:
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
