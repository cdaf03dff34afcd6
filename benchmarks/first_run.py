#!/usr/bin/env python3
"""A process's first generation, as the quick start's first command runs it: nothing cached, so
t(k) is timed during the generation, against plain decoding of the same prompt.

usage: python benchmarks/first_run.py [--target NAME] [--trials 10] [--max-tokens 128] [--threads 2]

Each trial points the cost cache at an empty folder, makes a fresh engine with the default draft
and generates; plain decoding of the same chat prompt runs right after (or before: the order
alternates). Prints per-trial tokens/s and the median ratio; the models load once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from dovetail_gguf import Dovetail
from dovetail_gguf.engine import Engine
from dovetail_gguf.target import TargetConfig

PROMPT = "Write a Python function that checks whether a number is prime."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="a GGUF path or a model name (default: the default target)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    dt = Dovetail(args.target, target_config=TargetConfig(n_threads=args.threads))
    prompt = dt.chat_prompt_tokens([{"role": "user", "content": PROMPT}])
    drafter, plain_engine = dt.drafter, Engine(dt.target)
    rows = []
    for trial in range(args.trials):
        speeds = {}
        for system in (("dovetail", "plain") if trial % 2 == 0 else ("plain", "dovetail")):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["DOVETAIL_CACHE"] = cache  # nothing cached: the first process on a machine
                dt.engine = Engine(dt.target, drafter, ngram=True) if system == "dovetail" else plain_engine
                dt.target.reset()
                r = dt.generate_tokens(prompt, max_tokens=args.max_tokens)
            speeds[system] = r.stats.tokens_per_second
            if system == "dovetail":
                speeds["rounds"], speeds["tau"] = r.stats.rounds, round(r.stats.mean_accepted_tokens, 3)
        speeds["ratio"] = speeds["dovetail"] / speeds["plain"]
        rows.append(speeds)
        print(f"trial {trial}: dovetail {speeds['dovetail']:.1f} tok/s, plain {speeds['plain']:.1f} tok/s, "
              f"ratio {speeds['ratio']:.3f}, τ {speeds['tau']}")
    ratios = [r["ratio"] for r in rows]
    print(f"median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(json.dumps({"target": str(dt.target.path), "threads": args.threads, "max_tokens": args.max_tokens,
                      "trials": rows, "median_ratio": statistics.median(ratios)}))
    dt.close()


if __name__ == "__main__":
    main()
