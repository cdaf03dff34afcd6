#!/usr/bin/env python3
"""Predicted Outputs through `dovetail serve` and the official openai client, on the edit requests.

For every request, greedy: the request once without a prediction (it fills the server's prompt
cache), the same request again without one, then with the answer as its prediction
(`prediction={"type": "content", "content": answer}`). The last two are timed by the client
from request to last byte; both find the prompt cached, so the ratio compares like with like.
Reports the median per-request ratio, the server's own decode-only tokens/s ratio, the share of
the answer taken from the prediction (usage.completion_tokens_details), whether the answer with
the prediction is identical, and whether the two requests without one got the same answer.

    .venv/bin/python benchmarks/prediction_server.py --target qwen2.5-coder-0.5b --n 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from served import served  # noqa: E402

PROMPTS = Path(__file__).parent / "prompts" / "edit.jsonl"


def main() -> None:
    from openai import OpenAI

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-args", default="", help="extra arguments for `dovetail serve`, e.g. '--no-draft'")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    prompts = [json.loads(line)["prompt"] for line in open(a.prompts) if line.strip()][: a.n]
    args = ["--target", a.target, "--threads", str(a.threads), "--ctx-size", "4096", *a.server_args.split()]
    with served(args) as base:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        rows = []
        for i, prompt in enumerate(prompts):
            msgs = [{"role": "user", "content": prompt}]
            first = client.chat.completions.create(model="x", messages=msgs, max_tokens=a.max_tokens, temperature=0)
            t0 = time.perf_counter()
            ref = client.chat.completions.create(model="x", messages=msgs, max_tokens=a.max_tokens, temperature=0)
            t_ref = time.perf_counter() - t0
            answer = ref.choices[0].message.content
            t0 = time.perf_counter()
            got = client.chat.completions.create(model="x", messages=msgs, max_tokens=a.max_tokens, temperature=0,
                                                 prediction={"type": "content", "content": answer})
            t_got = time.perf_counter() - t0
            d = got.usage.completion_tokens_details
            rows.append({"prompt_index": i, "tokens": got.usage.completion_tokens, "seconds_without": t_ref,
                         "seconds_with": t_got, "identical": got.choices[0].message.content == answer,
                         "repeat_identical": first.choices[0].message.content == answer,
                         "decode_tps_without": ref.model_extra["dovetail"]["tokens_per_second"],
                         "decode_tps_with": got.model_extra["dovetail"]["tokens_per_second"],
                         "accepted_prediction_tokens": d.accepted_prediction_tokens,
                         "rejected_prediction_tokens": d.rejected_prediction_tokens})
            print(json.dumps(rows[-1]), flush=True)
    wall = [r["seconds_without"] / r["seconds_with"] for r in rows]
    decode = [r["decode_tps_with"] / r["decode_tps_without"] for r in rows]
    summary = {"n": len(rows), "wall_speedup_median": float(np.median(wall)),
               "decode_speedup_median": float(np.median(decode)),
               "prediction_accepted_share": sum(r["accepted_prediction_tokens"] for r in rows) / max(1, sum(r["tokens"] for r in rows)),
               "identical": sum(r["identical"] for r in rows),
               "repeat_identical": sum(r["repeat_identical"] for r in rows), "server": " ".join(["serve", *args])}
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
