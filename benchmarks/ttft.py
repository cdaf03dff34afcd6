#!/usr/bin/env python3
"""Time to the first token of a long prompt: Dovetail (default draft loaded, so the prompt's hidden
states are kept for it) against llama-cpp-python's ``Llama`` on the same file and threads.

Each trial starts from an empty cache on both sides (the same ~1,500-token prompt: Python stdlib
source), interleaved; reports the medians and their ratio.

    .venv/bin/python benchmarks/ttft.py --target qwen2.5-coder-0.5b --trials 5 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import textwrap

    from llama_cpp import Llama

    from dovetail_gguf import Dovetail
    from dovetail_gguf.models import resolve_target
    from dovetail_gguf.target import TargetConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-draft", action="store_true", help="Dovetail without its draft (no hidden states kept)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    path = resolve_target(a.target)
    dt = Dovetail(path, False if a.no_draft else None, target_config=TargetConfig(n_ctx=4096, n_threads=a.threads))
    llm = Llama(model_path=str(path), n_ctx=4096, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    import json as json_module

    source = textwrap.dedent(inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder))
    tokens = dt.tokenize_prompt(source)[: a.tokens]

    ours, theirs = [], []
    for _ in range(a.trials):
        dt.target.reset()
        t0 = time.perf_counter()
        stream = dt.stream_tokens(tokens, max_tokens=2)
        next(iter(stream))
        ours.append(time.perf_counter() - t0)
        stream.close()
        llm.reset()
        t0 = time.perf_counter()
        for _ in llm.create_completion(tokens, max_tokens=2, temperature=0.0, stream=True):
            break
        theirs.append(time.perf_counter() - t0)
        print(f"dovetail {ours[-1]:.2f} s, llama-cpp-python {theirs[-1]:.2f} s", file=sys.stderr)
    summary = {"prompt_tokens": len(tokens), "draft": dt.drafter_path is not None and str(dt.drafter_path),
               "dovetail_s": statistics.median(ours), "llama_cpp_python_s": statistics.median(theirs),
               "ratio": statistics.median(ours) / statistics.median(theirs)}
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "dovetail": ours, "llama_cpp_python": theirs,
                                            "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
