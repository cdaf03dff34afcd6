#!/usr/bin/env python3
"""Draft ablations: retrain a reference draft's recipe with one factor changed, then measure τ.

Each variant takes the reference's training_report.json config (same data, steps,
seed, held-out split) and changes only its factor: ``fc`` (EAGLE's fc fusion
instead of DGF) or ``1layer`` (one decoder layer instead of the reference's depth).
τ is measured through the engine, greedy, fixed default tree (16/7/10), on
HumanEval prompts and on the held-out prompts of the data, for the reference and
every variant.

usage: python benchmarks/draft_ablation.py --reference models/smollm2-135m-instruct-dovetail \\
           --data runs/data_v1 --out runs/ablation [--variants fc,1layer] [--n 20] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path


from dovetail_gguf.bench import humaneval_prompts
from dovetail_gguf.models import default_target_path
from dovetail_gguf.train.data import load_shards
from dovetail_gguf.train.evaluate import measure_tau
from dovetail_gguf.train.trainer import TrainConfig, heldout_prompts, split_heldout, train_draft

VARIANTS = {"fc": {"fusion": "fc"}, "1layer": {"n_layer": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="trained draft folder with training_report.json")
    ap.add_argument("--data", required=True, help="the data folder the reference was trained on")
    ap.add_argument("--out", required=True, help="folder for the variants and ablation.json")
    ap.add_argument("--variants", default="fc,1layer")
    ap.add_argument("--n", type=int, default=20, help="prompts per τ measurement")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    target = default_target_path()
    known = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in json.loads((Path(args.reference) / "training_report.json").read_text())["config"].items() if k in known}
    base.setdefault("unroll", 1)  # reports written before the training-time test existed were teacher-forced
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drafts = {"reference": Path(args.reference)}
    for name in args.variants.split(","):
        cfg = TrainConfig(**{**base, **VARIANTS[name], "tau_prompts": 0})
        drafts[name] = out / name
        if not (drafts[name] / "model.safetensors").is_file():
            train_draft(target, args.data, drafts[name], cfg)
    held = heldout_prompts(split_heldout(load_shards(args.data)[1], TrainConfig(**base))[0], args.n)
    he = humaneval_prompts(args.n)
    results = {}
    for name, d in drafts.items():
        results[name] = {"draft": str(d),
                         "humaneval": measure_tau(target, d, he, max_tokens=args.max_tokens),
                         "heldout": measure_tau(target, d, held, max_tokens=args.max_tokens)}
        print(f"{name:10s} τ HumanEval {results[name]['humaneval']['tau']:.3f}  held-out {results[name]['heldout']['tau']:.3f}", flush=True)
    (out / "ablation.json").write_text(json.dumps({"base_config": base, "variants": VARIANTS, "results": results}, indent=1))


if __name__ == "__main__":
    main()
