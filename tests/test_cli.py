"""The command line, run as a user runs it: a subprocess, real models, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def dovetail(*args, stdin: str | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "dovetail_gguf", *args], capture_output=True, text=True, input=stdin, timeout=timeout
    )


def test_help_lists_the_commands():
    r = dovetail("--help")
    assert r.returncode == 0
    for cmd in ("info", "generate", "chat"):
        assert cmd in r.stdout


def test_info(smollm2_path):
    r = dovetail("info", str(smollm2_path))
    assert r.returncode == 0, r.stderr
    assert "architecture: llama" in r.stdout and "vocab: 49152" in r.stdout
    assert "chat template: yes" in r.stdout and "Q4_1" in r.stdout


def test_generate_no_draft_json_matches_plain_text():
    args = ["generate", "The three primary colors are", "--no-draft", "--max-tokens", "24"]
    r = dovetail(*args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == out["stats"]["n_tokens"] == 24
    for key in ("tokens_per_second", "rounds", "mean_accepted_tokens"):
        assert key in out["stats"]
    assert out["stats"]["mean_accepted_tokens"] == 1.0  # no draft: one token per round
    plain = dovetail(*args)
    assert plain.returncode == 0
    assert plain.stdout == out["text"] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--no-draft", "--target", "/nonexistent/model.gguf"], "not found"),
        (["generate", "", "--no-draft"], "prompt is empty"),
        (["generate", "hi", "--no-draft", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--no-draft", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--no-draft", "--max-tokens", "0"], "max_tokens"),
        (["generate", "word " * 400, "--no-draft", "--ctx-size", "256"], "context holds 256"),
        (["generate", "1, 2, 3, 4, 5,", "--no-draft", "--ctx-size", "24", "--max-tokens", "100"], "context filled up"),
        (["info", "/nonexistent.gguf"], "not found"),
        (["train-draft", "/nonexistent/data", "-o", "/nonexistent/draft"], "run `dovetail data generate` first"),
    ],
)
def test_bad_input_gets_one_line_and_nonzero_exit(args, message):
    r = dovetail(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_not_gguf_and_truncated_files(tmp_path, smollm2_path):
    text = tmp_path / "model.gguf"
    text.write_text("definitely not gguf")
    r = dovetail("generate", "hi", "--no-draft", "--target", str(text))
    assert r.returncode == 2 and "not a GGUF" in r.stderr
    short = tmp_path / "short.gguf"
    short.write_bytes(smollm2_path.read_bytes()[: 40_000_000])
    r = dovetail("generate", "hi", "--no-draft", "--target", str(short))
    assert r.returncode == 2 and "truncated" in r.stderr


@pytest.mark.parametrize("command", [["info"], ["generate"], ["chat"], ["draft", "init"], ["data", "prompts"],
                                     ["data", "generate"], ["train-draft"], ["bench"], ["serve"], ["convert"]])
def test_every_command_explains_itself(command):
    from click.testing import CliRunner

    from dovetail_gguf.cli import main

    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Usage: ") and "Options:" in r.output
    described = r.output.split("Options:")[0].strip().splitlines()
    assert len(described) >= 3  # usage, a blank line, a description
    assert "--help" in r.output


def test_llama_cpp_short_flags_run_as_the_long_ones():
    """-m, -p, -n, -c, -t, -ngl as in llama.cpp: the same answer as the long flags and the PROMPT argument."""
    from click.testing import CliRunner

    from dovetail_gguf.cli import main

    prompt = "The three primary colors are"
    short = CliRunner().invoke(main, ["generate", "-m", "smollm2-135m", "-p", prompt, "-n", "8", "-c", "512", "-t", "2",
                                      "-ngl", "0", "--no-draft", "--json"])
    assert short.exit_code == 0, short.output
    long = CliRunner().invoke(main, ["generate", prompt, "--target", "smollm2-135m", "--max-tokens", "8", "--ctx-size",
                                     "512", "--threads", "2", "--target-gpu-layers", "0", "--no-draft", "--json"])
    assert long.exit_code == 0, long.output
    out = json.loads(short.output)
    assert out["stats"]["n_tokens"] == 8 and out["tokens"] == json.loads(long.output)["tokens"]
    small = CliRunner().invoke(main, ["generate", "-p", "1, 2, 3, 4, 5,", "-c", "24", "-n", "100", "--no-draft"])
    assert small.exit_code == 2 and "n_ctx 24" in small.output  # -c reached the target
    both = CliRunner().invoke(main, ["generate", prompt, "-p", prompt, "--no-draft"])
    assert both.exit_code == 2 and "-p/--prompt" in both.output
    neither = CliRunner().invoke(main, ["generate", "--no-draft"])
    assert neither.exit_code == 2 and "-p/--prompt" in neither.output


@pytest.mark.parametrize("command", ["generate", "chat", "bench", "serve"])
def test_short_flags_reach_the_same_parameters(command):
    from dovetail_gguf.cli import main

    cmd = main.commands[command]
    args = ["-m", "qwen2.5-coder-0.5b", "-c", "2048", "-t", "3", "-ngl", "7"]
    if command in ("generate", "chat", "serve"):
        args += ["-n", "33"]
    if command == "generate":
        args += ["-p", "hi"]
    params = cmd.make_context(command, args).params
    assert (params["target"], params["ctx_size"], params["threads"], params["gpu_layers"]) == ("qwen2.5-coder-0.5b", 2048, 3, 7)
    if command in ("generate", "chat"):
        assert params["max_tokens"] == 33
    if command == "serve":
        assert params["default_max_tokens"] == 33
    if command == "generate":
        assert params["prompt_option"] == "hi"


def test_structured_output_and_the_sampling_set_from_the_command_line(tmp_path):
    grammar = tmp_path / "yesno.gbnf"
    grammar.write_text('root ::= ("yes" | "no") "."\n')
    r = dovetail("generate", "Is the sky blue? Answer:", "--grammar", str(grammar), "--max-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] in ("yes.", "no.")
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false}'
    r = dovetail("generate", "A number as JSON:", "--json-schema", schema, "--max-tokens", "24", "--json",
                 "--logprobs", "2", "--temperature", "0.7", "--min-p", "0.05", "--frequency-penalty", "0.5",
                 "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(json.loads(out["text"])["n"], int)
    assert len(out["logprobs"]) == len(out["tokens"]) and all(len(e["top"]) == 2 for e in out["logprobs"])
    for args, message in ((["--logit-bias", "5"], "TOKEN=BIAS"), (["--grammar", str(tmp_path / "none.gbnf")], "cannot read"),
                          (["--logprobs", "2"], "--json"), (["--min-p", "2"], "min_p"),
                          (["--grammar", str(grammar), "--json-schema", "{}"], "not several")):
        r = dovetail("generate", "x", "--max-tokens", "2", *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
