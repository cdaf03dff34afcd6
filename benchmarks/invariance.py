#!/usr/bin/env python3
"""Which batches compute a row bit for bit as a one-token decode does, and what each kernel setting costs.

For one target and one kernel setting, after contexts of several lengths (random tokens), a chain
of n tokens is evaluated three ways: token by token (the reference), as one batch, and as the
first path of a tree with a decoy sibling below every node. A batch size "agrees" when every row's
logits equal the reference's bit for bit. Also: the same context prefilled in one call and in
two chunks, then the same next token (does the KV cache depend on how the prompt was chunked?).

usage: python benchmarks/invariance.py [--target NAME] [--threads 2] [--kernels SETTING ...] [--json OUT]

SETTING is a kernel mode (see dovetail_gguf.kernels), optionally with +repack or +no-repack to load
the weights in llama.cpp's repacked layouts or not (default: the mode's own choice). Each setting
runs in its own process, because llama.cpp reads its kernel switches from the environment once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SIZES = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 32, 33, 48, 63)
CONTEXTS = (40, 300, 600, 1100)


COST_SIZES = (1, 2, 4, 8, 16, 32, 63, 64)
LAYOUTS = {"": None, "repack": True, "no-repack": False}


def run_one(target_name: str | None, threads: int, setting: str, sizes, contexts, reps: int = 12) -> dict:
    from dovetail_gguf.kernels import KERNEL_MODES, apply_environment

    kernels, _, layout = setting.partition("+")
    mode = KERNEL_MODES[kernels]
    apply_environment(mode)
    from dovetail_gguf.models import resolve_target
    from dovetail_gguf.target import Target, TargetConfig

    t = Target(resolve_target(target_name), TargetConfig(n_ctx=2048, n_threads=threads, kernels=kernels,
                                                            use_extra_buffers=LAYOUTS[layout]))
    t.max_tree_nodes = max(sizes)  # measure every size, whatever the engine's probe would allow
    rng = np.random.default_rng(0)
    out = {"setting": setting, "kernels": kernels, "target": t.path.name, "threads": threads, "extra_buffers": t.extra_buffers,
           "contexts": {}, "t_ms": {}}
    for ctx in contexts:
        t.reset()
        prompt = rng.integers(100, t.n_vocab, size=ctx).astype(np.int32)
        t.prefill(prompt, outputs=False)
        base = t.n_past
        n_max = max(sizes)
        chain = rng.integers(100, t.n_vocab, size=n_max).astype(np.int32)
        ref = []
        for tok in chain:
            logits, _ = t.decode_one(int(tok))
            ref.append(logits.copy())
        ref = np.stack(ref)
        t.truncate(base)
        row = {}
        for n in sizes:
            res = t.verify_tree(chain[:n], np.arange(-1, n - 1))
            chain_ok = bool((res.logits == ref[:n]).all())
            t.truncate(base)
            # the chain as the first path, a decoy sibling under each node (rows in other places)
            m = (n + 1) // 2
            toks = np.concatenate([chain[:m], np.full(m - 1, 17, np.int32)])
            parents = np.concatenate([np.arange(-1, m - 1), np.arange(0, m - 1)]).astype(np.int32)
            res = t.verify_tree(toks, parents)
            tree_ok = bool((res.logits[:m] == ref[:m]).all())
            t.truncate(base)
            row[n] = {"chain": chain_ok, "tree": tree_ok}
        # prefill chunking: the whole context at once, or in two parts
        t.reset()
        t.prefill(prompt[: ctx // 3], outputs=False)
        t.prefill(prompt[ctx // 3 :], outputs=False)
        split_logits, _ = t.decode_one(int(chain[0]))
        chunk_ok = bool((split_logits == ref[0]).all())
        out["contexts"][ctx] = {"sizes": row, "prefill_chunking": chunk_ok}
        print(f"[{setting}] context {ctx}: disagree at "
              f"{[n for n, v in row.items() if not (v['chain'] and v['tree'])]}, prefill chunking "
              f"{'same' if chunk_ok else 'DIFFERS'}", flush=True)
    # cost: t(k) after a short context, best of reps
    t.reset()
    t.prefill(rng.integers(100, t.n_vocab, size=64).astype(np.int32), outputs=False)
    base = t.n_past
    t.max_tree_nodes = max(COST_SIZES)
    for k in COST_SIZES:
        best = []
        for _ in range(reps):
            toks = rng.integers(100, t.n_vocab, size=k).astype(np.int32)
            t0 = time.perf_counter()
            if k == 1:
                t.decode_one(int(toks[0]))
            else:
                t.verify_tree(toks, np.arange(-1, k - 1))
            best.append(time.perf_counter() - t0)
            t.truncate(base)
        out["t_ms"][k] = round(1000 * float(np.median(best)), 3)
    # prefill of 512 tokens, the faster of two
    spent = []
    for _ in range(2):
        t.reset()
        t0 = time.perf_counter()
        t.prefill(rng.integers(100, t.n_vocab, size=512).astype(np.int32), outputs=False)
        spent.append(time.perf_counter() - t0)
    out["prefill512_ms"] = round(1000 * min(spent), 1)
    print(f"[{setting}] t(k) ms: {out['t_ms']}, prefill 512: {out['prefill512_ms']} ms", flush=True)
    t.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", action="append", help="kernel settings to probe, MODE[+repack|+no-repack] "
                                                       "(default: every mode, with its own layout choice)")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="chain sizes compared with one-token decodes")
    ap.add_argument("--reps", type=int, default=12, help="timings per t(k), median reported")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    sizes = [int(k) for k in args.sizes.split(",")]
    if args.child:
        print("RESULT " + json.dumps(run_one(args.target, args.threads, args.kernels[0], sizes, contexts, args.reps)))
        return
    from dovetail_gguf.kernels import KERNEL_MODES

    results = []
    for mode in args.kernels or list(KERNEL_MODES):
        cmd = [sys.executable, __file__, "--child", "--kernels", mode, "--threads", str(args.threads),
               "--contexts", args.contexts, "--sizes", args.sizes, "--reps", str(args.reps)] + \
            (["--target", args.target] if args.target else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        sys.stderr.write("".join(l + "\n" for l in proc.stdout.splitlines() if not l.startswith("RESULT ")))
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(proc.stderr[-3000:])
            continue
        results.append(json.loads(line[7:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": __import__("dovetail_gguf.llama_runtime", fromlist=["cpu_model"]).cpu_model(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
