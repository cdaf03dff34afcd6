"""One options type, one limits table: each bound is enforced as the table states it, with the same
words from the Python API, the CLI and every server surface (each in its own error shape)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import httpx
import pytest

from dovetail_gguf.errors import InvalidArgumentError
from dovetail_gguf.options import LIMITS, GenerateOptions, check
from dovetail_gguf.types import TreeConfig

from test_server import running_server

NUMERIC = [f.name for f in dataclasses.fields(GenerateOptions) if f.name in LIMITS and f.name not in ("seed", "stop", "logit_bias")]


def outside(name: str) -> list:
    """Values just past each end of ``LIMITS[name]``."""
    lim = LIMITS[name]
    step = 1 if lim.kind is int else 0.5
    out = []
    if lim.lo is not None:
        out.append(lim.lo if lim.lo_open else lim.lo - step)
    if lim.hi is not None:
        out.append(lim.hi + step)
    return out


@pytest.mark.parametrize("name", NUMERIC)
def test_every_bound_in_the_table_is_enforced_where_options_are_built(name):
    lim = LIMITS[name]
    for bad in outside(name):
        with pytest.raises(InvalidArgumentError, match=rf"^{_re(lim.rule(name))}, got "):
            GenerateOptions(**{name: bad})
    for good in (lim.lo if lim.lo is not None and not lim.lo_open else None, lim.hi):
        if good is not None:
            assert getattr(GenerateOptions(**{name: good}), name) == good


def test_the_defaults_are_the_tables():
    opts = GenerateOptions()
    for name in NUMERIC:
        assert getattr(opts, name) == LIMITS[name].default, name
    tree = TreeConfig()
    assert (tree.tokens, tree.depth, tree.topk) == tuple(LIMITS[k].default for k in ("tree_tokens", "tree_depth", "tree_topk"))


def test_tree_settings_are_checked_against_the_table():
    for field, name in (("tokens", "tree_tokens"), ("depth", "tree_depth"), ("topk", "tree_topk")):
        for bad in outside(name):
            with pytest.raises(InvalidArgumentError, match=_re(LIMITS[name].rule(name))):
                TreeConfig(**{field: bad}).validate()


def test_values_are_normalised_once():
    opts = GenerateOptions(stop="END", seed=-1, logit_bias={"42": 5}, prediction=[1, 2, 3])
    assert opts.stop == ("END",) and opts.seed is None and opts.logit_bias == {42: 5.0} and opts.prediction == (1, 2, 3)
    with pytest.raises(InvalidArgumentError, match="not several"):
        GenerateOptions(grammar='root ::= "a"', json_schema={"type": "object"})
    for bad in (True, "3", None):
        with pytest.raises(InvalidArgumentError, match="temperature"):
            GenerateOptions(temperature=bad)
    assert check("max_tokens", 3.0) == 3 and isinstance(check("temperature", 1), float)


# ---------------------------------------------------------------------- the same rule on every surface
# (option, bad value, the rule's words from the table). Each surface spells the field its own way.
CASES = [
    ("temperature", 3.0, LIMITS["temperature"].rule("temperature")),
    ("top_p", 0.0, LIMITS["top_p"].rule("top_p")),
    ("max_tokens", 0, LIMITS["max_tokens"].rule("max_tokens")),
    ("logit_bias", 200.0, LIMITS["logit_bias"].rule("logit_bias")),
    ("stop", 5, f"at most {LIMITS['stop'].hi} stop strings"),
]


def _re(text: str) -> str:
    import re

    return re.escape(text)


def _api_kwargs(name, bad):
    if name == "logit_bias":
        return {"logit_bias": {7: bad}}
    if name == "stop":
        return {"stop": [f"s{i}" for i in range(bad)]}
    return {name: bad}


def _cli_args(name, bad):
    if name == "logit_bias":
        return ["--logit-bias", f"7={bad}"]
    if name == "stop":
        return [a for i in range(bad) for a in ("--stop", f"s{i}")]
    return ["--" + name.replace("_", "-"), str(bad)]


@pytest.fixture(scope="module")
def dt(smollm2_path):
    from dovetail_gguf import Dovetail

    with Dovetail(smollm2_path, draft=False) as d:
        yield d


@pytest.fixture(scope="module")
def server():
    with running_server("--no-draft", "--ctx-size", "512", "--threads", "2") as base:
        yield base


@pytest.mark.parametrize("name, bad, rule", CASES, ids=[c[0] for c in CASES])
def test_one_rule_from_the_api_the_cli_and_each_server_surface(name, bad, rule, dt, server):
    # the Python API: the exception, before anything runs
    with pytest.raises(InvalidArgumentError, match=_re(rule)):
        dt.generate("Hi", **_api_kwargs(name, bad))
    # the CLI: one line on stderr, exit status 2
    r = subprocess.run([sys.executable, "-m", "dovetail_gguf", "generate", "Hi", "--no-draft", *_cli_args(name, bad)],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and rule in lines[0], r.stderr
    # OpenAI's surface, chat and completions: a 400 in OpenAI's error shape
    body = _api_kwargs(name, bad)
    if name == "logit_bias":
        body = {"logit_bias": {"7": bad}}
    for path, request in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                          ("/v1/completions", {"prompt": "Hi"})):
        resp = httpx.post(server + path, json={**request, **body}, timeout=120)
        assert resp.status_code == 400, (path, resp.text)
        err = resp.json()["error"]
        assert rule in err["message"] and err["type"] == "invalid_request_error", (path, err)


def test_token_ids_are_checked_against_the_vocabulary_once_prepared(dt):
    n = dt.target.n_vocab
    for kwargs, what in ((dict(logit_bias={n: 1.0}), "logit_bias token ids"), (dict(prediction=[1, n]), "prediction token ids")):
        GenerateOptions(**kwargs)  # no vocabulary yet: fine
        with pytest.raises(InvalidArgumentError, match=f"{what} must be in 0..{n - 1}"):
            dt.prepare([1, 2, 3], **kwargs)
    with pytest.raises(InvalidArgumentError, match=f"prompt token ids must be in 0..{n - 1}"):
        dt.prepare([1, -1, 3])
    request = dt.prepare(dt.tokenize_prompt("Hi"), max_tokens=2)
    stream = dt.stream_request(request)
    list(stream)
    assert stream.result.text == dt.generate("Hi", max_tokens=2).text
    with pytest.raises(InvalidArgumentError, match="runs once"):
        list(dt.stream_request(request))


def test_logprobs_bound_on_every_surface(dt, server):
    rule = LIMITS["logprobs"].rule("logprobs")
    with pytest.raises(InvalidArgumentError, match=_re(rule)):
        dt.generate("Hi", logprobs=21)
    r = subprocess.run([sys.executable, "-m", "dovetail_gguf", "generate", "Hi", "--no-draft", "--json", "--logprobs",
                        "21"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and rule in r.stderr, r.stderr
    for path, request in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                                                    "top_logprobs": 21}),
                          ("/v1/completions", {"prompt": "Hi", "logprobs": 21})):
        resp = httpx.post(server + path, json=request, timeout=120)
        assert resp.status_code == 400 and rule in resp.json()["error"]["message"], (path, resp.text)
