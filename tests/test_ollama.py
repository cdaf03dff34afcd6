"""Ollama's API and embeddings, with the real clients: the ``ollama`` package and the openai client against
``dovetail serve`` (the default pair), and a retrieval check on Qwen2.5-Coder's embeddings."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from dovetail_gguf.errors import InvalidArgumentError
from dovetail_gguf.options import LIMITS

from test_server import running_server

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server():
    with running_server("--threads", "2", "--ctx-size", "1024") as base:  # the default pair: SmolLM2 + its draft
        yield base


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, timeout=300)


def test_chat_whole_and_streamed_is_the_answer_openai_gets(server, client):
    r = client.chat(model="any", messages=MESSAGES, options={"num_predict": 24, "temperature": 0})
    assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant" and r.message.content
    # the final chunk's counts, durations in nanoseconds
    assert 0 < r.eval_count <= 24 and r.prompt_eval_count > 5
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0
    parts = list(client.chat(model="any", messages=MESSAGES, options={"num_predict": 24}, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == r.eval_count
    assert "".join(p.message.content for p in parts) == r.message.content
    # one engine, one options type: OpenAI's surface answers the same greedy request alike
    oc = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    same = oc.chat.completions.create(model="any", messages=MESSAGES, max_tokens=24, temperature=0)
    assert same.choices[0].message.content == r.message.content
    assert same.usage.completion_tokens == r.eval_count and same.usage.prompt_tokens == r.prompt_eval_count


def test_generate_templated_raw_and_streamed(client):
    g = client.generate(model="any", prompt="Name three colours.", options={"num_predict": 16})
    chat = client.chat(model="any", messages=MESSAGES, options={"num_predict": 16})
    assert g.response == chat.message.content and g.done  # the prompt goes through the chat template
    parts = list(client.generate(model="any", prompt="Name three colours.", options={"num_predict": 16}, stream=True))
    assert "".join(p.response for p in parts) == g.response and parts[-1].done
    raw = client.generate(model="any", prompt="The capital of France is", raw=True, options={"num_predict": 8})
    assert raw.prompt_eval_count < g.prompt_eval_count and raw.response
    loaded = client.generate(model="any", prompt="")  # how Ollama clients load a model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_format_json_and_schema(client):
    r = client.chat(model="any", messages=[{"role": "user", "content": "Describe a cat as JSON."}], format="json",
                    options={"num_predict": 64})
    if r.done_reason == "stop":
        json.loads(r.message.content)
    assert r.message.content.lstrip().startswith(("{", "["))
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat(model="any", messages=[{"role": "user", "content": "A person, as JSON."}], format=schema,
                    options={"num_predict": 64})
    assert r.done_reason == "stop"
    doc = json.loads(r.message.content)
    assert isinstance(doc["name"], str) and isinstance(doc["age"], int)


def test_list_show_ps_version(server, client, smollm2_path):
    models = client.list().models
    assert len(models) == 1 and models[0].size == smollm2_path.stat().st_size
    assert models[0].details.format == "gguf" and models[0].details.family == "llama"
    shown = client.show(models[0].model)
    assert {"completion", "embedding"} <= set(shown.capabilities) and "insert" not in shown.capabilities
    assert "<|im_start|>" in shown.template and shown.modelinfo["llama.embedding_length"] == 576
    running = client.ps().models
    assert running[0].model == models[0].model and running[0].context_length == 1024
    assert httpx.get(server + "/api/version").json()["version"]
    assert httpx.get(server + "/").text == "Ollama is running"


def test_what_cannot_be_honoured_is_named_in_ollamas_error_shape(server, client):
    for options, word in (({"mirostat": 2}, "mirostat"), ({"typical_p": 0.5}, "typical_p"), ({"num_ctx": 99999}, "num_ctx"),
                          ({"flux": 1}, "flux")):
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="any", messages=MESSAGES, options=options)
        assert e.value.status_code == 400 and word in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # a value out of range: the options table's rule
        client.chat(model="any", messages=MESSAGES, options={"temperature": 3})
    assert LIMITS["temperature"].rule("temperature") in e.value.error
    r = httpx.post(server + "/api/chat", json={"model": "any", "messages": MESSAGES, "stream": False, "foo": 1})
    assert r.status_code == 400 and set(r.json()) == {"error"} and "foo" in r.json()["error"]
    r = httpx.post(server + "/api/generate", json={"model": "any", "prompt": "hi", "images": ["aGk="], "stream": False})
    assert r.status_code == 400 and "images" in r.json()["error"]
    # runtime options and keep_alive change nothing, and are accepted
    ok = client.chat(model="any", messages=MESSAGES, keep_alive="5m", options={"num_predict": 2, "num_thread": 8})
    assert ok.eval_count == 2


def test_embeddings_through_both_clients_agree(server, client):
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    e = client.embed(model="any", input=texts)
    vectors = np.array(e.embeddings)
    assert vectors.shape == (2, 576) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert e.prompt_eval_count > 10
    one = client.embed(model="any", input=texts[1]).embeddings[0]
    assert np.allclose(one, vectors[1], atol=1e-5)  # alone or in a batch: the same vector
    assert np.allclose(client.embeddings(model="any", prompt=texts[0]).embedding, vectors[0], atol=1e-5)
    oc = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    r = oc.embeddings.create(model="any", input=texts)  # the client asks for base64 and decodes it
    assert np.allclose([d.embedding for d in r.data], vectors, atol=1e-6)
    assert r.usage.prompt_tokens == e.prompt_eval_count
    r = oc.embeddings.create(model="any", input=texts[0], encoding_format="float")
    assert np.allclose(r.data[0].embedding, vectors[0], atol=1e-6)
    bad = httpx.post(server + "/v1/embeddings", json={"input": [1, 2, 3]})
    assert bad.status_code == 400 and "error" in bad.json()


# A small retrieval set: each query is answered by the passage at its index.
PASSAGES = [
    "To reset your password, open Settings, choose Account, and click 'Forgot password'. A reset link is emailed to you.",
    "Our office is open Monday to Friday from 9 am to 5 pm, and closed on public holidays.",
    "Shipping within the country takes three to five business days; express delivery arrives the next day.",
    "Refunds are issued to the original payment method within ten days after we receive the returned item.",
    "The Python function sorted() returns a new sorted list; list.sort() sorts the list in place.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into glucose and oxygen.",
    "The Eiffel Tower in Paris was completed in 1889 and is about 330 metres tall.",
    "A healthy adult should drink roughly two litres of water a day, more in hot weather.",
]
QUERIES = [
    "How do I change my password if I forgot it?",
    "What are your opening hours?",
    "How long does delivery take?",
    "When will I get my money back after returning something?",
    "How do I sort a list in Python?",
    "How do plants make food from light?",
    "How tall is the Eiffel Tower?",
    "How much water should I drink every day?",
]


def test_a_querys_nearest_passage_answers_it(qwen_path):
    from dovetail_gguf import Dovetail

    with Dovetail(qwen_path, False) as dt:
        passages, queries = dt.embed(PASSAGES), dt.embed(QUERIES)
        nearest = (queries.vectors @ passages.vectors.T).argmax(axis=1)
        assert nearest.tolist() == list(range(len(QUERIES)))
        long_text = "word " * (dt.embedder().n_ctx + 10)
        with pytest.raises(InvalidArgumentError, match="more than the embedding context"):
            dt.embed(long_text)
        assert dt.embed(long_text, truncate=True).n_tokens == [dt.embedder().n_ctx]
        with pytest.raises(InvalidArgumentError):
            dt.embed([])


def test_a_separate_embedding_model(smollm2_path):
    """--embedding-model: its own GGUF, listed beside the target; generation still works."""
    with running_server("--no-draft", "--threads", "2", "--ctx-size", "512", "--embedding-model", "qwen2.5-coder-0.5b") as base:
        c = ollama.Client(host=base, timeout=300)
        names = [m.model for m in c.list().models]
        assert len(names) == 2 and names[0] == smollm2_path.stem
        assert len(c.embed(model=names[1], input="hello").embeddings[0]) == 896
        assert c.show(names[1]).capabilities == ["embedding"]
        assert c.generate(model=names[0], prompt="Hi", options={"num_predict": 3}).eval_count == 3


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}


def test_tool_calls_through_ollamas_client(qwen_path):
    """Ollama has no tool_choice: the model decides. Qwen2.5-Coder-0.5B answers with a bare JSON call
    (no <tool_call> tags); it comes back as Ollama's tool_calls, arguments as an object, whole or streamed."""
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    with running_server("--target", str(qwen_path), "--no-draft", "--threads", "2", "--ctx-size", "1024") as base:
        c = ollama.Client(host=base, timeout=300)
        r = c.chat(model="any", messages=ask, tools=[WEATHER], options={"num_predict": 64})
        assert r.message.content == "" and [t.function.name for t in r.message.tool_calls] == ["get_weather"]
        assert r.message.tool_calls[0].function.arguments["city"] == "Paris"
        parts = list(c.chat(model="any", messages=ask, tools=[WEATHER], options={"num_predict": 64}, stream=True))
        assert parts[-1].done and parts[-1].message.tool_calls == r.message.tool_calls
        # the call and its result go back as the conversation: the template renders both
        follow = ask + [r.message, {"role": "tool", "content": '{"temperature": 21}', "tool_name": "get_weather"}]
        assert "21" in c.chat(model="any", messages=follow, tools=[WEATHER], options={"num_predict": 40}).message.content


def test_a_bare_json_answer_is_a_call_only_of_a_given_function():
    from dovetail_gguf.structured import parse_tool_calls

    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert [(c.name, c.arguments) for c in parse_tool_calls(call, ["get_weather"])[1]] == [("get_weather", '{"city": "Oslo"}')]
    assert parse_tool_calls(call) == (call, [])  # no functions given: text
    assert parse_tool_calls(call, ["other"]) == (call, [])
    extra = '{"name": "get_weather", "arguments": {}, "note": 1}'
    assert parse_tool_calls(extra, ["get_weather"]) == (extra, [])


def test_embedding_leaves_the_generation_cache_alone(smollm2_path):
    from dovetail_gguf import Dovetail

    with Dovetail(smollm2_path, False) as dt:
        first = dt.generate("The three primary colours are", max_tokens=8)
        dt.embed(["a text of its own, " * 20, "another"])  # its own context: the target's cells stay
        again = dt.generate("The three primary colours are", max_tokens=8)
        assert again.text == first.text
        assert again.stats.n_cached_tokens == again.stats.n_prompt_tokens - 1  # all but the last token reused
