"""Writes benchmarks/prompts/fim.jsonl and fim_repeat.jsonl: fill-in-the-middle requests built from this
Python's standard library, as an editor sends them (llama.vim's /infill).

``fim.jsonl``: a middle of 1-20 lines held out of a function's body; the lines of the module before it
are the prefix and those after it the suffix (at most PREFIX_LINES / SUFFIX_LINES of them, as an
editor sends the text around the cursor), and two chunks of other modules of the library are the
``extra`` files. ``fim_repeat.jsonl``: the same requests, but one extra chunk is the function as it
was before a small edit elsewhere in it (a user re-completing after changing a line), so the middle
stands in the context word for word. Each row keeps the held-out ``middle`` for the exact-match rate.
No HumanEval problem and none of this project's files are used. Run with the project's Python:

    .venv/bin/python benchmarks/make_fim_prompts.py [--n 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import keyword
import random
import re
from pathlib import Path

MODULES = ["textwrap", "shlex", "fnmatch", "posixpath", "heapq", "bisect", "difflib", "csv", "calendar", "colorsys",
           "quopri", "base64", "glob", "string", "statistics", "graphlib", "ipaddress", "gettext", "tokenize",
           "html", "urllib.parse", "email.utils", "json.encoder", "dataclasses", "pprint", "zipfile", "fractions",
           "argparse", "configparser", "shutil", "tempfile", "secrets", "random", "locale", "netrc", "plistlib"]
PREFIX_LINES, SUFFIX_LINES, CHUNK_LINES = 60, 30, 40


def functions(min_body: int = 6):
    """(module, its source lines, a function's first and last body line, 0-based) across MODULES."""
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
            lines = inspect.getsource(mod).splitlines(keepends=True)
        except (ImportError, OSError, TypeError):
            continue
        for node in ast.walk(ast.parse("".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) >= 2:
                first = node.body[1 if isinstance(node.body[0], ast.Expr) else 0].lineno - 1  # after a docstring
                last = node.end_lineno - 1
                if last - first + 1 >= min_body:
                    yield name, lines, first, last, node.name


def chunk(rng: random.Random, name: str) -> dict:
    """CHUNK_LINES lines of another module, as an editor's extra context."""
    lines = inspect.getsource(importlib.import_module(name)).splitlines(keepends=True)
    start = rng.randrange(0, max(1, len(lines) - CHUNK_LINES))
    return {"filename": name.replace(".", "/") + ".py", "text": "".join(lines[start: start + CHUNK_LINES])}


def small_edit(lines: list[str], first: int, last: int, lo: int, hi: int) -> list[str] | None:
    """The function's lines as they were before a one-line edit outside the middle [lo, hi): the
    line's last name was another one (the user renamed it)."""
    for i in range(first, last + 1):
        if lo <= i < hi:
            continue
        names = [m for m in re.finditer(r"\b[A-Za-z_]\w*\b", lines[i]) if not keyword.iskeyword(m.group())]
        if names:
            m = names[-1]
            edited = list(lines[first: last + 1])
            edited[i - first] = lines[i][: m.start()] + m.group() + "_old" + lines[i][m.end():]
            return edited
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output-dir", default=str(Path(__file__).parent / "prompts"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    pool = sorted(functions(), key=lambda f: (f[0], f[2]))
    rng.shuffle(pool)
    plain_rows, repeat_rows, used = [], [], set()
    for name, lines, first, last, fn in pool:
        if len(plain_rows) == a.n:
            break
        if name in used:  # one request per module: a spread of code
            continue
        size = rng.randint(1, min(20, last - first))
        lo = rng.randint(first, last + 1 - size)
        hi = lo + size
        middle = "".join(lines[lo:hi])
        if not middle.strip():
            continue
        before = small_edit(lines, first, last, lo, hi)
        if before is None:
            continue
        used.add(name)
        others = rng.sample([m for m in MODULES if m != name], 2)
        row = {"prefix": "".join(lines[max(0, lo - PREFIX_LINES): lo]), "suffix": "".join(lines[hi: hi + SUFFIX_LINES]),
               "extra": [chunk(rng, m) for m in others], "middle": middle, "source": f"{name}.{fn}:{lo + 1}-{hi}"}
        plain_rows.append(row)
        edited_file = {"filename": name.replace(".", "/") + ".py", "text": "".join(before)}
        repeat_rows.append({**row, "extra": [row["extra"][0], edited_file]})
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file, rows in (("fim.jsonl", plain_rows), ("fim_repeat.jsonl", repeat_rows)):
        with open(out / file, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} requests to {out / file}")


if __name__ == "__main__":
    main()
