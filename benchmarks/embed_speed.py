#!/usr/bin/env python3
"""Embedding a batch of texts: dovetail's embedder against llama-cpp-python's own ``Llama.embed`` on the
same GGUF, the same threads, in one process (so under the same kernel switches), interleaved.

The texts are 32 docstrings of the Python standard library (20-200 tokens each). llama-cpp-python
pools in llama.cpp (mean); dovetail's embedder means the rows after the first itself (see
dovetail_gguf/embed.py). Reports the median seconds per batch of each and their ratio (goal: <= 1.2).

    .venv/bin/python benchmarks/embed_speed.py --target smollm2 --trials 5 --json out.json
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


def docstrings(n: int) -> list[str]:
    import collections
    import json as json_module
    import textwrap as textwrap_module

    out = []
    for mod in (textwrap_module, collections, json_module, inspect, argparse):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc and 80 <= len(doc) <= 800 and doc not in out:
                out.append(doc)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} docstrings")
    return out[:n]


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    from dovetail_gguf import Dovetail
    from dovetail_gguf.models import resolve_target
    from dovetail_gguf.target import TargetConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="GGUF or model name (default: the default target)")
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    path = resolve_target(a.target)
    texts = docstrings(a.texts)
    dt = Dovetail(path, False, target_config=TargetConfig(n_ctx=2048, n_threads=a.threads))
    embedder = dt.embedder()
    llm = Llama(model_path=str(path), embedding=True, n_ctx=2048, n_batch=2048, n_ubatch=2048, n_threads=a.threads,
                n_threads_batch=a.threads, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    embedder.embed(texts[:2]), llm.embed(texts[:2])  # first-call costs out of the timings
    ours, theirs = [], []
    for _ in range(a.trials):
        t0 = time.perf_counter()
        out = embedder.embed(texts)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm.embed(texts)
        theirs.append(time.perf_counter() - t0)
    summary = {"target": path.name, "texts": a.texts, "tokens": out.total_tokens, "threads": a.threads,
               "trials": a.trials, "pooling": embedder.pooling, "dovetail_s_median": statistics.median(ours),
               "llama_cpp_python_s_median": statistics.median(theirs),
               "ratio": statistics.median(ours) / statistics.median(theirs), "dovetail_s": ours, "llama_cpp_python_s": theirs}
    print(json.dumps(summary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
