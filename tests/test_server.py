"""`dovetail serve` as a real process on a loopback port, driven by the official openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_gguf", "serve", "--port", str(port), "--api-key", KEY,
                             "--ctx-size", "1024", "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    yield base
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


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, extra_body={"frobnicate": True, "logit_bias": {}})
    assert r.choices[0].message.content is not None


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
