"""Requests side by side (``serve --parallel N``, ``Dovetail(parallel=N)``): a short request is not stuck
behind a long one, and every answer is the one the request gets alone, in any engine slot."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from dovetail_gguf import Dovetail
from dovetail_gguf.target import TargetConfig

from test_server import running_server

pytestmark = pytest.mark.slow

LONG = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}], "max_tokens": 256}
SHORT = {"prompt": "def fibonacci(n):", "max_tokens": 32}


def _long_and_short(base: str) -> tuple[str, str, float, float]:
    """The long chat answer streaming, the short completion sent once it is under way: (long text,
    short text, when the long one ended, when the short one ended)."""
    pieces, ended = [], {}

    def run_long():
        with httpx.stream("POST", base + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=600) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    d = json.loads(line[6:])
                    if d["choices"] and d["choices"][0]["delta"].get("content"):
                        pieces.append(d["choices"][0]["delta"]["content"])
        ended["long"] = time.perf_counter()

    thread = threading.Thread(target=run_long)
    thread.start()
    while len(pieces) < 10 and thread.is_alive():
        time.sleep(0.02)
    short = httpx.post(base + "/v1/completions", json=SHORT, timeout=600).json()["choices"][0]["text"]
    ended["short"] = time.perf_counter()
    thread.join()
    return "".join(pieces), short, ended["long"], ended["short"]


@pytest.mark.parametrize("parallel", [2, 1])
def test_a_short_request_is_served_beside_a_long_one(parallel):
    with running_server("--threads", "2", "--ctx-size", "1024", "--parallel", str(parallel)) as base:
        alone_short = httpx.post(base + "/v1/completions", json=SHORT, timeout=600).json()["choices"][0]["text"]
        alone_long = httpx.post(base + "/v1/chat/completions", json=LONG, timeout=600).json()["choices"][0]["message"]["content"]
        long_text, short_text, long_end, short_end = _long_and_short(base)
        assert long_text == alone_long and short_text == alone_short  # neither answer changes
        health = httpx.get(base + "/health").json()
        assert health["parallel"] == parallel and health["in_flight"] == 0
    if parallel > 1:
        assert short_end < long_end  # answered while the long one still streamed
    else:
        assert short_end > long_end  # one at a time: it waited


def test_every_slot_gives_the_same_answer(smollm2_path):
    with Dovetail(smollm2_path, target_config=TargetConfig(n_ctx=1024, n_threads=2), parallel=2) as dt:
        assert dt.slots[0].engine.drafter is not None and dt.slots[1].engine.drafter is None
        tokens = dt.chat_prompt_tokens([{"role": "user", "content": "Name three rivers."}])
        greedy = None
        for options in ({"max_tokens": 24}, {"max_tokens": 24, "temperature": 0.9, "seed": 7}):
            answers = ["".join(dt.stream_request(dt.prepare(tokens, **options), slot)) for slot in (0, 1)]
            assert answers[0] == answers[1], options
            greedy = greedy or answers[0]
        # a slot runs one generation: two on different slots at once, from two threads
        results = {}

        def run(slot):
            results[slot] = "".join(dt.stream_request(dt.prepare(tokens, max_tokens=24), slot))

        threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[0] == results[1] == greedy
