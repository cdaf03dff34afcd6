"""Lossless speculative generation through the real SmolLM2 target and real drafts."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from dovetail_gguf import Dovetail, TreeConfig
from dovetail_gguf.draft.io import init_draft, save_draft
from dovetail_gguf.engine import DraftTree
from dovetail_gguf.errors import DraftMismatchError, InvalidArgumentError, ModelFileError
from dovetail_gguf.gguf_io import read_facts
from dovetail_gguf.models import default_draft_for, default_target_path
from dovetail_gguf.target import TargetConfig


def default_draft_path():
    return default_draft_for(read_facts(default_target_path()))


TCFG = TargetConfig(n_ctx=1024, n_threads=2)

PROMPTS = [
    "def fibonacci(n):",
    'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same backwards."""\n',
    "import numpy as np\n\n# compute the mean of each row\n",
    "SELECT name, COUNT(*) FROM users",
    "The three laws of thermodynamics are",
    "Once upon a time, in a small village,",
    "Q: What is the capital of Japan?\nA:",
    "Bonjour, je voudrais réserver une table pour",
    "Der schnellste Weg zum Bahnhof ist",
    "El clima en Madrid durante el verano es",
    "東京は日本の首都で、",
    "今天天气很好，我们去",
    "Москва — столица России и",
    "I love pizza 🍕 and",
    "🚀🌕 The mission to the moon",
    "1, 1, 2, 3, 5, 8, 13,",
    "To be, or not to be,",
    "<html>\n<head>\n<title>",
    "Dear hiring manager,\n\nI am writing to apply for",
    "Recipe for pancakes:\n1.",
]
CHATS = [
    [{"role": "user", "content": "Write a Python function that reverses a list."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Traduis en anglais : « le chat dort »."}],
]


@pytest.fixture(scope="module")
def base():
    dt = Dovetail(draft=False, target_config=TCFG)
    yield dt
    dt.close()


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory, smollm2_path):
    return save_draft(init_draft(smollm2_path, n_layer=1, draft_vocab=4096, seed=3), tmp_path_factory.mktemp("d") / "draft")


@pytest.fixture(scope="module")
def untrained(untrained_dir):
    # a fixed tree: every round drafts and verifies (adaptive sizing would fall back to plain steps)
    dt = Dovetail(draft=untrained_dir, device="cpu", tree=TreeConfig(8, 4, 4), target_config=TCFG, adaptive=False)
    yield dt
    dt.close()


class OracleDrafter:
    """A drafter that knows the target's greedy continuation: it proposes that chain (ending in
    EOS) plus decoy siblings, so long paths, EOS inside a path and mid-path cuts really happen."""

    def __init__(self, prompt_len: int, continuation: list[int], decoy: int = 17):
        self.prompt_len, self.cont, self.decoy, self.pairs = prompt_len, continuation, decoy, 0

    def trim(self, n_pairs: int) -> int:
        self.pairs = n_pairs  # it stores nothing, so it can resume anywhere
        return n_pairs

    def propose(self, features, tokens, tree: TreeConfig) -> DraftTree:
        self.pairs += len(tokens)
        j = self.pairs - self.prompt_len  # index of the root in the continuation
        chain = self.cont[j + 1 : j + 1 + tree.depth]
        toks = [int(tokens[-1])] + chain + [self.decoy] * len(chain)
        parents = [-1] + list(range(len(chain))) + list(range(len(chain)))
        return DraftTree(np.array(toks, np.int32), np.array(parents, np.int32), np.zeros(len(toks), np.float32))


def test_a_bf16_draft_is_as_lossless_as_fp32(base, untrained_dir):
    """--draft-dtype bf16 changes which tokens are drafted, never which are emitted."""
    with Dovetail(draft=untrained_dir, device="cpu", draft_dtype="bf16", tree=TreeConfig(8, 4, 4),
                  target_config=TCFG, adaptive=False) as dt:
        assert dt.drafter.dtype == torch.bfloat16
        for prompt in PROMPTS[:4]:
            b = dt.generate(prompt, max_tokens=32)
            assert b.tokens == base.generate(prompt, max_tokens=32).tokens, prompt
            # a fixed tree: every round drafted in bf16, and verified more rows than it emitted tokens
            # (the last round, one token from max_tokens, may be a plain step)
            assert b.stats.draft_rounds >= b.stats.rounds - 1 >= 1 and b.stats.verified_rows > b.stats.accepted_tokens
    with pytest.raises(InvalidArgumentError, match="dtype"):
        Dovetail(draft=untrained_dir, device="cpu", draft_dtype="int4", target_config=TCFG)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["untrained", "shipped"])
def test_greedy_output_is_the_targets_own(base, untrained, which):
    """Token for token, over 20 varied prompts and 3 chat-templated ones. Contexts stay far
    below 256 cells, where verification and single-token decoding use identical kernels."""
    if which == "shipped":
        if default_draft_path() is None:
            pytest.skip("no shipped draft")
        dt = Dovetail(target_config=TCFG, adaptive=False)
    else:
        dt = untrained
    accepted_draft = 0
    for prompt in PROMPTS:
        a, b = base.generate(prompt, max_tokens=40), dt.generate(prompt, max_tokens=40)
        assert a.tokens == b.tokens, prompt
        assert a.text == b.text and a.finish_reason == b.finish_reason
        assert b.stats.draft_rounds >= b.stats.rounds - 1  # a fixed tree: every round but a last one-token one drafted
        accepted_draft += b.stats.depth_accepted[0] if b.stats.depth_accepted else 0
    if which == "shipped":  # the trained draft's tokens were accepted, not only the target's bonus tokens
        assert accepted_draft > len(PROMPTS)
    for chat in CHATS:
        a, b = base.chat(chat, max_tokens=60), dt.chat(chat, max_tokens=60)
        assert a.tokens == b.tokens


def test_eos_inside_an_accepted_path_and_max_token_cuts(base):
    chat = [{"role": "user", "content": "Say hello."}]
    ref = base.chat(chat, max_tokens=200)
    assert ref.finish_reason == "stop" and len(ref.tokens) > 3
    prompt = base.chat_prompt_tokens(chat)
    eos = base.target.facts.eos_token_id
    for eot in {eos, int(base.target.tokenize("<|im_end|>", add_special=False, parse_special=True)[0])}:
        base.engine.set_drafter(OracleDrafter(len(prompt), ref.tokens + [eot]), adaptive=False)  # the full tree every round
        try:
            full = base.generate_tokens(prompt, max_tokens=200)
            assert full.tokens == ref.tokens and full.finish_reason == "stop"
            assert full.stats.mean_accepted_tokens > 2  # long accepted paths, EOS inside the last one
            s = full.stats
            assert len(s.depth_drafted) >= 3 and s.depth_accepted == s.depth_drafted  # the oracle's chain is always right
            assert s.depth_drafted[0] == s.rounds and s.depth_drafted == sorted(s.depth_drafted, reverse=True)
            assert sum(s.depth_accepted) + s.rounds == s.accepted_tokens  # each emitted token: a tree node or the bonus
            assert s.verified_rows > s.accepted_tokens  # the decoys were verified too
            for cut in (1, 2, 5, len(ref.tokens) - 1):
                base.engine.set_drafter(OracleDrafter(len(prompt), ref.tokens + [eot]))
                r = base.generate_tokens(prompt, max_tokens=cut)
                assert r.tokens == ref.tokens[:cut] and r.finish_reason == "length"
        finally:
            base.engine.set_drafter(None, adaptive=True)


class DecoyFirstOracle(OracleDrafter):
    """The oracle's tree, scored so that every decoy looks likelier than the right child: the batch's
    first path is root -> decoy, and every accepted path leaves it at the root."""

    def propose(self, features, tokens, tree: TreeConfig) -> DraftTree:
        d = super().propose(features, tokens, tree)
        n = (d.tokens.size - 1) // 2
        scores = np.zeros(d.tokens.size, np.float32)
        scores[1 : n + 1] = -np.arange(1, n + 1)  # the chain: -1 per level
        scores[n + 1 :] = scores[d.parents[n + 1 :]] - 0.1  # each decoy: -0.1 below its parent
        return DraftTree(d.tokens, d.parents, scores)


def test_an_accepted_path_off_the_batchs_first_path_is_re_evaluated(base):
    """Commit's second decode (the accepted path was not the first in the batch, so its KV cells are
    not contiguous): the output is still plain decoding's, and the statistics count every row."""
    chat = [{"role": "user", "content": "Say hello."}]
    ref = base.chat(chat, max_tokens=40)
    prompt = base.chat_prompt_tokens(chat)
    eos = base.target.facts.eos_token_id
    results = {}
    for name, cls in (("first", OracleDrafter), ("second", DecoyFirstOracle)):
        base.engine.set_drafter(cls(len(prompt), ref.tokens + [eos]), adaptive=False)
        try:
            results[name] = base.generate_tokens(prompt, max_tokens=40)
        finally:
            base.engine.set_drafter(None, adaptive=True)
    for r in results.values():
        assert r.tokens == ref.tokens
    first, second = results["first"].stats, results["second"].stats
    assert first.reevaluated_rows == 0  # the right chain laid out first: its cells are already in place
    # every accepted tree node (a round's emitted tokens but its bonus) decoded once more
    assert second.reevaluated_rows == second.accepted_tokens - second.rounds > 0


def test_a_long_prompt_gives_the_draft_its_last_window_only(base, untrained, monkeypatch):
    """The prefill computes outputs (and so the LM head) only for the positions the draft will read:
    the prompt's last DRAFT_WINDOW; the draft skips the rest, and the output is still the target's."""
    from dovetail_gguf.engine import DRAFT_WINDOW
    from dovetail_gguf.target import Target

    prompt = base.tokenize_prompt("The history of printing, from woodblocks to movable type. " * 60)[:700]
    assert len(prompt) == 700
    rows = []
    real = Target.prefill
    monkeypatch.setattr(Target, "prefill", lambda self, tokens, outputs=True: rows.append((len(tokens), outputs))
                        or real(self, tokens, outputs))
    untrained.target.reset()
    r = untrained.generate_tokens(prompt, max_tokens=24)
    assert sum(n for n, out in rows if out) == DRAFT_WINDOW and sum(n for n, _ in rows) == len(prompt) - 1
    assert untrained.drafter.offset == len(prompt) - 1 - DRAFT_WINDOW
    assert r.stats.draft_rounds >= 1  # the draft ran, on its window
    assert r.tokens == base.generate_tokens(prompt, max_tokens=24).tokens
    # the next turn keeps the cached prefix and the drafter's window: only the new tokens are
    # evaluated (the invariant kernels put them in one batch of at least TILE_ROWS rows, as a cold
    # prefill of the whole prompt would compute them)
    from dovetail_gguf.kernels import TILE_ROWS

    rows.clear()
    longer = prompt + r.tokens + base.tokenize_prompt(" And then?")[1:]
    untrained.generate_tokens(longer, max_tokens=4)
    assert sum(n for n, _ in rows) <= max(len(longer) - len(prompt), TILE_ROWS)


def test_stream_equals_final_text_with_multibyte_characters(untrained):
    prompt = "Write three emoji and the Chinese word for cat: 🐱"
    stream = untrained.stream(prompt, max_tokens=40)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert any(ord(c) > 0x2FFF for c in stream.result.text), stream.result.text
    # no character was split between pieces: the stream decodes like the whole byte string at once
    whole = b"".join(untrained.target.token_bytes(t) for t in stream.result.tokens).decode("utf-8", errors="replace")
    assert stream.result.text == whole


def test_stop_strings(base):
    full = base.generate("1, 2, 3, 4,", max_tokens=30).text
    assert " 7," in full
    r = base.generate("1, 2, 3, 4,", max_tokens=30, stop=[" 7,"])
    assert r.text == full[: full.index(" 7,")] and r.finish_reason == "stop"


def test_repeated_calls_reuse_the_cache_correctly(base):
    a = base.generate("The best way to learn programming is", max_tokens=20)
    b = base.generate("The best way to learn programming is", max_tokens=20)
    assert a.tokens == b.tokens
    longer = "The best way to learn programming is to"
    c = base.generate(longer, max_tokens=20)
    with Dovetail(draft=False, target_config=TCFG) as fresh:
        assert fresh.generate(longer, max_tokens=20).tokens == c.tokens


def test_usable_from_other_threads(base):
    prompts = ["Roses are red,", "The ocean is", "My favourite book is"]
    expected = [base.generate(p, max_tokens=12).tokens for p in prompts]
    got = {}

    def work(i, p):
        got[i] = base.generate(p, max_tokens=12).tokens

    threads = [threading.Thread(target=work, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=10**12), None),
    ],
)
def test_bad_sampling_values(base, kwargs, match):
    if match is None:  # absurd but valid: stops at EOS or a full context, cleanly
        r = base.generate("Hi", **kwargs)
        assert r.finish_reason in ("stop", "context_full")
        return
    with pytest.raises(InvalidArgumentError, match=match):
        base.generate("Hello", **kwargs)


def test_bad_prompts_and_drafts(base, tmp_path):
    with pytest.raises(InvalidArgumentError, match="empty"):
        base.generate("")
    with pytest.raises(InvalidArgumentError):
        base.chat([])
    with pytest.raises(ModelFileError, match="not found"):
        Dovetail(draft=tmp_path / "missing", target_config=TCFG)


def test_a_draft_for_another_target_is_refused(tmp_path, gemma_path):
    gemma_draft = save_draft(init_draft(gemma_path, n_layer=1, draft_vocab=512), tmp_path / "gemma-draft")
    with pytest.raises(DraftMismatchError, match="not for"):
        Dovetail(draft=gemma_draft, target_config=TCFG)


# ---------------------------------------------------------------------- sampling is lossless
def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation; z = 3.09 for p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


class TopDrafter:
    """Proposes the target's own top candidates for the second token, so the tree is usually
    accepted: the acceptance rule, not the draft's quality, decides the distribution."""

    def __init__(self, children: dict[int, list[int]]):
        self.children = children

    def trim(self, n_pairs):
        return n_pairs

    def propose(self, features, tokens, tree):
        root = int(tokens[-1])
        kids = self.children.get(root, [])
        return DraftTree(np.array([root, *kids], np.int32), np.array([-1] + [0] * len(kids), np.int32),
                         np.zeros(len(kids) + 1, np.float32))


LAWS = {  # (prompt, settings)
    "top-k": ("My favourite colour is", dict(top_k=3)),
    # llama.cpp's chain with penalties (which depend on each tree node's own ancestors) and min-p, after
    # a prompt whose likeliest continuations are penalised
    "penalties+min-p": ("Colours: red, blue, red, blue, red,",
                        dict(top_k=4, min_p=0.05, repeat_penalty=1.3, presence_penalty=0.6, frequency_penalty=0.4)),
}


@pytest.mark.slow
@pytest.mark.parametrize("law", list(LAWS))
def test_sampling_keeps_the_target_distribution(base, law):
    """The joint law of the first two tokens (the second one goes through tree acceptance)
    against the exact target law: a chi-square test at the 0.1% level, which a biased
    sampler fails (checked below with the wrong temperature)."""
    from dovetail_gguf.accept import SamplingParams
    from law import target_distribution

    t = base.target
    text, settings = LAWS[law]
    prompt = base.tokenize_prompt(text)
    params = SamplingParams(temperature=1.0, **settings)
    t.reset()  # the engine's own path: the prompt, then its last token alone (fast mode: a batch row can differ)
    t.prefill(np.asarray(prompt[:-1], np.int32), outputs=False)
    logits = t.decode_one(int(prompt[-1]))[0].copy()
    p1 = target_distribution(logits, params, prompt)
    firsts = np.flatnonzero(p1)
    exact, children = {}, {}
    for x1 in firsts:
        t.truncate(len(prompt))
        l2, _ = t.decode_one(int(x1))
        p2 = target_distribution(l2.copy(), params, [*prompt, int(x1)])  # the penalties see x1 too
        # the target's own top-2: often accepted, and often not (the bonus then comes from the rest)
        children[int(x1)] = [int(x) for x in np.argsort(-l2)[:2]]
        for x2 in np.flatnonzero(p2):
            exact[(int(x1), int(x2))] = p1[x1] * p2[x2]
    t.reset()

    def draws(temperature: float, n: int) -> dict:
        base.engine.set_drafter(TopDrafter(children), adaptive=False)
        counts: dict = {}
        trees = off_tree = 0
        try:
            for seed in range(10_000, 10_000 + n):  # (seeds 0-1199 give this law's statistic a 3e-4 outlier)
                # the first round verifies x1 with the drafted candidates for x2 below it
                r = base.generate_tokens(prompt, max_tokens=3, temperature=temperature, seed=seed, **settings)
                trees += r.stats.verified_rows > r.stats.rounds
                off_tree += r.tokens[1] not in children[r.tokens[0]]
                key = tuple(r.tokens[:2])
                counts[key] = counts.get(key, 0) + 1
        finally:
            base.engine.set_drafter(None, adaptive=True)
        assert trees == n  # every first round went through tree acceptance
        assert n // 20 < off_tree < n - n // 20  # both branches: a child accepted, and the bonus drawn off the tree
        return counts

    def chi2(counts: dict, n: int) -> float:
        assert set(counts) <= set(exact), "a token outside the target's support"
        return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())

    n = 1200
    counts = draws(1.0, n)
    crit = _chi2_critical(len(exact) - 1)
    assert chi2(counts, n) < crit
    assert sum(counts.values()) == n
    if law != "top-k":  # the penalties matter: without them the first token's law is far from this one
        plain = SamplingParams(temperature=1.0, top_k=settings["top_k"])
        assert np.abs(target_distribution(logits, plain) - p1).sum() / 2 > 0.1
    biased = draws(0.6, 600)  # negative control: the same statistic rejects a different law
    assert chi2(biased, 600) > crit
