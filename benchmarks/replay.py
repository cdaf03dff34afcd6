#!/usr/bin/env python3
"""Recomputes a bench report's offline replay bounds (see dovetail_gguf.bench.replay_bound).

The bound replays each prompt's plain answer, as recorded in the report, against the suffix
sources with the report's measured t(k): no model is evaluated, only the tokenizer is loaded.
Use it after a change to the bound's definition, or to see the bound at another chain length.

usage: python benchmarks/replay.py REPORT.json [--prompts FILE] [--chat] [--max-rows 64] [--write]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dovetail_gguf.bench import PREDICTED, REPLAY_MAX_ROWS, file_prompts, humaneval_prompts, replay_bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--prompts", default=None, help="the prompt file the report ran (default: HumanEval)")
    ap.add_argument("--chat", action="store_true", help="the report ran with --chat")
    ap.add_argument("--max-rows", type=int, default=REPLAY_MAX_ROWS)
    ap.add_argument("--write", action="store_true", help="store the bounds and summary figures in the report")
    a = ap.parse_args()

    from dovetail_gguf.api import Dovetail
    from dovetail_gguf.target import TargetConfig

    with open(a.report) as f:
        report = json.load(f)
    settings = report["settings"]
    n = settings["n_prompts"]
    prompts = file_prompts(a.prompts, n) if a.prompts else humaneval_prompts(n)
    answers = {r["prompt_index"]: r["tokens"] for r in report["records"] if r["system"] == "plain"}
    verify_ms = {int(k): v for k, v in settings["verify_ms"].items()}
    predicted = any(r["system"] == PREDICTED for r in report["records"])
    bounds = {}
    with Dovetail(settings["target"], False, target_config=TargetConfig(n_ctx=256, n_threads=1)) as dt:
        for i, p in enumerate(prompts):
            tokens = dt.chat_prompt_tokens([{"role": "user", "content": p}]) if a.chat else dt.tokenize_prompt(p)
            bounds[str(i)] = {"context": replay_bound(tokens, answers[i], verify_ms, max_rows=a.max_rows)}
            if predicted:
                bounds[str(i)]["prediction"] = replay_bound(tokens, answers[i], verify_ms, answers[i], a.max_rows)
    medians = {k: float(np.median([b[k] for b in bounds.values()])) for k in next(iter(bounds.values()))}
    print(json.dumps({"replay_bound_median": medians}))
    if a.write:
        report["replay_bound"] = bounds
        for system, s in report["summary"].items():
            if system in ("ngram", "dovetail", PREDICTED):
                s["replay_bound_median"] = medians["prediction" if system == PREDICTED else "context"]
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
