"""The server under load and hostile input: one engine worker, a bounded FIFO queue, clean cancellation.

The app runs in-process (uvicorn on a loopback port, in a thread) over a real
SmolLM2 engine, so a fault can be injected into a real generation.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from dovetail_gguf import Dovetail
from dovetail_gguf.errors import DovetailError
from dovetail_gguf.server import create_app
from dovetail_gguf.target import TargetConfig
from dovetail_gguf.types import TreeConfig

KEY = "load-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def dt(smollm2_path):
    # speculation under load: the shipped draft with a fixed tree, so every round drafts and verifies
    d = Dovetail(smollm2_path, None, tree=TreeConfig(8, 4, 4), adaptive=False,
                 target_config=TargetConfig(n_ctx=1024, n_threads=2))
    assert d.drafter is not None
    yield d
    d.close()


@pytest.fixture(scope="module")
def live(dt):
    app = create_app(dt, "smol", api_key=KEY, max_queue=16)
    srv = LiveServer(app)
    srv.app = app
    yield srv
    srv.stop()


def completion(prompt: str, max_tokens: int = 4, stream: bool = False, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}


async def ask(client: httpx.AsyncClient, base: str, body: dict) -> tuple[int, str | None]:
    """(status, text) of one request; the text joined from the events when streaming."""
    if not body.get("stream"):
        r = await client.post(base + "/v1/completions", json=body, headers=HEADERS)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None
    async with client.stream("POST", base + "/v1/completions", json=body, headers=HEADERS) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        parts, done = [], False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                parts.append(event["choices"][0]["text"])
        assert done
        return 200, "".join(parts)


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", headers=HEADERS).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_two_hundred_concurrent_clients_get_answers_or_429(live):
    prompts = [f"Count from {i} to {i + 9}: {i}, {i + 1}," for i in range(10)]
    with httpx.Client(timeout=60) as c:
        expected = {p: c.post(live.base + "/v1/completions", json=completion(p, 16), headers=HEADERS).json()["choices"][0]["text"]
                    for p in prompts}
    rounds, accepted = metric(live.base, "dovetail_rounds_total"), metric(live.base, "dovetail_accepted_tokens_total")

    async def run():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            bodies = [completion(prompts[i % 10], 16, stream=i % 2 == 1) for i in range(200)]
            t0 = time.perf_counter()
            results = await asyncio.wait_for(asyncio.gather(*(ask(client, live.base, b) for b in bodies)), timeout=300)
            return bodies, results, time.perf_counter() - t0

    bodies, results, seconds = asyncio.run(run())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 16  # at least a full queue's worth got through
    for body, (status, text) in zip(bodies, results):
        if status == 200:
            assert text == expected[body["prompt"]]  # greedy: every answer is the prompt's own
    health = httpx.get(live.base + "/health").json()
    assert health["queue_depth"] == 0 and health["busy"] is False
    # the answers came from speculation: rounds emitted more than one token on average
    rounds, accepted = metric(live.base, "dovetail_rounds_total") - rounds, metric(
        live.base, "dovetail_accepted_tokens_total") - accepted
    assert rounds > 0 and accepted > 1.2 * rounds, (rounds, accepted)


def test_429_carries_retry_after_and_openai_shape(live, dt, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr(dt.target, "on_decode", lambda rows, seconds: gate.wait(30))  # the engine stays busy

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(client.post(live.base + "/v1/completions", json=completion("Hi", 2),
                                                     headers=HEADERS)) for _ in range(20)]
            await asyncio.sleep(1.5)  # one on the engine, 16 queued, 3 refused
            gate.set()
            return await asyncio.gather(*tasks)

    rs = asyncio.run(run())
    refused = [r for r in rs if r.status_code == 429]
    assert len(refused) == 3 and all(r.headers.get("retry-after") for r in refused)
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert sum(r.status_code == 200 for r in rs) == 17


def test_fifo_order_and_a_cancelled_queued_request_frees_its_place(live, dt, monkeypatch):
    gate = threading.Event()
    order: list[int] = []
    monkeypatch.setattr(dt.target, "on_decode", lambda rows, seconds: gate.wait(30))  # the engine stays busy

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i):
                r = await client.post(live.base + "/v1/completions", json=completion(f"Item {i}:", 2), headers=HEADERS)
                order.append(i)
                return r.status_code

            tasks = []
            for i in range(5):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.2)  # a known arrival order
            doomed = asyncio.create_task(client.post(live.base + "/v1/completions", json=completion("Gone", 2),
                                                     headers=HEADERS))
            await asyncio.sleep(0.5)
            before = (await client.get(live.base + "/health")).json()["queue_depth"]
            doomed.cancel()  # the client goes away while queued
            await asyncio.sleep(1.5)
            after = (await client.get(live.base + "/health")).json()["queue_depth"]
            gate.set()
            return await asyncio.gather(*tasks), before, after

    statuses, before, after = asyncio.run(run())
    assert statuses == [200] * 5 and order == list(range(5))
    assert before == 5 and after == 4  # 4 queued behind the first; the cancelled one left the queue


def test_an_error_mid_stream_is_a_final_event_and_the_next_request_works(live, dt, monkeypatch):
    real_round = dt.engine._round
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise DovetailError("injected fault in round 3")
        return real_round(*a, **k)

    monkeypatch.setattr(dt.engine, "_round", failing)
    with httpx.stream("POST", live.base + "/v1/completions", json=completion("One, two,", 10, stream=True),
                      headers=HEADERS, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    last = json.loads(lines[-1][6:])
    assert last["error"]["message"] == "injected fault in round 3" and "data: [DONE]" not in lines
    monkeypatch.setattr(dt.engine, "_round", real_round)
    ok = httpx.post(live.base + "/v1/completions", json=completion("One, two,", 4), headers=HEADERS, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def post_json(url: str, body: dict) -> httpx.Response:
    """POST ``body`` as JSON with \\u escapes, so lone surrogates travel as a client would send them."""
    return httpx.post(url, content=json.dumps(body).encode(), headers={**HEADERS, "Content-Type": "application/json"},
                      timeout=120)


@pytest.mark.parametrize("body, status", [
    ({"prompt": "Hi", "seed": -1, "temperature": 1, "max_tokens": 3}, 200),
    ({"prompt": "Hi", "seed": 2**70, "temperature": 1, "max_tokens": 3}, 200),
    ({"prompt": [1, 2, 3], "max_tokens": 3}, 200),
    ({"prompt": ["Hi"], "max_tokens": 3}, 200),
    ({"prompt": "Hi", "max_tokens": 10**9}, 200),  # capped at the context
    ({"prompt": ["Hi", "Ho"], "max_tokens": 3}, 400),
    ({"prompt": [10**9], "max_tokens": 3}, 400),
    ({"prompt": "Hi", "n": 2}, 400),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"prompt": "Hi", "stop": ["x" * 1000]}, 400),
    ({"prompt": "\ud800"}, 400),
])
def test_hostile_completion_bodies(live, body, status):
    r = post_json(live.base + "/v1/completions", {"temperature": 0, **body})
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["message"]


@pytest.mark.parametrize("content, status", [
    ([{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}], 200),
    ("bad \ud800 text", 400),
    ([{"type": "image_url", "image_url": {"url": "x"}}], 400),
])
def test_chat_content_forms(live, content, status):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0}
    r = post_json(live.base + "/v1/chat/completions", body)
    assert r.status_code == status, r.text


def test_negative_seed_streams_to_done(live):
    body = {"prompt": "Hi", "seed": -7, "stream": True, "max_tokens": 3, "temperature": 1}
    with httpx.stream("POST", live.base + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


def test_oversized_bodies_are_refused(live):
    r = httpx.post(live.base + "/v1/completions", content=b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}',
                   headers={**HEADERS, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_an_abandoned_non_streaming_request_frees_the_engine(live):
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            long = asyncio.create_task(client.post(live.base + "/v1/completions", json=completion("Once upon a time", 500),
                                                   headers=HEADERS))
            await asyncio.sleep(1.0)
            long.cancel()
            await asyncio.sleep(1.5)  # the server notices within its poll interval
            t0 = time.perf_counter()
            r = await client.post(live.base + "/v1/completions", json=completion("Hi", 2), headers=HEADERS)
            return r.status_code, time.perf_counter() - t0

    status, seconds = asyncio.run(run())
    assert status == 200 and seconds < 5  # not behind the 500-token answer nobody waits for
