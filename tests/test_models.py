"""Model names and assembling a target from PyPI slices: checked, atomic, clear when something is missing."""

from __future__ import annotations

import hashlib

import pytest

from dovetail_gguf import models
from dovetail_gguf.errors import ModelFileError
from dovetail_gguf.gguf_io import read_facts


def make_parts(tmp_path, chunks: list[bytes]):
    parts = []
    for i, data in enumerate(chunks):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        parts.append(p)
    return parts


def test_assemble_checks_sha256_and_leaves_nothing_on_failure(tmp_path):
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(chunks)
    parts = make_parts(tmp_path, chunks)
    out = tmp_path / "cache" / "model.gguf"
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ModelFileError, match="sha256"):
        models.assemble(parts, out, len(whole), wrong)
    assert not out.exists() and not list(out.parent.glob(".*"))  # no file under the final name, no temporary
    with pytest.raises(ModelFileError, match="bytes"):
        models.assemble(parts, out, len(whole) + 1, hashlib.sha256(whole).hexdigest())
    parts[1].unlink()
    with pytest.raises(ModelFileError, match="missing"):
        models.assemble(parts, out, len(whole), hashlib.sha256(whole).hexdigest())
    assert not out.exists()
    parts = make_parts(tmp_path, chunks)
    assert models.assemble(parts, out, len(whole), hashlib.sha256(whole).hexdigest()).read_bytes() == whole


def test_a_missing_part_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    entry = models.REGISTRY["qwen2.5-coder-0.5b"]
    broken = models.RegisteredModel(entry.name, entry.description,
                                    models.PackagedFile(entry.source.package, entry.source.module, "x.gguf",
                                                        parts=("no_such_part_module",), size=1, sha256="0"),
                                    extra="qwen")
    with pytest.raises(ModelFileError, match=r"dovetail-gguf\[qwen\]"):
        models.model_file(broken)
    assert not (tmp_path / "x.gguf").exists()


def test_names_resolve_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.delenv(models.TARGET_ENV, raising=False)
    assert models.resolve_target("smollm2-135m") == models.default_target_path()
    assert read_facts(models.resolve_target(None)).architecture == "llama"
    with pytest.raises(ModelFileError, match="unknown model 'gpt-17'"):
        models.resolve_target("gpt-17")


@pytest.mark.slow
def test_qwen_assembles_once_into_the_cache(qwen_path):
    facts = read_facts(qwen_path)
    assert facts.architecture == "qwen2" and facts.n_embd == 896 and facts.n_layer == 24
    assert qwen_path.stat().st_size == models.REGISTRY["qwen2.5-coder-0.5b"].source.size
    mtime = qwen_path.stat().st_mtime_ns
    assert models.resolve_target("qwen2.5-coder-0.5b") == qwen_path  # reused, not rebuilt
    assert qwen_path.stat().st_mtime_ns == mtime


def test_the_shipped_draft_is_found_by_its_target(smollm2_path):
    draft = models.default_draft_for(read_facts(smollm2_path))
    assert draft is not None and (draft / "config.json").is_file()
