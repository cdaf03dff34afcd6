"""`dovetail serve` as a real process on a loopback port, driven by the official openai client."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://allowed.example"  # the module's server allows this origin and one more (--cors, repeated)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    with running_server("--api-key", KEY, "--ctx-size", "1024", "--threads", "2", "--cors", ORIGIN,
                        "--cors", "http://other.example") as base:
        yield base


@contextlib.contextmanager
def running_server(*args: str):
    """`dovetail serve ARGS` on a free loopback port; yields its base URL once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_gguf", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_openapi(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1"]
    schema = httpx.get(server + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_chat_completion(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Name a fruit."}],
                                       max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["dovetail"]
    assert extra["tau"] >= 1.0 and extra["tokens_per_second"] > 0


def test_streaming_equals_non_streaming(client):
    msgs = [{"role": "user", "content": "Count from one to five in words."}]
    full = client.chat.completions.create(model="x", messages=msgs, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="x", messages=msgs, max_tokens=30, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_and_stop(client):
    r = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0)
    assert " 7," in r.choices[0].text
    s = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7,"])
    assert s.choices[0].text == r.choices[0].text[: r.choices[0].text.index(" 7,")]
    assert s.choices[0].finish_reason == "stop"


def test_greedy_answer_equals_generate_no_draft(client):
    prompt = "The largest planet in the solar system is"
    cli = subprocess.run([sys.executable, "-m", "dovetail_gguf", "generate", prompt, "--no-draft", "--max-tokens", "24",
                          "--ctx-size", "1024", "--json"], capture_output=True, text=True, timeout=300)
    want = json.loads(cli.stdout)["text"]
    got = client.completions.create(model="x", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert got == want


LONG_ASK = ("Summarise these release notes in three bullet points.\n\n"
            + "".join(f"- Version 1.{i}: the parser now accepts nested lists of depth {i + 2}, the cache keeps "
                      f"{i * 16} entries, and the CLI prints a warning for option -{chr(97 + i)}.\n" for i in range(14)))


def test_the_same_request_gets_the_same_answer_between_others(client):
    """One greedy request past 256 cells, five times, between requests that change what the engine has
    learned (tree sizes, acceptance, costs, the cached prefix), and with a wrong prediction: one answer."""
    msgs = [{"role": "user", "content": LONG_ASK}]
    others = [[{"role": "user", "content": LONG_ASK[:400] + "\nList the versions."}],
              [{"role": "user", "content": "Count from one to twenty in words."}]]
    answers = []
    for i in range(5):
        r = client.chat.completions.create(model="x", messages=msgs, max_tokens=64, temperature=0)
        assert r.usage.prompt_tokens > 300
        answers.append(r.choices[0].message.content)
        client.chat.completions.create(model="x", messages=others[i % 2], max_tokens=32, temperature=0)
    wrong = client.chat.completions.create(model="x", messages=msgs, max_tokens=64, temperature=0,
                                           prediction={"type": "content", "content": LONG_ASK[::-1]})
    assert answers == [answers[0]] * 5 and wrong.choices[0].message.content == answers[0]


def test_eight_concurrent_clients(client):
    prompts = [f"Write the number {i} in words:" for i in range(8)]
    expected = {p: client.completions.create(model="x", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts}
    got, errors = {}, []

    def ask(p):
        try:
            got[p] = client.completions.create(model="x", prompt=p, max_tokens=8, temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected


def test_client_disconnect_frees_the_engine(server, client):
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first chunk
    t0 = time.time()
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi."}], max_tokens=5, temperature=0)
    assert r.choices[0].message.content
    assert time.time() - t0 < 20  # not stuck behind the abandoned 400-token answer


@pytest.mark.parametrize(
    "body, raw",
    [
        ("{not json", True),
        ({"model": "x"}, False),
        ({"messages": "hello"}, False),
        ({"messages": [{"role": "user", "content": 5}]}, False),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, False),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, False),
        ({"messages": [{"role": "user", "content": "word " * 2000}]}, False),
    ],
)
def test_bad_requests_get_openai_errors(server, body, raw):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs = {"content": body} if raw else {"json": body}
    r = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=60, **kwargs)
    assert r.status_code in (400, 422)
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(server + "/health").status_code == 200  # still alive


def test_a_field_the_server_cannot_honour_is_a_400_naming_it(server, client):
    msgs = [{"role": "user", "content": "Hi"}]
    for path, body in (("/v1/chat/completions", {"messages": msgs}), ("/v1/completions", {"prompt": "Hi"})):
        r = httpx.post(server + path, headers=AUTH, timeout=60, json={**body, "max_tokens": 4, "frobnicate": True})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "'frobnicate'" in err["message"] and err["type"] == "invalid_request_error", err
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.chat.completions.create(model="x", messages=msgs, max_tokens=4, extra_body={"frobnicate": 1})
    # fields that change nothing in the answer are accepted
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=4, temperature=0, user="someone",
                                       metadata={"k": "v"}, store=False, service_tier="auto", extra_body={"parallel_tool_calls": True})
    assert r.choices[0].message.content is not None
    # n > 1 and malformed values stay 400s naming the field
    for field, value in (("n", 2), ("temperature", "hot"), ("max_tokens", -5), ("stop", 7)):
        r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60, json={"messages": msgs, field: value})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), (field, r.text)


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_predicted_outputs_through_the_openai_client(client, server):
    """OpenAI's `prediction` field: the same answer with it, most of it accepted, counted in usage."""
    msgs = [{"role": "user", "content": "Repeat this line exactly: the cat sat on the mat and looked at the door."}]
    ref = client.chat.completions.create(model="x", messages=msgs, max_tokens=40, temperature=0)
    text = ref.choices[0].message.content
    got = client.chat.completions.create(model="x", messages=msgs, max_tokens=40, temperature=0,
                                         prediction={"type": "content", "content": text})
    assert got.choices[0].message.content == text
    details = got.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0.5 * got.usage.completion_tokens, got.usage
    assert ref.usage.completion_tokens_details.accepted_prediction_tokens == 0
    parts = client.chat.completions.create(model="x", messages=msgs, max_tokens=40, temperature=0,
                                           prediction={"type": "content", "content": [{"type": "text", "text": text}]})
    assert parts.choices[0].message.content == text
    bad = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"messages": msgs, "max_tokens": 4, "prediction": {"type": "audio", "content": "x"}})
    assert bad.status_code == 400 and "prediction" in bad.json()["error"]["message"]


def sse_events(server: str, body: dict) -> list:
    """The data of each server-sent event of a streamed chat completion, parsed, and "[DONE]" as is."""
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: ")]


def test_stream_usage_only_when_asked_for(server, client):
    body = {"messages": [{"role": "user", "content": "Count from one to five in words."}], "max_tokens": 20,
            "temperature": 0, "stream": True}
    plain = sse_events(server, body)
    assert plain[-1] == "[DONE]" and plain[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any("usage" in e or "dovetail" in e for e in plain[:-1])  # nobody asked for usage

    asked = sse_events(server, {**body, "stream_options": {"include_usage": True}})
    assert asked[-1] == "[DONE]"
    last, finish = asked[-2], asked[-3]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert finish["choices"][0]["finish_reason"] in ("stop", "length") and finish["usage"] is None
    assert all(e["usage"] is None for e in asked[:-2])  # as OpenAI: null on every other chunk
    full = client.chat.completions.create(model="x", messages=body["messages"], max_tokens=20, temperature=0)
    assert last["usage"]["completion_tokens"] == full.usage.completion_tokens
    assert last["usage"]["prompt_tokens"] == full.usage.prompt_tokens and last["dovetail"]["rounds"] > 0
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in asked[:-2])
    assert text == full.choices[0].message.content

    chunks = list(client.chat.completions.create(model="x", messages=body["messages"], max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = client.completions.create(model="x", prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True,
                                     stream_options={"include_usage": True})
    assert list(text)[-1].usage.completion_tokens == 6

    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={**body, "stream": False, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


def test_tokenize_and_detokenize(server):
    text = "Hello world, héllo 🌍 <|im_start|>"
    r = httpx.post(server + "/tokenize", headers=AUTH, json={"content": text})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert all(isinstance(t, int) for t in ids) and len(ids) > 5
    back = httpx.post(server + "/detokenize", headers=AUTH, json={"tokens": ids})
    assert back.status_code == 200 and back.json() == {"content": text}
    # as llama.cpp: control-token text becomes its control token, rendered back as its text
    assert httpx.post(server + "/tokenize", headers=AUTH, json={"content": "<|im_start|>"}).json()["tokens"] == [1]
    pieces = httpx.post(server + "/tokenize", headers=AUTH, json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text
    assert any(isinstance(p["piece"], list) for p in pieces)  # the emoji's bytes are split across tokens
    assert httpx.post(server + "/detokenize", headers=AUTH, json={"tokens": []}).json() == {"content": ""}
    for bad in ([-1], [10**9], [5, 49152]):
        r = httpx.post(server + "/detokenize", headers=AUTH, json={"tokens": bad})
        assert r.status_code == 400 and "token ids must be in 0..49151" in r.json()["error"]["message"], r.text
    for path, body in (("/detokenize", {"tokens": ["a"]}), ("/tokenize", {"content": 5}),
                       ("/tokenize", {"content": "x", "frobnicate": 1})):
        assert httpx.post(server + path, headers=AUTH, json=body).status_code == 400
    for path, body in (("/tokenize", {"content": "x"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(server + path, json=body).status_code == 401


def metric_values(server: str) -> dict[str, float]:
    r = httpx.get(server + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_in_prometheus_text(server, client):
    text = httpx.get(server + "/metrics", headers=AUTH).text
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "rounds_total",
                 "accepted_tokens_total", "queue_depth", "busy", "tokens_per_second"):
        kind = "gauge" if name in ("queue_depth", "busy", "tokens_per_second") else "counter"
        assert f"# TYPE dovetail_{name} {kind}" in text
    assert re.search(r'^dovetail_requests_total\{status="200"\} \d+$', text, re.M)
    before = metric_values(server)
    r = client.completions.create(model="x", prompt="The capital of France is", max_tokens=12, temperature=0)
    httpx.post(server + "/v1/completions", headers=AUTH, json={"prompt": "x", "n": 3})  # a 400
    after = metric_values(server)
    assert after["dovetail_prompt_tokens_total"] - before["dovetail_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["dovetail_completion_tokens_total"] - before["dovetail_completion_tokens_total"] == r.usage.completion_tokens
    rounds = after["dovetail_rounds_total"] - before["dovetail_rounds_total"]
    accepted = after["dovetail_accepted_tokens_total"] - before["dovetail_accepted_tokens_total"]
    assert rounds == r.model_extra["dovetail"]["rounds"] and accepted >= rounds
    assert after["dovetail_tokens_per_second"] > 0
    assert after['dovetail_requests_total{status="200"}'] >= before['dovetail_requests_total{status="200"}'] + 2
    assert after['dovetail_requests_total{status="400"}'] == before.get('dovetail_requests_total{status="400"}', 0) + 1
    assert after["dovetail_queue_depth"] == 0 and after["dovetail_busy"] == 0
    assert httpx.get(server + "/metrics").status_code == 401  # API-key protected, like /v1


def test_cors_only_for_the_origins_given(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(server + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(server + "/v1/models", headers={**AUTH, "Origin": "http://other.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://other.example"
    r = httpx.get(server + "/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with running_server("--no-draft", "--ctx-size", "256", "--threads", "1") as bare:  # no --cors: no CORS headers
        r = httpx.get(bare + "/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = httpx.options(bare + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers


def test_completion_logprobs_in_openais_shape(client):
    r = client.completions.create(model="x", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and logprob <= 0 and max(top.values()) == pytest.approx(logprob)  # greedy: the likeliest
    plain = client.completions.create(model="x", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == r.choices[0].text


@pytest.mark.parametrize("extra", [{"logit_bias": {"999999": 5}}, {"grammar": "root ::= missing-rule"},
                                   {"logit_bias": {"5": 150}}, {"min_p": 2}, {"top_logprobs": 2}])
def test_bad_sampling_and_structure_fields_are_a_400_before_any_stream(server, extra):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True, **extra}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
