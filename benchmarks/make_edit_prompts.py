"""Writes benchmarks/prompts/edit.jsonl: code-edit requests built from this Python's standard library.

Each request gives a function's full source and asks for one edit that keeps most of the code
(rename a parameter, add comments, add type hints, ...), and the whole function back: the
requests editors send all day. No HumanEval problem is used. Run with the project's Python:

    .venv/bin/python benchmarks/make_edit_prompts.py [--n 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import random
import textwrap
from pathlib import Path

MODULES = ["textwrap", "shlex", "fnmatch", "posixpath", "heapq", "bisect", "difflib", "csv", "calendar", "colorsys",
           "quopri", "base64", "glob", "string", "statistics", "graphlib", "ipaddress", "gettext", "tokenize",
           "html", "urllib.parse", "email.utils", "json.encoder", "dataclasses", "inspect", "pprint", "zipfile"]
INSTRUCTIONS = [
    "Rename the parameter `{param}` to `{new}` everywhere in this function and return the whole function.",
    "Add a short comment above every `if`, `for` and `while` statement of this function and return the whole function.",
    "Add type hints to this function's signature and return the whole function, otherwise unchanged.",
    "Replace the docstring of this function with a better one and return the whole function.",
    "Fix any style issues in this function (PEP 8) without changing its behaviour, and return the whole function.",
]


def functions(min_lines: int = 12, max_lines: int = 45):
    for name in MODULES:
        mod = importlib.import_module(name)
        for _, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__:
                continue
            try:
                src = textwrap.dedent(inspect.getsource(fn))
            except (OSError, TypeError):
                continue
            if min_lines <= src.count("\n") <= max_lines:
                args = [a.arg for a in ast.parse(src).body[0].args.args if a.arg not in ("self", "cls")]
                yield f"{name}.{fn.__name__}", src, args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=str(Path(__file__).parent / "prompts" / "edit.jsonl"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    pool = sorted(functions())
    rng.shuffle(pool)
    rows = []
    for i, (where, src, args) in enumerate(pool[: a.n]):
        kind = i % len(INSTRUCTIONS)
        if kind == 0 and not args:
            kind = 1
        param = args[0] if args else ""
        text = INSTRUCTIONS[kind].format(param=param, new=f"{param}_value")
        rows.append({"prompt": f"```python\n{src}```\n\n{text}", "source": where})
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    with open(a.output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} requests to {a.output}")


if __name__ == "__main__":
    main()
