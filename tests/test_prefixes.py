"""Conversations kept warm: prompt prefixes saved from the KV cache and put back (prefixes.py), with
the same answers as a cold cache, past 512 and 1,024 cells, with and without the draft."""

from __future__ import annotations

import inspect
import json.decoder
import textwrap

import httpx
import numpy as np
import pytest

from dovetail_gguf import Dovetail
from dovetail_gguf.prefixes import CachedPrefix, PrefixStore
from dovetail_gguf.target import SavedPrefix, TargetConfig

from test_server import running_server

pytestmark = pytest.mark.slow

# two conversations of about 780 and 1,120 tokens (SmolLM2's tokenizer): Python stdlib source
SOURCE_A = textwrap.dedent(inspect.getsource(json.decoder))[:2500]
SOURCE_B = textwrap.dedent(inspect.getsource(textwrap))[:4000]
A = [{"role": "user", "content": "Summarise this code:\n" + SOURCE_A}]
B = [{"role": "user", "content": "What does this module do?\n" + SOURCE_B}]


def _config():
    return TargetConfig(n_ctx=2048, n_threads=2)


@pytest.fixture(scope="module")
def cold_answers(smollm2_path):
    """Each conversation answered from an empty cache (no prefixes kept)."""
    out = {}
    with Dovetail(smollm2_path, False, target_config=_config(), cache_slots=0) as dt:
        for name, messages in (("A", A), ("B", B)):
            dt.target.reset()
            out[name] = dt.chat(messages, max_tokens=24)
        follow = A + [{"role": "assistant", "content": out["A"].text}, {"role": "user", "content": "Shorter, please."}]
        dt.target.reset()
        out["A2"] = dt.chat(follow, max_tokens=16)
        out["A2_messages"] = follow
    assert out["A"].stats.n_prompt_tokens > 512 and out["B"].stats.n_prompt_tokens > 1024
    return out


@pytest.mark.parametrize("draft", [False, None], ids=["no-draft", "draft"])
def test_a_returning_conversation_starts_from_its_cache_and_answers_as_cold(smollm2_path, cold_answers, draft):
    with Dovetail(smollm2_path, draft, target_config=_config()) as dt:
        for name, messages in (("A", A), ("B", B), ("A", A), ("B", B)):
            r = dt.chat(messages, max_tokens=24)
            assert r.text == cold_answers[name].text, name
        # the second time round, each prompt came back whole from the prefixes kept warm
        assert r.stats.n_cached_tokens == r.stats.n_prompt_tokens - 1
        assert dt.prefixes.state()["hits"] == 2
        # a conversation that goes on after another one: its history is not evaluated again
        r = dt.chat(cold_answers["A2_messages"], max_tokens=16)
        assert r.text == cold_answers["A2"].text
        assert r.stats.n_cached_tokens >= cold_answers["A"].stats.n_prompt_tokens - 64
        # a cold engine evaluates it all again
    with Dovetail(smollm2_path, draft, target_config=_config(), cache_slots=0) as dt:
        dt.chat(A, max_tokens=4)
        dt.chat(B, max_tokens=4)
        assert dt.chat(A, max_tokens=4).stats.n_cached_tokens < 64 and dt.prefixes is None


def _entry(tokens, nbytes=1000) -> CachedPrefix:
    t = np.asarray(tokens, np.int32)
    return CachedPrefix(SavedPrefix(t, np.zeros(t.size, np.uint8), np.zeros(nbytes, np.uint8)), None, 0)


def test_the_store_keeps_the_most_recent_within_its_bounds():
    store = PrefixStore(slots=2, max_bytes=10_000)
    a, b, c = _entry([1, 2, 3]), _entry([4, 5, 6]), _entry([7, 8, 9])
    for e in (a, b, c):
        store.put(e)
    assert store.state()["entries"] == 2 and store.best(np.array([1, 2, 3]))[1] == 0  # a went first
    entry, shared = store.best(np.array([4, 5, 9, 9]))
    assert entry is b and shared == 2
    store.take(b)
    assert store.state()["entries"] == 1 and store.state()["hits"] == 1
    store.put(_entry([7, 8, 9, 10]))  # extends c: c holds nothing more
    assert store.state()["entries"] == 1 and store.state()["tokens"] == 4
    store.put(_entry([1], nbytes=20_000))  # larger than the whole store: not kept
    assert store.state()["entries"] == 1
    small = PrefixStore(slots=8, max_bytes=2_500)
    for i in range(4):
        small.put(_entry([i, i]))
    assert small.state()["entries"] == 2 and small.state()["bytes"] <= 2_500


def test_the_server_reports_its_prefix_cache(smollm2_path):
    with running_server("--no-draft", "--threads", "2", "--ctx-size", "2048", "--cache-slots", "2", "--cache-ram", "64") as base:
        for messages in (A, B):
            r = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=300)
            assert r.status_code == 200
        health = httpx.get(base + "/health").json()
        assert health["prefix_cache"]["entries"] == 1 and health["prefix_cache"]["slots"] == 2
        assert health["prefix_cache"]["max_bytes"] == 64 * 2**20 and health["live_prefix_tokens"] > 1024
        metrics = httpx.get(base + "/metrics").text
        assert "dovetail_cached_prefixes 1" in metrics and "dovetail_cached_prefix_hits_total 0" in metrics
