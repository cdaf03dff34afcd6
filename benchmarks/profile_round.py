#!/usr/bin/env python3
"""Where a speculative round's time goes: llama_decode, the draft's forward, and everything else.

Runs greedy generation with the default pair and a fixed tree on HumanEval prompts,
timing every llama_decode call and every draft forward, and profiles the same run
with pyinstrument (flat, self time). "Overhead" is the round time outside those two:
the Python and numpy work of drafting, verifying, accepting and committing.

usage: python benchmarks/profile_round.py [--n 5] [--max-tokens 128] [--threads 2]
           [--tree 16,7,10] [--top 15]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dovetail_gguf.api import Dovetail
from dovetail_gguf.bench import humaneval_prompts
from dovetail_gguf.engine import TreeConfig
from dovetail_gguf.target import TargetConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tree", default="16,7,10", help="tokens,depth,topk")
    ap.add_argument("--top", type=int, default=15, help="profile entries to print")
    args = ap.parse_args()
    from pyinstrument import Profiler
    from pyinstrument.renderers import ConsoleRenderer

    tree = TreeConfig(*map(int, args.tree.split(",")))
    dt = Dovetail(draft=None, tree=tree, target_config=TargetConfig(n_ctx=2048, n_threads=args.threads), adaptive=False)
    timers = {"llama_decode": 0.0, "draft_forward": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t0
        return wrapper

    def timed_decode(rows: int, seconds: float) -> None:
        timers["llama_decode"] += seconds

    dt.target.on_decode = timed_decode
    dt.drafter.model.forward = timed("draft_forward", dt.drafter.model.forward)
    dt.drafter.model.logits = timed("draft_forward", dt.drafter.model.logits)  # the head is part of the draft's compute
    prompts = humaneval_prompts(args.n)
    dt.generate(prompts[0], max_tokens=8)  # warm-up
    timers.update(llama_decode=0.0, draft_forward=0.0)
    profiler = Profiler(interval=0.0005)
    rounds = 0
    profiler.start()
    t0 = time.perf_counter()
    for p in prompts:
        rounds += dt.generate(p, max_tokens=args.max_tokens).stats.rounds
    total_s = time.perf_counter() - t0
    profiler.stop()
    # prefill decodes count as llama_decode: overhead is what is neither llama.cpp nor the draft's forward
    overhead = total_s - timers["llama_decode"] - timers["draft_forward"]
    summary = {"tree": args.tree, "rounds": int(rounds), "torch_threads": torch.get_num_threads(),
               "ms_per_round": 1000 * total_s / rounds,
               "llama_decode_ms_per_round": 1000 * timers["llama_decode"] / rounds,
               "draft_forward_ms_per_round": 1000 * timers["draft_forward"] / rounds,
               "overhead_ms_per_round": 1000 * overhead / rounds,
               "overhead_pct": 100 * overhead / total_s}
    flat = ConsoleRenderer(flat=True, time="percent_of_total").render(profiler.last_session)
    print("\n".join(flat.splitlines()[: args.top + 6]))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
