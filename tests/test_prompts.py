"""The training prompt file: built from this machine's own text, valid Python, nothing from HumanEval."""

import ast
import json

from click.testing import CliRunner

from dovetail_gguf.bench import humaneval_prompts
from dovetail_gguf.cli import main
from dovetail_gguf.train.prompts import doctest_function_prompts, write_prompt_file


def test_doctest_prompts_are_humaneval_shaped_python():
    prompts = doctest_function_prompts(30, seed=1, packages=())
    assert len(prompts) == 30
    for prompt in prompts:
        tree = ast.parse(prompt + "    pass\n")  # signature + docstring, the body left to the target
        func = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
        assert f">>> {func.name}(" in ast.get_docstring(func)
        assert not func.args.args or func.args.args[0].arg not in ("self", "cls")
    assert doctest_function_prompts(30, seed=1, packages=()) == prompts  # seeded
    assert doctest_function_prompts(30, seed=2, packages=()) != prompts


def test_prompt_file_mixes_sources_and_shares_nothing_with_humaneval(tmp_path):
    path, counts = write_prompt_file(tmp_path / "p.jsonl", n_code=6, n_chat=4, seed=0, n_doctest=5, n_requests=7)
    assert counts == {"code": 6, "chat": 4, "doctest": 5, "requests": 7}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 22
    chats = [r["conversations"][0]["content"] for r in rows if "conversations" in r]
    assert len(chats) == 11
    requests = [c for c in chats if "`" in c]  # "Write a Python function `name(args)` that ..."
    assert len(requests) == 7
    for request in requests:  # the quoted signature parses as a call-shaped Python signature
        sig = request.split("`")[1]
        ast.parse(f"def {sig}: pass")
    raw = [r["prompt"] for r in rows if "prompt" in r]
    assert sum(">>>" in p for p in raw) >= 5
    # no HumanEval docstring line appears in the training prompts
    lines = {ln.strip() for p in humaneval_prompts() for ln in p.splitlines() if len(ln.strip()) > 30}
    assert not any(ln.strip() in lines for p in raw + requests for ln in p.splitlines())


def test_data_prompts_with_no_counts_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["data", "prompts", "-o", str(tmp_path / "p.jsonl"), "--code", "0", "--chat", "0"])
    assert result.exit_code != 0
    assert "no prompts" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.jsonl").exists()
