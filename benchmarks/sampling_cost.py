#!/usr/bin/env python3
"""What sampling and structured output cost, as ratios to greedy plain decoding in the same run.

For each prompt, interleaved, decode-only tokens per second of:
- ``greedy``: plain decoding (no draft, no suffix index), temperature 0;
- ``sampled``: plain decoding at temperature 0.8, top-k 40, top-p 0.95 (llama.cpp's chain order);
- ``llama-cpp-python``: its ``Llama`` sampling with the same settings (min-p 0, no penalty), on the
  same file and threads (its time to the first token is subtracted, as for the others);
- ``dovetail-sampled``: speculation (draft + suffix index) at the same sampling settings;
- ``plain-schema`` / ``dovetail-schema``: greedy under a JSON schema (the prompt asks for that JSON),
  plain and with speculation.

Reports the median over prompts of each per-prompt ratio.

    .venv/bin/python benchmarks/sampling_cost.py --target qwen2.5-coder-0.5b --n 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95)
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "summary", "steps"],
          "properties": {"name": {"type": "string"}, "summary": {"type": "string"},
                         "steps": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 6}}}
TASKS = ["sorting a list of integers", "reading a CSV file", "parsing command-line arguments", "computing a checksum",
         "validating an e-mail address", "merging two dictionaries", "walking a directory tree",
         "retrying a failed HTTP request", "formatting a date", "caching a function's results",
         "counting words in a text", "reversing a linked list"]


def main() -> None:
    from llama_cpp import Llama

    from dovetail_gguf import Dovetail
    from dovetail_gguf.models import resolve_target
    from dovetail_gguf.target import TargetConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    path = resolve_target(a.target)
    dt = Dovetail(path, target_config=TargetConfig(n_ctx=2048, n_threads=a.threads))
    drafter = dt.engine.drafter
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)

    def ours(tokens, speculate: bool, **kw) -> float:
        dt.engine.set_drafter(drafter if speculate else None)
        dt.engine.ngram = speculate
        dt.generate_tokens(tokens[:8], max_tokens=1)  # a different prompt first: nothing of this one is cached
        r = dt.generate_tokens(tokens, max_tokens=a.max_tokens, **kw)
        return r.stats.tokens_per_second

    def theirs(tokens) -> float:
        llm.reset()
        t0, first, n = time.perf_counter(), None, 0
        for _ in llm.create_completion(tokens, max_tokens=a.max_tokens, stream=True, min_p=0.0, repeat_penalty=1.0,
                                       seed=1, **SAMPLED):
            n += 1
            first = first or time.perf_counter()
        return (n - 1) / (time.perf_counter() - first) if n > 1 else 0.0

    rows = []
    for i, task in enumerate(TASKS[: a.n]):
        free = dt.chat_prompt_tokens([{"role": "user", "content": f"Explain, step by step, {task} in Python."}])
        ask = dt.chat_prompt_tokens([{"role": "user", "content": f"Describe {task} in Python as JSON with a name, "
                                      "a one-sentence summary and three to six steps."}])
        row = {"prompt": i,
               "greedy": ours(free, False),
               "sampled": ours(free, False, seed=i, **SAMPLED),
               "llama-cpp-python": theirs(free),
               "dovetail-sampled": ours(free, True, seed=i, **SAMPLED),
               "plain-schema": ours(ask, False, json_schema=SCHEMA),
               "dovetail-schema": ours(ask, True, json_schema=SCHEMA)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def ratio(num: str, den: str) -> float:
        return statistics.median(r[num] / r[den] for r in rows)

    summary = {"sampled / greedy": ratio("sampled", "greedy"),
               "sampled / llama-cpp-python sampled": ratio("sampled", "llama-cpp-python"),
               "dovetail-sampled / sampled": ratio("dovetail-sampled", "sampled"),
               "dovetail-schema / plain-schema": ratio("dovetail-schema", "plain-schema"),
               "plain-schema / greedy": ratio("plain-schema", "greedy")}
    for k, v in summary.items():
        print(f"{k:40s} {v:.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "sampling": SAMPLED, "schema": SCHEMA, "rows": rows,
                                            "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
