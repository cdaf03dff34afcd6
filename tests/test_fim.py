"""Fill-in-the-middle: the model's FIM layout, /infill as llama.vim and llama.vscode send it, and
``suffix`` on OpenAI's completions, with Qwen2.5-Coder (which has FIM tokens) on a real server."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from dovetail_gguf.errors import InvalidArgumentError
from dovetail_gguf.server.llamacpp import InfillStops

from test_server import running_server

openai = pytest.importorskip("openai")

PREFIX = "import math\n\n\ndef circle_area(r):\n    "
SUFFIX = "\n\n\ndef circle_perimeter(r):\n    return 2 * math.pi * r\n"
EXTRA = [{"filename": "shapes.py", "text": "def square_area(a):\n    return a * a\n"}]
# the body llama.vim sends (autoload/llama.vim, llama#fim), with a completion budget for this test
VIM_BODY = {
    "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": "",
    "n_predict": 24, "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 3000,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n",
                        "timings/predicted_ms", "truncated", "tokens_cached"],
}


@pytest.fixture(scope="module")
def server(qwen_path):
    with running_server("--target", str(qwen_path), "--no-draft", "--ctx-size", "1024", "--threads", "2") as base:
        yield base


def test_infill_as_llama_vim_sends_it(server):
    r = httpx.post(server + "/infill", json=VIM_BODY, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n", "timings/predicted_ms",
                         "truncated", "tokens_cached"}
    assert "return" in body["content"] and "math.pi" in body["content"], body
    assert 0 < body["timings/predicted_n"] <= 24 and body["truncated"] is False
    # the same request again: its whole prompt comes from the cache
    again = httpx.post(server + "/infill", json=VIM_BODY, timeout=300).json()
    assert again["content"] == body["content"] and again["timings/prompt_n"] <= 1


def test_infill_is_the_middle_openai_suffix_gives(server):
    """Without extra chunks, /infill and OpenAI's completions with suffix build the same prompt: the
    same greedy middle, whole or streamed."""
    plain = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 16}
    whole = httpx.post(server + "/infill", json=plain, timeout=300).json()
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.completions.create(model="local", prompt=PREFIX, suffix=SUFFIX, max_tokens=16, temperature=0)
    assert r.choices[0].text == whole["content"] and whole["tokens_predicted"] == r.usage.completion_tokens
    with httpx.stream("POST", server + "/infill", json={**plain, "stream": True}, timeout=300) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events[:-1]) == whole["content"] == events[-1]["content"]


def test_a_warm_up_request_returns_at_once_and_the_next_reuses_it(server):
    new_chunk = {"filename": "units.py", "text": "".join(f"UNIT_{i} = {i} * 1.5\n" for i in range(64))}
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [new_chunk], "n_predict": 0}
    t0 = time.perf_counter()
    warm = httpx.post(server + "/infill", json=body, timeout=300).json()
    assert warm["content"] == "" and warm["tokens_predicted"] == 0 and warm["stop_type"] == "none"
    # it reports what it evaluated, as llama.cpp's does: the new chunk at least (the rest may be cached)
    assert 64 < warm["timings"]["prompt_n"] <= warm["tokens_evaluated"] and warm["timings"]["prompt_ms"] > 0
    later = httpx.post(server + "/infill", json={**body, "n_predict": 8}, timeout=300).json()
    assert later["timings"]["prompt_n"] <= 1 < later["tokens_evaluated"]  # the warmed prompt came from the cache
    assert time.perf_counter() - t0 < 120


def test_infill_refuses_what_it_cannot_honour(server):
    for extra, word in (({"samplers": ["dry"]}, "dry"), ({"frobnicate": 1}, "frobnicate"), ({"temperature": 5}, "temperature")):
        r = httpx.post(server + "/infill", json={"input_prefix": "x", **extra}, timeout=60)
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


def test_infill_stop_rules():
    s = InfillStops(n_indent=4, t_max_predict_ms=None)
    out = [s.feed(p) for p in ("return x\n", "    y = 1\n", "z = 2\n", "    w")]
    assert out[:2] == [("return x\n", False), ("    y = 1\n", False)]
    assert out[2] == ("", True) and s.text == "return x\n    y = 1\n"  # the under-indented line is cut
    first = InfillStops(n_indent=4, t_max_predict_ms=None)
    assert first.feed("x = 1\n  ") == ("x = 1\n  ", False)  # the first line is exempt; blank indent waits
    late = InfillStops(n_indent=0, t_max_predict_ms=1)
    time.sleep(0.01)
    assert late.feed("a = 1") == ("a = 1", False)  # no line ended yet
    assert late.feed("\nb") == ("\n", True) and late.text == "a = 1\n"


def test_a_model_without_fim_tokens_gets_one_clear_error(smollm2_path, tmp_path):
    import subprocess
    import sys

    from dovetail_gguf import Dovetail
    from dovetail_gguf.target import TargetConfig

    with Dovetail(smollm2_path, draft=False, target_config=TargetConfig(n_ctx=256, n_threads=2)) as dt:
        with pytest.raises(InvalidArgumentError, match="no fill-in-the-middle tokens"):
            dt.generate("def f():", suffix="\n")
    suffix = tmp_path / "suffix.py"
    suffix.write_text("\n")
    r = subprocess.run([sys.executable, "-m", "dovetail_gguf", "generate", "def f():", "--no-draft", "--suffix",
                        str(suffix)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no fill-in-the-middle tokens" in r.stderr


def test_the_api_and_cli_fill_in_the_middle(qwen_path, tmp_path):
    import subprocess
    import sys

    from dovetail_gguf import Dovetail
    from dovetail_gguf.target import TargetConfig

    with Dovetail(qwen_path, draft=False, target_config=TargetConfig(n_ctx=1024, n_threads=2)) as dt:
        r = dt.generate(PREFIX, suffix=SUFFIX, max_tokens=16)
        with_extra = dt.infill_tokens(PREFIX, SUFFIX, EXTRA, max_tokens=16)
        assert len(with_extra) > len(dt.infill_tokens(PREFIX, SUFFIX, max_tokens=16))
    suffix = tmp_path / "suffix.py"
    suffix.write_text(SUFFIX)
    cli = subprocess.run([sys.executable, "-m", "dovetail_gguf", "generate", PREFIX, "--target", str(qwen_path),
                          "--no-draft", "--suffix", str(suffix), "-n", "16", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["text"] == r.text and "math.pi" in r.text


def test_a_predicted_middle_is_verified_and_changes_nothing(server):
    """An editor re-completing after a small edit sends its previous middle as the prediction: the
    answer is the same, and the prediction's tokens were taken where they matched."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 24}
    first = httpx.post(server + "/infill", json=body, timeout=300).json()
    again = httpx.post(server + "/infill", json={**body, "prediction": first["content"]}, timeout=300).json()
    assert again["content"] == first["content"]
    assert again["accepted_prediction_tokens"] >= again["tokens_predicted"] // 2 > 0  # 20 of 24 here


def test_llama_vscode_bodies(server):
    """llama.vscode's warm-up (n_predict 0, empty samplers, t_max_predict_ms 1) and completion bodies
    (src/llama-server.ts, createRequestPayload); a body asking for several completions is a 400 naming it."""
    extra = [{"text": "def square_area(a):\n    return a * a\n", "time": 1733600000, "filename": "shapes.py"}]
    base = {"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra, "prompt": ""}
    warm = {**base, "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    assert httpx.post(server + "/infill", json=warm, timeout=300).status_code == 200
    body = {**base, "n_predict": 16, "n_cmpl": 1, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 2500}
    r = httpx.post(server + "/infill", json=body, timeout=300)
    assert r.status_code == 200 and r.json()["timings"]["prompt_n"] <= 1, r.text  # the warm-up filled the cache
    bad = httpx.post(server + "/infill", json={**body, "n_cmpl": 3}, timeout=60)
    assert bad.status_code == 400 and "n_cmpl" in bad.json()["error"]["message"]
