#!/usr/bin/env python3
"""Requests side by side on ``dovetail serve``: a short completion sent while a long chat answer streams,
and several edit requests at once against the same requests one after another.

1. With ``--parallel P``: a 256-token chat answer streams; once it is under way a 32-token completion
   is sent. Reported: the completion's time to its first token from its arrival, and whether both
   answers equal the ones each request gets alone.
2. ``--concurrent`` edit requests (benchmarks/prompts/edit.jsonl, chat) sent at once to the ``--parallel P``
   server, and the same requests one after another to a ``--parallel P`` and a ``--parallel 1`` server,
   each fresh (nothing cached): total wall time of each, the throughput ratios, and whether every
   answer is the same.

    .venv/bin/python benchmarks/parallel.py --target qwen2.5-coder-0.5b --json out.json

Only the first engine slot has the draft: with it on, requests served side by side run partly without
it, so ``--server-args "--no-draft --ngram"`` (every slot alike) measures what serving side by side
itself costs or gains.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from served import served  # noqa: E402

LONG = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}], "max_tokens": 256}
SHORT = {"prompt": "def fibonacci(n):", "max_tokens": 32}


def chat(base: str, body: dict) -> str:
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=1200)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def short_beside_long(base: str) -> dict:
    alone_short = httpx.post(base + "/v1/completions", json=SHORT, timeout=600).json()["choices"][0]["text"]
    alone_long = chat(base, LONG)
    pieces = []

    def run_long():
        with httpx.stream("POST", base + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=1200) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    d = json.loads(line[6:])
                    if d["choices"] and d["choices"][0]["delta"].get("content"):
                        pieces.append(d["choices"][0]["delta"]["content"])

    thread = threading.Thread(target=run_long)
    thread.start()
    while len(pieces) < 20 and thread.is_alive():
        time.sleep(0.02)
    t0, first, parts = time.perf_counter(), None, []
    with httpx.stream("POST", base + "/v1/completions", json={**SHORT, "stream": True}, timeout=600) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                d = json.loads(line[6:])
                if d["choices"] and d["choices"][0]["text"]:
                    first = first if first is not None else time.perf_counter() - t0
                    parts.append(d["choices"][0]["text"])
    short_s = time.perf_counter() - t0
    thread.join()
    return {"short_first_token_s": first, "short_total_s": short_s, "short_identical": "".join(parts) == alone_short,
            "long_identical": "".join(pieces) == alone_long}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-args", default="", help="more `dovetail serve` flags for every server, e.g. '--no-draft --ngram'")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    rows = [json.loads(line) for line in open(ROOT / "benchmarks" / "prompts" / "edit.jsonl")][: a.concurrent]
    bodies = [{"messages": [{"role": "user", "content": r["prompt"]}], "max_tokens": a.max_tokens} for r in rows]
    common = ["--target", a.target, "--threads", str(a.threads), "--ctx-size", "4096"] + shlex.split(a.server_args)
    out = {"target": a.target, "server_args": a.server_args, "threads": a.threads, "parallel": a.parallel, "concurrent": a.concurrent,
           "max_tokens": a.max_tokens}

    def run(parallel: int, together: bool) -> tuple[float, list[str], dict]:
        """A fresh server (nothing cached): the requests at once or one after another."""
        with served(common + ["--parallel", str(parallel)]) as base:
            chat(base, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})  # first-call costs
            t0 = time.perf_counter()
            if together:
                with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                    answers = list(pool.map(lambda b: chat(base, b), bodies))
            else:
                answers = [chat(base, b) for b in bodies]
            seconds = time.perf_counter() - t0
            return seconds, answers, short_beside_long(base) if together else {}

    out["sequential_s"], one_by_one, _ = run(1, False)
    out["sequential_same_parallel_s"], same_server, _ = run(a.parallel, False)
    out["concurrent_s"], together, beside = run(a.parallel, True)
    out.update(beside)
    out["throughput_ratio"] = out["sequential_s"] / out["concurrent_s"]
    out["throughput_ratio_same_parallel"] = out["sequential_same_parallel_s"] / out["concurrent_s"]
    out["edits_identical"] = together == one_by_one == same_server
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
