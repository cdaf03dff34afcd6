#!/usr/bin/env python3
"""Several conversations answered in turn: time to first token on returning to one, against its cold prefill.

Four conversations, each a ~1,500-token history (a file of the Python standard library and a question
about it), are answered in turn, twice: the first round starts each one, the second returns to each
with its answer and a follow-up question. One engine keeps prefixes warm (``--cache-slots``, default
4); a second engine with none answers the second round from an empty cache, for the cold time to the
first token and the answers to compare.

    .venv/bin/python benchmarks/conversations.py --target qwen2.5-coder-0.5b --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODULES = ["json.decoder", "textwrap", "shlex", "fnmatch"]


def histories(dt, tokens: int) -> list[list[dict]]:
    """A first user turn per module: its source cut to about ``tokens`` tokens, and a question."""
    import importlib
    import textwrap

    out = []
    for name in MODULES:
        source = textwrap.dedent(inspect.getsource(importlib.import_module(name)))
        ids = dt.target.tokenize(source, add_special=False)[: tokens - 40]
        text = dt.target.detokenize(ids)
        out.append([{"role": "user", "content": f"Here is {name}:\n{text}\nWhat is the main class or function here?"}])
    return out


def first_token(dt, messages: list[dict], max_tokens: int) -> tuple[float, str, int, int]:
    """(seconds to the first piece, the answer, prompt tokens, prompt tokens reused from a cache)."""
    t0 = time.perf_counter()
    stream = dt.chat(messages, stream=True, max_tokens=max_tokens)
    ttft, pieces = None, []
    for piece in stream:
        if ttft is None:
            ttft = time.perf_counter() - t0
        pieces.append(piece)
    s = stream.result.stats
    return ttft if ttft is not None else time.perf_counter() - t0, stream.result.text, s.n_prompt_tokens, s.n_cached_tokens


def main() -> None:
    from dovetail_gguf import Dovetail
    from dovetail_gguf.target import TargetConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=1500, help="history length per conversation")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-slots", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    config = TargetConfig(n_ctx=4096, n_threads=a.threads)
    rows = []
    with Dovetail(a.target, target_config=config, cache_slots=a.cache_slots) as warm:
        convs = histories(warm, a.tokens)
        for i, messages in enumerate(convs):  # round 1: each conversation starts
            ttft, text, n, cached = first_token(warm, messages, a.max_tokens)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And what does it return?"}]
            rows.append({"conversation": i, "first_ttft_s": ttft, "first_prompt_tokens": n})
        for i, messages in enumerate(convs):  # round 2: back to each, in turn
            ttft, text, n, cached = first_token(warm, messages, a.max_tokens)
            rows[i].update(warm_ttft_s=ttft, prompt_tokens=n, cached_tokens=cached, warm_answer=text)
        state = warm.prefixes.state() if warm.prefixes is not None else None
    with Dovetail(a.target, target_config=config, cache_slots=0) as cold:
        for i, messages in enumerate(convs):
            cold.target.reset()
            ttft, text, n, cached = first_token(cold, messages, a.max_tokens)
            rows[i].update(cold_ttft_s=ttft, identical=text == rows[i].pop("warm_answer"))
            rows[i]["ratio"] = rows[i]["warm_ttft_s"] / ttft
            print(json.dumps(rows[i]), flush=True)
    summary = {"target": a.target, "threads": a.threads, "history_tokens": a.tokens, "cache_slots": a.cache_slots,
               "warm_ttft_s_median": statistics.median(r["warm_ttft_s"] for r in rows),
               "cold_ttft_s_median": statistics.median(r["cold_ttft_s"] for r in rows),
               "ratio_max": max(r["ratio"] for r in rows), "identical": all(r["identical"] for r in rows),
               "prefix_cache": state, "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
