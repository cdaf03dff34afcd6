#!/usr/bin/env python3
"""Cost of verifying k tree nodes in one llama_decode, relative to one token, and the
Python-side overhead of a verify + commit round (everything but llama_decode itself).

usage: python benchmarks/verify_cost.py [--target GGUF] [--threads 2] [--reps 30] [--context N]

--context N evaluates the trees after N committed tokens (random ids) instead of a short
prompt: attention over the KV cache makes t(k)/t(1) grow with the context.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dovetail_gguf.models import resolve_target
from dovetail_gguf.target import Target, TargetConfig


def tree_parents(k: int, rng) -> np.ndarray:
    parents = np.empty(k, dtype=np.int32)
    parents[0] = -1
    for i in range(1, k):
        parents[i] = rng.integers(max(0, i - 4), i)  # bushy but deep-ish, like a drafted tree
    return parents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="a GGUF path or a model name (default: the default target)")
    ap.add_argument("--kernels", default="invariant", help="invariant or fast (dovetail_gguf.kernels)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--context", type=int, default=0, help="committed tokens before the trees (0: a short prompt)")
    args = ap.parse_args()
    t = Target(resolve_target(args.target), TargetConfig(n_ctx=2048, n_threads=args.threads, kernels=args.kernels))
    rng = np.random.default_rng(0)
    prompt = t.tokenize("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    if args.context:
        prompt = rng.integers(100, t.n_vocab, size=args.context).astype(np.int32)
    t.prefill(prompt)
    base = t.n_past
    decode_time = [0.0]

    def timed_decode(rows: int, seconds: float) -> None:
        decode_time[0] += seconds

    t.on_decode = timed_decode
    results = {}
    for k in (1, 2, 4, 8, 16, 32, 64):
        if k > t.max_tree_nodes:
            continue
        parents = tree_parents(k, rng)
        times, overheads = [], []
        for rep in range(args.reps + 3):
            tokens = rng.integers(0, t.n_vocab, size=k).astype(np.int32)
            decode_time[0] = 0.0
            t0 = time.perf_counter()
            t.verify_tree(tokens, parents)
            t.commit([0])
            total = time.perf_counter() - t0
            if rep >= 3:  # warm-up
                times.append(decode_time[0])
                overheads.append(total - decode_time[0])
            t.truncate(base)
        results[k] = {"decode_ms": 1000 * float(np.median(times)), "python_overhead_ms": 1000 * float(np.median(overheads))}
    one = results[1]["decode_ms"]
    print(f"{'k':>4}{'decode ms':>12}{'t(k)/t(1)':>11}{'overhead ms':>13}{'overhead %':>12}")
    for k, r in results.items():
        r["ratio"] = r["decode_ms"] / one
        r["overhead_pct_of_one_decode"] = 100 * r["python_overhead_ms"] / one
        print(f"{k:>4}{r['decode_ms']:>12.2f}{r['ratio']:>11.2f}{r['python_overhead_ms']:>13.3f}{r['overhead_pct_of_one_decode']:>11.1f}%")
    print(json.dumps({"threads": args.threads, "context": int(base), "results": results}))


if __name__ == "__main__":
    main()
