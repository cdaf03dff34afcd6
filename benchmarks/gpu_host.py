#!/usr/bin/env python3
"""The GPU half at 7B scale: a LLaMA-2-7B-shaped random Q4_0 target on the CPU cores, the draft on the GPU.

Reports, all from one run:
- plain decoding speed of the target (tokens/s) and t(k)/t(1) for k tree nodes;
- the draft's round latency (TreeDrafter.propose, default tree) at the target's width;
- the end-to-end round time of the engine at the default tree (draft + verify + commit);
- the projected speedup over plain decoding at τ = 3 and 4: τ · t(1) / round time.

The target's weights are random, so acceptance is meaningless here: every figure is a
cost, and the speedup is projected from the measured costs at the stated τ.

usage: python benchmarks/gpu_host.py [--gguf runs/random-7b.gguf] [--threads 16] [--layers 4]
           [--shape 4096,32,32,32,11008,32000] [--json OUT]
Small shapes (e.g. --shape 256,2,4,4,512,2000 --device cpu) check the script itself on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dovetail_gguf.draft.io import init_draft
from dovetail_gguf.draft.tree import TreeDrafter, resolve_device
from dovetail_gguf.engine import Engine, GenerateOptions, TreeConfig
from dovetail_gguf.target import Target, TargetConfig

MAKE_RANDOM = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_random_llama.py"


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="runs/random-7b.gguf", help="made with shared/tools/make_random_llama.py if missing")
    ap.add_argument("--shape", default="4096,32,32,32,11008,32000", help="n_embd,n_layer,n_head,n_kv_head,n_ff,n_vocab")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--layers", type=int, default=4, help="draft decoder layers")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=512, help="committed tokens before measuring")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    gguf_path = Path(args.gguf)
    if not gguf_path.is_file():
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(MAKE_RANDOM), str(gguf_path), *args.shape.split(",")], check=True)
        print(f"wrote {gguf_path} in {time.perf_counter() - t0:.0f} s", flush=True)
    tree = TreeConfig()
    target = Target(gguf_path, TargetConfig(n_ctx=args.context + 256, n_threads=args.threads))
    rng = np.random.default_rng(0)
    context = rng.integers(3, target.n_vocab, size=args.context).astype(np.int32)
    target.prefill(context)
    base = target.n_past

    # 1. plain decoding and t(k)
    def one():
        target.decode_one(int(rng.integers(3, target.n_vocab)))
        target.truncate(base)

    t1 = median_ms(one, args.reps)
    ratios = {}
    for k in (2, 4, 8, 16, 17, 32):
        if k > target.max_tree_nodes:
            continue
        parents = np.array([-1] + [max(0, i - 1 - (i % 3 == 0)) for i in range(1, k)], dtype=np.int32)

        def verify(k=k, parents=parents):
            target.verify_tree(rng.integers(3, target.n_vocab, size=k).astype(np.int32), parents)
            target.commit([0])
            target.truncate(base)

        ratios[k] = median_ms(verify, args.reps) / t1
    print(f"plain: {1000 / t1:.1f} tok/s (t(1) = {t1:.1f} ms, {args.threads} threads)", flush=True)
    print("t(k)/t(1): " + ", ".join(f"k={k}: {r:.2f}" for k, r in ratios.items()), flush=True)

    # 2. the draft round on the device
    device = resolve_device(args.device)
    model = init_draft(gguf_path, n_layer=args.layers, draft_vocab=args.draft_vocab)
    drafter = TreeDrafter(model, target.n_ctx + 1, device)
    hidden = rng.standard_normal((base, target.n_embd)).astype(np.float32)
    drafter.propose(hidden, context, tree)  # the prompt's pairs go in once

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def draft_round():
        drafter.trim(base - 2)
        drafter.propose(hidden[-2:], context[-2:], tree)  # one accepted token + the new root, a typical round
        sync()

    draft_ms = median_ms(draft_round, args.reps)
    print(f"draft round ({args.layers} layers, width {target.n_embd}, tree {tree.tokens}/{tree.depth}/{tree.topk}, "
          f"{device}): {draft_ms:.2f} ms", flush=True)

    # 3. end to end: the engine's rounds at the default tree (acceptance of a random target is near zero,
    #    so a round costs what a real one costs, and emits ~1 token)
    target.reset()
    engine = Engine(target, drafter, tree, adaptive=False)
    gen = engine.start(context[:64], GenerateOptions(max_tokens=24))
    for _ in gen:
        pass
    s = gen.result.stats
    round_ms = 1000 * s.decode_seconds / max(s.rounds, 1)
    report = {
        "gguf": str(gguf_path), "shape": args.shape, "threads": args.threads, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "plain_tokens_per_second": 1000 / t1, "t1_ms": t1, "verify_ratio": ratios,
        "draft_layers": args.layers, "draft_round_ms": draft_ms,
        "engine_round_ms": round_ms, "engine_split_ms_per_round": {
            "draft": 1000 * s.draft_seconds / max(s.rounds, 1), "verify": 1000 * s.verify_seconds / max(s.rounds, 1),
            "other": 1000 * s.other_seconds / max(s.rounds, 1)},
        "projected_speedup": {str(tau): tau * t1 / round_ms for tau in (3, 4)},
    }
    print(f"engine round at the default tree: {round_ms:.1f} ms "
          f"(draft {report['engine_split_ms_per_round']['draft']:.1f}, verify {report['engine_split_ms_per_round']['verify']:.1f})")
    print("projected speedup over plain: " + ", ".join(f"τ={t}: {v:.2f}x" for t, v in report["projected_speedup"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    target.close()


if __name__ == "__main__":
    main()
