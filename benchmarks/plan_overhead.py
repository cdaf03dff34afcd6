#!/usr/bin/env python3
"""What the suffix index and the round planner cost per round, at a given context length.

Replays a real token stream (Python standard-library source, tokenized by the target's own
vocabulary) the way the engine runs it: the stream grows by a few tokens per round, and each
round the context proposer and a prediction proposer propose, the proposals merge, and the
planner picks the subtree, with the cost table measured on this machine (or a built-in one).
No model is evaluated: this times only the Python and numpy work the engine adds per round.

usage: python benchmarks/plan_overhead.py [--context 4096] [--rounds 300] [--target NAME]
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
import time

import numpy as np

from dovetail_gguf.costs import CostModel
from dovetail_gguf.plan import merge, plan_round
from dovetail_gguf.proposers import SuffixProposer, prediction_proposer
from dovetail_gguf.suffix import SuffixIndex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096, help="tokens of context before the timed rounds")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--target", default=None, help="model name or GGUF whose tokenizer makes the stream")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()

    import difflib
    import statistics

    from dovetail_gguf.target import Target, TargetConfig
    from dovetail_gguf.models import resolve_target

    text = textwrap.dedent(inspect.getsource(difflib) + inspect.getsource(statistics))
    with Target(resolve_target(a.target), TargetConfig(n_ctx=256, n_threads=1)) as t:
        stream = t.tokenize(text, add_special=False)
    need = a.context + 4 * a.rounds
    stream = np.resize(stream, need) if stream.size < need else stream[:need]  # repeats: long matches, as in edits
    costs = CostModel(None, 64)
    costs.table = {1: 44.0, 2: 49.5, 3: 82.1, 4: 67.4, 5: 127.3, 12: 196.6, 20: 340.7, 48: 498.6, 64: 437.6}

    t0 = time.perf_counter()
    index = SuffixIndex(stream[: a.context])
    build_ms = 1000 * (time.perf_counter() - t0)
    sources = [SuffixProposer(index), prediction_proposer(stream[: 8], stream[a.context : a.context + 512])]
    pos, per_round, rows = a.context, [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        tail = index.tokens[-64:].tolist()
        proposals = [s.propose(tail, 63) for s in sources]
        plan = plan_round(merge(int(stream[pos - 1]), proposals), costs.verify_ms, 64, 0.5)
        emitted = stream[pos : pos + max(1, plan.rows)].tolist()  # as if the plan were accepted
        for s, p in zip(sources, proposals):
            s.observe(p, emitted)
        index.extend(emitted)
        per_round.append(1000 * (time.perf_counter() - t0))
        rows.append(plan.rows)
        pos += len(emitted)
    out = {"context_tokens": a.context, "rounds": a.rounds, "index_build_ms": round(build_ms, 2),
           "per_round_ms_median": round(float(np.median(per_round)), 3),
           "per_round_ms_p90": round(float(np.percentile(per_round, 90)), 3),
           "rows_per_round": round(float(np.mean(rows)), 2)}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
