#!/usr/bin/env python3
"""An editor's cache warm-up (``/infill`` with ``n_predict: 0``) against one cold prefill of what it adds.

llama.vim keeps a ring of 64-line chunks of recently seen code and, every second or so, sends them in a
request with ``n_predict: 0``, an empty prefix and suffix, so that the next completion finds them in the
cache. Each trial here, on a real ``dovetail serve``:

1. warms the cache with a ring of ``--ring`` chunks (64 lines each, Python stdlib source);
2. sends the same ring plus one new chunk, timed: the **warm-up**;
3. evicts the cache with an unrelated prompt, then sends the new chunk alone, timed: the **cold prefill**
   of that chunk (the same request shape, nothing of it cached).

Reports the medians of both wall-clock times (client side, HTTP included), the server's prompt token
counts, and their ratio (goal: the warm-up within one cold prefill of its chunk, ratio <= 1).

    .venv/bin/python benchmarks/fim_warmup.py --trials 5 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import contextlib
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from served import served  # noqa: E402


def chunks_of(module, lines: int = 64) -> list[dict]:
    """``module``'s source as 64-line chunks, as llama.vim's ring holds them ({filename, text})."""
    src = inspect.getsource(module).splitlines(keepends=True)
    name = Path(inspect.getsourcefile(module)).name
    return [{"filename": name, "text": "".join(src[i:i + lines])} for i in range(0, len(src) - lines + 1, lines)]


def warm_up(base: str, ring: list[dict]) -> tuple[float, dict]:
    """llama.vim's ring update (autoload/llama.vim): empty prefix and suffix, n_predict 0; (seconds, body)."""
    body = {"input_prefix": "", "input_suffix": "", "input_extra": ring, "prompt": "", "n_predict": 0,
            "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True}
    t0 = time.perf_counter()
    r = httpx.post(base + "/infill", json=body, timeout=600)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    return seconds, r.json()


def main() -> None:
    import argparse as m1
    import difflib as m3
    import tarfile as m2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("--ring", type=int, default=8, help="chunks already in the ring (llama.vim holds up to 16)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true",
                    help="time llama.cpp's own llama-server instead (built once into the cache, see dovetail bench)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    pool = chunks_of(m1) + chunks_of(m2)
    others = chunks_of(m3)
    if len(pool) < a.ring + a.trials:
        raise SystemExit("not enough source for that many chunks")
    if a.peer:
        from dovetail_gguf.models import resolve_target
        from dovetail_gguf.peer import LlamaServerSystem, build_llama_server

        @contextlib.contextmanager
        def llama_server():
            peer = LlamaServerSystem(build_llama_server(), resolve_target(a.target), "plain", 8192, a.threads)
            try:
                yield peer.base
            finally:
                peer.close()

        server = llama_server()
    else:
        args = ["--target", a.target, "--threads", str(a.threads), "--ctx-size", "8192"] + (["--no-draft"] if a.no_draft else [])
        server = served(args)
    rows = []
    with server as base:
        for t in range(a.trials):
            ring, new = pool[t:t + a.ring], pool[t + a.ring]
            warm_up(base, ring)  # the ring as it stood
            warm_s, warm = warm_up(base, ring + [new])
            warm_up(base, [others[t % len(others)]])  # evict: nothing of the next request is cached
            cold_s, cold = warm_up(base, [new])
            rows.append({"warm_s": warm_s, "cold_s": cold_s, "warm_prompt_n": warm["timings"]["prompt_n"],
                         "cold_prompt_n": cold["timings"]["prompt_n"], "warm_context": warm["tokens_evaluated"]})
            print(json.dumps(rows[-1]), flush=True)
    warm_med = statistics.median(r["warm_s"] for r in rows)
    cold_med = statistics.median(r["cold_s"] for r in rows)
    summary = {"server": "llama-server" if a.peer else "dovetail", "target": a.target, "draft": not a.no_draft and not a.peer, "ring": a.ring, "trials": a.trials, "threads": a.threads,
               "warm_up_s_median": warm_med, "cold_prefill_s_median": cold_med, "ratio": warm_med / cold_med,
               "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
