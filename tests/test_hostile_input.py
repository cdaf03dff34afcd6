"""Hostile input costs no data and no process: table-driven cases against the CLI and the API.

Every CLI case asserts exit code 2, exactly one line on stderr and no traceback;
the data-loss cases also assert that every file that existed is still there,
byte for byte. Most cases stop before any model decode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dovetail_gguf.draft.io import init_draft, is_draft_dir, save_draft
from dovetail_gguf.errors import InvalidArgumentError


def dovetail(*args, cwd=None, timeout: float = 300, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "dovetail_gguf", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, input=stdin)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(r, message: str = "") -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


@pytest.fixture
def user_folder(tmp_path):
    """A folder of a user's own files, a subfolder included."""
    home = tmp_path / "work"
    (home / "src").mkdir(parents=True)
    (home / "notes.txt").write_text("my notes\n")
    (home / "src" / "main.py").write_text("print('hello')\n")
    return home


@pytest.fixture
def fake_data(tmp_path):
    """A folder that looks like training data (manifest + shard names), made by hand."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"target": {"name": "x"}, "shards": []}))
    (d / "shard-00000.safetensors").write_bytes(b"\0" * 64)
    return d


# ------------------------------------------------------------------ data loss: output folders
@pytest.mark.parametrize("output, force", [(".", True), ("", True), ("/", True), (".", False), ("..", True)])
def test_draft_init_never_replaces_the_current_folder_or_root(user_folder, output, force):
    before = snapshot(user_folder)
    r = dovetail("draft", "init", "-o", output, *(["--force"] if force else []), cwd=user_folder)
    assert_one_line_error(r)
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("force", [False, True])
def test_draft_init_refuses_an_existing_folder_that_is_not_a_draft(user_folder, tmp_path, force):
    before = snapshot(user_folder)
    r = dovetail("draft", "init", "-o", str(user_folder), *(["--force"] if force else []), cwd=tmp_path)
    assert_one_line_error(r, "--force" if not force else "not a draft folder")
    assert snapshot(user_folder) == before


def test_draft_init_force_replaces_a_draft_folder(tmp_path, smollm2_path):
    out = save_draft(init_draft(smollm2_path, n_layer=1, draft_vocab=256), tmp_path / "draft")
    (out / "stray.txt").write_text("replaced with the folder")
    r = dovetail("draft", "init", "-o", str(out), "--layers", "1", "--draft-vocab", "512")
    assert_one_line_error(r, "--force")
    r = dovetail("draft", "init", "-o", str(out), "--layers", "1", "--draft-vocab", "512", "--force")
    assert r.returncode == 0, r.stderr
    assert is_draft_dir(out) and json.loads((out / "config.json").read_text())["draft_vocab"] == 512
    assert not (out / "stray.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]  # no temporary folders left


@pytest.mark.parametrize("which", ["data", "user", "cwd"])
@pytest.mark.parametrize("force", [False, True])
def test_train_draft_never_deletes_its_data_or_a_users_folder(fake_data, user_folder, which, force):
    out = {"data": str(fake_data), "user": str(user_folder), "cwd": "."}[which]
    before_data, before_user = snapshot(fake_data), snapshot(user_folder)
    r = dovetail("train-draft", str(fake_data), "-o", out, *(["--force"] if force else []), cwd=user_folder)
    assert_one_line_error(r)
    assert snapshot(fake_data) == before_data and snapshot(user_folder) == before_user


def test_save_draft_refuses_non_finite_weights(tmp_path, smollm2_path):
    import torch

    model = init_draft(smollm2_path, n_layer=1, draft_vocab=256)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        save_draft(model, tmp_path / "nan")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ data loss: output files
def test_data_prompts_refuses_to_overwrite_and_reports_a_shortfall(tmp_path):
    existing = tmp_path / "prompts.jsonl"
    existing.write_text("precious\n")
    r = dovetail("data", "prompts", "-o", str(existing), "--code", "0", "--chat", "3")
    assert_one_line_error(r, "--force")
    assert existing.read_text() == "precious\n"
    r = dovetail("data", "prompts", "-o", str(existing), "--code", "0", "--chat", "1000000000", "--force")
    assert r.returncode == 0, r.stderr
    n_rows = len(existing.read_text().splitlines())
    assert 0 < n_rows < 1000000000
    assert f"chat {n_rows} of 1000000000" in r.stderr and "fewer prompts than asked" in r.stderr


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_checks_its_output_files_before_running(tmp_path, flag):
    existing = tmp_path / "report"
    existing.write_text("last week's figures\n")
    t0 = time.perf_counter()
    r = dovetail("bench", "--n", "1", "--no-draft", flag, str(existing))
    assert_one_line_error(r, "--force")
    assert existing.read_text() == "last week's figures\n"
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    r = dovetail("bench", "--n", "1", "--no-draft", flag, str(blocked / "out.json"))
    assert_one_line_error(r, "not a folder")
    assert time.perf_counter() - t0 < 60  # refused up front, not after a benchmark


# ------------------------------------------------------------------ data loss: conversion killed
def test_convert_killed_with_sigterm_leaves_no_part_files(tmp_path):
    """SIGTERM in the middle of writing removes the partial output, as Ctrl-C does; a stale .part of an
    earlier SIGKILLed run is removed by the next run."""
    src = tmp_path / "ckpt"
    src.mkdir()
    out = tmp_path / "model.gguf"
    stale = tmp_path / f".{out.name}.abc123.part"
    stale.write_bytes(b"\0" * 1024)
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import convert.hf as hf
        hf.read_hf = lambda src: "checkpoint"
        hf.check_shapes = lambda ck: None
        def slow_write(ck, src, path, outtype, progress):
            Path(path).write_bytes(b"x" * 4096)
            print("writing", flush=True)
            time.sleep(60)
        hf.write_gguf = slow_write
        hf.convert({str(src)!r}, {str(out)!r}, "f16", progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.readline().strip() == "writing"
    assert not stale.exists()  # removed when the run started
    assert list(tmp_path.glob(".model.gguf.*.part"))  # the run's own partial file
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not out.exists() and not list(tmp_path.glob(".model.gguf.*"))


def test_convert_refuses_a_negative_rms_norm_eps(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "intermediate_size": 128, "rms_norm_eps": -1e-5}
    (src / "config.json").write_text(json.dumps(cfg))
    r = dovetail("convert", str(src), "-o", str(tmp_path / "out.gguf"))
    assert_one_line_error(r, "rms_norm_eps must be a positive number")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out.gguf*"))


# ------------------------------------------------------------------ API misuse
@pytest.fixture(scope="module")
def plain_dt(smollm2_path):
    from dovetail_gguf import Dovetail
    from dovetail_gguf.target import TargetConfig

    dt = Dovetail(smollm2_path, False, target_config=TargetConfig(n_ctx=512, n_threads=2))
    yield dt
    dt.close()


def test_chat_reads_a_generator_of_messages_once(plain_dt):
    messages = [{"role": "user", "content": "Name a colour."}]
    want = plain_dt.chat(messages, max_tokens=4)
    got = plain_dt.chat((m for m in messages), max_tokens=4)
    assert got.tokens == want.tokens and got.stats.n_prompt_tokens == want.stats.n_prompt_tokens > 5


def test_reentrant_use_from_one_thread_is_an_error_not_a_hang(plain_dt):
    s = plain_dt.stream("One, two,", max_tokens=8)
    next(iter(s))
    with pytest.raises(InvalidArgumentError, match="already running a generation"):
        plain_dt.generate("Three", max_tokens=2)
    other = plain_dt.stream("Four", max_tokens=2)
    with pytest.raises(InvalidArgumentError, match="already running a generation"):
        next(iter(other))
    s.close()
    assert plain_dt.generate("Five", max_tokens=2).stats.n_tokens == 2  # free again


def test_calls_after_close_raise(smollm2_path):
    from dovetail_gguf import Dovetail

    dt = Dovetail(smollm2_path, False)
    dt.close()
    for call in (lambda: dt.generate("hi", max_tokens=2), lambda: dt.stream_tokens([1, 2]),
                 lambda: dt.chat([{"role": "user", "content": "hi"}]), lambda: dt.target.decode_one(1)):
        with pytest.raises(InvalidArgumentError, match="closed"):
            call()


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb"])
def test_text_that_is_not_unicode_is_refused(plain_dt, text):
    with pytest.raises(InvalidArgumentError, match="not valid Unicode"):
        plain_dt.generate(text, max_tokens=2)
    with pytest.raises(InvalidArgumentError, match="not valid Unicode"):
        plain_dt.chat([{"role": "user", "content": text}], max_tokens=2)


def test_lone_surrogate_on_the_command_line_is_one_line():
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "dovetail_gguf", "generate", "-", "--no-draft", "--max-tokens", "2"],
                       input=b"\xed\xa0\x80 bad bytes \xff", capture_output=True, env=env, timeout=300)
    assert r.returncode in (0, 2), r.stderr
    assert b"Traceback" not in r.stderr


# ------------------------------------------------------------------ metadata llama.cpp would abort on
def patched_gguf(src: Path, dst: Path, key: str, fmt: str, value) -> Path:
    """A copy of ``src`` with the scalar metadata ``key`` overwritten in place (same type and size)."""
    import struct

    data = bytearray(src.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name)
    assert at > 0, key
    value_at = at + 8 + len(name) + 4  # key length, key, value type
    struct.pack_into("<" + fmt, data, value_at, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("key, fmt, value, message", [
    ("llama.block_count", "I", 1000, "block_count is 1000"),
    ("tokenizer.ggml.eos_token_id", "I", 10**6, "outside the vocabulary"),
    ("llama.attention.layer_norm_rms_epsilon", "f", -1e-5, "must be a positive number"),
    ("llama.attention.head_count_kv", "I", 4, "not a multiple"),
    ("llama.rope.freq_base", "f", float("nan"), "freq_base must be a positive number"),
])
def test_metadata_that_aborts_llama_cpp_is_refused_before_it(tmp_path, smollm2_path, key, fmt, value, message):
    bad = patched_gguf(smollm2_path, tmp_path / "bad.gguf", key, fmt, value)
    for args in (["info", str(bad)], ["generate", "hi", "--no-draft", "--max-tokens", "2", "--target", str(bad)]):
        r = dovetail(*args)
        assert_one_line_error(r, message)


def test_a_closed_stream_reports_cancelled_not_length(plain_dt):
    s = plain_dt.stream("One, two, three,", max_tokens=50)
    next(iter(s))
    s.close()
    assert s.result.finish_reason == "cancelled" and 0 < s.result.stats.n_tokens < 50


def test_serve_refuses_an_empty_api_key():
    r = dovetail("serve", "--api-key", "", "--no-draft")
    assert_one_line_error(r, "API key is empty")
    r = subprocess.run([sys.executable, "-m", "dovetail_gguf", "serve", "--no-draft"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "DOVETAIL_API_KEY": ""})
    assert_one_line_error(r, "API key is empty")


# ------------------------------------------------------------------ damaged drafts, data and prompt files
@pytest.fixture(scope="module")
def good_draft(tmp_path_factory, smollm2_path):
    return save_draft(init_draft(smollm2_path, n_layer=1, draft_vocab=256), tmp_path_factory.mktemp("g") / "draft")


def damaged_copy(src: Path, dst: Path, config=None, weights=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if config is not None:
        doc = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(doc)))
    if weights is not None:
        from safetensors.torch import load_file, save_file

        save_file(weights(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "dovetail-draft"})
    return dst


DRAFT_DAMAGE = {
    "config is a list": (lambda d: [d], None, "not a dovetail draft config"),
    "config is null": (lambda d: None, None, "not a dovetail draft config"),
    "layers as text": (lambda d: {**d, "n_layer": "two"}, None, "n_layer must be an integer"),
    "zero width": (lambda d: {**d, "n_embd": 0}, None, "n_embd must be in"),
    "absurd width": (lambda d: {**d, "n_embd": 10**9}, None, "n_embd must be in"),
    "no kv heads": (lambda d: {**d, "n_kv_head": 0}, None, "n_kv_head must be in"),
    "negative eps": (lambda d: {**d, "rms_norm_eps": -1}, None, "rms_norm_eps"),
    "d2t missing": (None, lambda w: {k: v for k, v in w.items() if k != "d2t"}, "d2t"),
    "d2t short": (None, lambda w: {**w, "d2t": w["d2t"][:10]}, "d2t"),
    "d2t out of range": (None, lambda w: {**w, "d2t": w["d2t"] + 10**6}, "outside the vocabulary"),
    "weight of the wrong shape": (None, lambda w: {**w, "fusion.w1.weight": w["fusion.w1.weight"][:5]}, "does not match"),
    "weight missing": (None, lambda w: {k: v for k, v in w.items() if k != "fusion.w1.weight"}, "does not match"),
}


@pytest.mark.parametrize("case", sorted(DRAFT_DAMAGE))
def test_damaged_draft_folders_are_one_error(good_draft, tmp_path, smollm2_path, case):
    from dovetail_gguf.draft.io import load_draft
    from dovetail_gguf.errors import ModelFileError

    config, weights, message = DRAFT_DAMAGE[case]
    bad = damaged_copy(good_draft, tmp_path / "bad", config, weights)
    with pytest.raises(ModelFileError, match=message):
        load_draft(bad, smollm2_path)


def test_a_damaged_draft_on_the_command_line(good_draft, tmp_path):
    bad = damaged_copy(good_draft, tmp_path / "bad", lambda d: {**d, "n_kv_head": 0})
    assert_one_line_error(dovetail("generate", "hi", "--draft", str(bad), "--max-tokens", "2"), "n_kv_head")


def test_draft_init_with_a_vocabulary_larger_than_the_targets(tmp_path):
    assert_one_line_error(dovetail("draft", "init", "-o", str(tmp_path / "d"), "--draft-vocab", "60000"),
                          "draft vocabulary must be in 1..49152")


@pytest.mark.parametrize("case", ["no manifest", "manifest not JSON", "manifest is a list", "no target",
                                  "shard missing", "shard truncated"])
def test_damaged_data_folders_are_one_error(tmp_path, case):
    from dovetail_gguf.train.data import load_shards

    d = tmp_path / "data"
    d.mkdir()
    manifest = {"target": {"name": "x", "tokenizer_fingerprint": "f"}, "shards": [{"file": "shard-00000.safetensors"}]}
    if case != "no manifest":
        text = {"manifest not JSON": "{oops", "manifest is a list": "[]",
                "no target": json.dumps({"shards": []})}.get(case, json.dumps(manifest))
        (d / "manifest.json").write_text(text)
    if case == "shard truncated":
        (d / "shard-00000.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(InvalidArgumentError):
        load_shards(d)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe binary \x00\x01", "not UTF-8"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", "nested too deeply|expected a JSON object"),
    (b'{"prompt": 3}\n', "needs 'conversations', 'prompt' or 'text'"),
])
def test_bad_prompt_files_are_one_error(tmp_path, content, message):
    from dovetail_gguf.train.data import read_prompts

    p = tmp_path / "p.jsonl"
    p.write_bytes(content)
    with pytest.raises(InvalidArgumentError, match=message):
        read_prompts(p)


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "learning rate"),
    (["--weight-decay", "nan"], "weight decay"),
    (["--seed", str(2**70)], "seed must fit"),
])
def test_train_draft_options_are_checked_before_any_work(fake_data, tmp_path, args, message):
    r = dovetail("train-draft", str(fake_data), "-o", str(tmp_path / "out"), *args)
    assert_one_line_error(r, message)


def test_draft_init_refuses_a_seed_torch_cannot_take(tmp_path):
    r = dovetail("draft", "init", "-o", str(tmp_path / "d"), "--seed", "99999999999999999999999")
    assert_one_line_error(r, "seed must fit")
    assert not (tmp_path / "d").exists()


def test_data_generate_refuses_a_nan_temperature(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hi"}\n')
    assert_one_line_error(dovetail("data", "generate", str(p), "-o", str(tmp_path / "d"), "--temperature", "nan"),
                          "temperature")


def test_target_settings_llama_cpp_would_abort_on_are_refused(smollm2_path):
    from dovetail_gguf.target import Target, TargetConfig

    with pytest.raises(InvalidArgumentError, match="n_batch must be at least"):
        Target(smollm2_path, TargetConfig(n_batch=1, max_tree_nodes=1))
