"""What a draft costs per round on this machine's CPU, for the levers of a cheap CPU draft.

For each variant (MLP width, layers, draft vocabulary, weight type) an untrained
draft for the target is built (cost does not depend on the weights' values),
given a committed context, then asked for chains as the engine asks: each call
commits the pairs of the last round and drafts a chain of depth d. Before each
call a buffer larger than the last-level cache is read, as the target's decode
between two rounds evicts the draft's weights (``--no-evict``: not). Reported:
the median time of a call at depth 1 (commit + first level) and the added time
per further depth step ("step").

    python benchmarks/draft_step.py --target qwen2.5-coder-0.5b --threads 2 --json out.json

Run it with nothing else on the machine; the figures are per-call medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dovetail_gguf.draft.io import init_draft
from dovetail_gguf.draft.tree import TreeDrafter
from dovetail_gguf.models import resolve_target
from dovetail_gguf.types import TreeConfig


def quantize_int8(drafter: TreeDrafter) -> None:
    """Dynamic int8 weights for every nn.Linear of the draft (torch's own quantized CPU kernels)."""
    from torch.ao.quantization import quantize_dynamic

    drafter.model = quantize_dynamic(drafter.model, {torch.nn.Linear}, dtype=torch.qint8)


def time_calls(drafter: TreeDrafter, depth: int, n_calls: int, context: int, accepted: int = 2,
               evict: np.ndarray | None = None) -> float:
    """Median ms of propose() committing ``accepted`` pairs and drafting a chain of ``depth``.

    ``evict``: a buffer larger than the last-level cache, read before each call, as the target's
    decode between two rounds streams its weights through the cache.
    """
    d = drafter.model.cfg.n_embd
    rng = np.random.default_rng(0)
    drafter.trim(0)
    drafter.propose(rng.standard_normal((context, d)).astype(np.float32),
                    rng.integers(0, 1000, context).astype(np.int32), TreeConfig(1, 1, 1))
    tree = TreeConfig(depth, depth, 1)
    times = []
    for _ in range(n_calls):
        feats = rng.standard_normal((accepted, d)).astype(np.float32)
        toks = rng.integers(0, 1000, accepted).astype(np.int32)
        if evict is not None:
            evict.sum()
        t0 = time.perf_counter()
        drafter.propose(feats, toks, tree)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=300, help="committed pairs before timing")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-evict", action="store_true", help="leave the draft's weights in the cache between calls")
    args = ap.parse_args()
    evict = None if args.no_evict else np.ones(128 << 20, dtype=np.uint8)  # 128 MiB
    torch.set_num_threads(args.threads)
    path = resolve_target(args.target)
    variants = [  # (layers, MLP width (None: the target's), draft vocab, dtype)
        (1, None, 8192, "fp32"), (1, 1024, 8192, "fp32"), (1, 1024, 4096, "fp32"), (1, 1024, 8192, "int8"),
        (1, None, 8192, "bf16"), (1, 1024, 8192, "bf16"), (1, 1024, 4096, "bf16"), (1, 512, 4096, "bf16"),
        (1, 1024, 2048, "bf16"), (2, 1024, 4096, "bf16"),
    ]
    rows = []
    for layers, mlp, vocab, dtype in variants:
        name = f"{layers} layer(s), MLP {mlp or 'target'}, V' {vocab}, {dtype}"
        model = init_draft(path, n_layer=layers, draft_vocab=vocab, intermediate_size=mlp)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        drafter = TreeDrafter(model, 4096, torch.device("cpu"), torch.bfloat16 if dtype == "bf16" else torch.float32)
        if dtype == "int8":
            quantize_int8(drafter)
        t1 = time_calls(drafter, 1, args.calls, args.context, evict=evict)
        t4 = time_calls(drafter, 4, args.calls, args.context, evict=evict)
        row = {"variant": name, "params_M": round(n_params / 1e6, 2), "depth1_ms": round(t1, 2),
               "depth4_ms": round(t4, 2), "step_ms": round((t4 - t1) / 3, 2)}
        rows.append(row)
        print(f"{name:42s} {row['params_M']:6.2f}M  depth 1 {t1:6.2f} ms  depth 4 {t4:6.2f} ms  "
              f"step {row['step_ms']:5.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": str(path), "threads": args.threads, "context": args.context,
                       "evict": evict is not None, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
