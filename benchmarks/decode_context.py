#!/usr/bin/env python3
"""One-token decode time against context length: this package's target (default, invariant kernels)
against llama-cpp-python's own ``Llama`` with flash attention off (its default) and on, in one
process, interleaved, after the same random context.

usage: python benchmarks/decode_context.py [--target qwen2.5-coder-0.5b] [--contexts 30,300,1000]
                                           [--tokens 48] [--trials 3] [--json OUT]

Each trial decodes ``--tokens`` tokens one at a time after a context of each size; the median
milliseconds per token per system and context are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b", help="a GGUF path or a model name")
    ap.add_argument("--contexts", default="30,300,1000", help="committed tokens before the timed decodes")
    ap.add_argument("--tokens", type=int, default=48, help="one-token decodes timed per trial")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out", help="write the medians here")
    args = ap.parse_args()

    from llama_cpp import Llama

    from dovetail_gguf.llama_runtime import cpu_kind
    from dovetail_gguf.models import resolve_target
    from dovetail_gguf.target import Target, TargetConfig

    contexts = [int(c) for c in args.contexts.split(",")]
    n_ctx = max(contexts) + args.tokens + 256
    path = str(resolve_target(args.target))
    target = Target(path, TargetConfig(n_ctx=n_ctx, n_threads=args.threads))  # first: its switches hold
    llamas = {f"llama-cpp-python, flash attention {'on' if fa else 'off'}":
              Llama(model_path=path, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                    flash_attn=fa, verbose=False) for fa in (False, True)}
    rng = np.random.default_rng(0)
    times: dict[str, dict[int, list[float]]] = {s: {c: [] for c in contexts} for s in ["dovetail target", *llamas]}
    for _ in range(args.trials):
        for c in contexts:
            context = rng.integers(100, 5000, size=c).astype(np.int32)
            tokens = rng.integers(100, 5000, size=args.tokens).tolist()
            target.reset()
            target.prefill(context, outputs=False)
            t0 = time.perf_counter()
            for tok in tokens:
                target.decode_one(tok)
            times["dovetail target"][c].append((time.perf_counter() - t0) / len(tokens) * 1e3)
            for name, llm in llamas.items():
                llm.reset()
                llm.eval(context.tolist())
                t0 = time.perf_counter()
                for tok in tokens:
                    llm.eval([tok])
                times[name][c].append((time.perf_counter() - t0) / len(tokens) * 1e3)
    medians = {s: {c: round(float(np.median(v)), 2) for c, v in by.items()} for s, by in times.items()}
    print(f"ms per one-token decode, median of {args.trials} ({cpu_kind()}, {args.threads} threads, {Path(path).name})")
    print(f"{'system':45}" + "".join(f"{c:>10}" for c in contexts))
    for s, by in medians.items():
        print(f"{s:45}" + "".join(f"{by[c]:>10.2f}" for c in contexts))
    if args.json_out:
        doc = {"target": Path(path).name, "machine": cpu_kind(), "threads": args.threads, "tokens": args.tokens,
               "trials": args.trials, "kernel_env": target.kernel_env, "ms_per_token": medians}
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
    target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
