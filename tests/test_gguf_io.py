"""GGUF reading without llama.cpp, and the exported embedding / LM head against llama.cpp's logits."""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_gguf.errors import ModelFileError
from dovetail_gguf.gguf_io import open_gguf, read_facts, read_token_matrices
from dovetail_gguf.target import Target, TargetConfig


def head_tensor_type(path) -> str:
    """The GGML type name of the tensor llama.cpp uses as LM head."""
    gf = open_gguf(path)
    return gf.tensors.get("output.weight", gf.tensors["token_embd.weight"]).type_name


def test_facts_of_smollm2(smollm2_path):
    f = read_facts(smollm2_path)
    assert (f.architecture, f.n_embd, f.n_layer, f.n_vocab) == ("llama", 576, 30, 49152)
    assert f.n_head == 9 and f.n_head_kv == 3
    assert f.tied_head and f.has_chat_template and "<|im_start|>" in f.chat_template
    assert f.bos_token_id == 1 and f.eos_token_id == 2
    assert len(f.tokenizer_fingerprint) == 16
    assert f.quant_types["Q4_1"] > 0


def test_fingerprint_tells_tokenizers_apart(smollm2_path, gemma_path):
    assert read_facts(smollm2_path).tokenizer_fingerprint != read_facts(gemma_path).tokenizer_fingerprint
    assert read_facts(smollm2_path).tokenizer_fingerprint == read_facts(str(smollm2_path)).tokenizer_fingerprint


def test_bad_files(tmp_path, smollm2_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_facts(tmp_path / "missing.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_facts(text)
    with pytest.raises(ModelFileError, match="not a file"):
        read_facts(tmp_path)
    data = smollm2_path.read_bytes()
    for cut in (1000, len(data) // 2):  # inside the metadata, inside the tensor data
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated|damaged"):
            read_facts(short)
        with pytest.raises(ModelFileError):
            Target(short)


def ggml_activation_roundtrip(x: np.ndarray, head_type: str) -> np.ndarray:
    """Round a hidden state the way ggml quantizes activations for a dot product with ``head_type``.

    Q8_0 / Q4_x / Q5_x weights take Q8_0 activations (blocks of 32, fp16 scale
    amax/127); K-quants take Q8_K (blocks of 256, fp32 scale); f16 weights take f16.
    """
    if head_type in ("F32",):
        return x
    if head_type in ("F16", "BF16"):
        return x.astype(np.float16).astype(np.float32)
    block = 256 if head_type.endswith("_K") else 32
    b = x.reshape(x.shape[0], -1, block).astype(np.float32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    d = amax / 127.0
    if block == 32:
        d = d.astype(np.float16).astype(np.float32)
        inv = np.where(amax > 0, 127.0 / amax, 0.0)
    else:
        inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    q = np.clip(np.rint(b * inv), -127, 127)
    return (q * d).reshape(x.shape)


def check_head(path, n_ctx=256):
    embd, head = read_token_matrices(path)
    with Target(path, TargetConfig(n_ctx=n_ctx, n_threads=2)) as t:
        assert tuple(head.shape) == (t.n_vocab, t.n_embd)
        prompt = t.tokenize("Speculative decoding verifies many draft tokens at once, so")
        t.prefill(prompt)
        res = t.verify_tree(np.array([prompt[-1], 11, 12, 13], dtype=np.int32), np.array([-1, 0, 1, 1]))
        logits, hidden = res.logits.copy(), res.hidden.copy()
        t.commit([0])
    w = head.numpy()
    raw = hidden @ w.T
    emulated = ggml_activation_roundtrip(hidden, head_tensor_type(path)) @ w.T
    raw_err = np.abs(raw - logits).max()
    # with ggml's activation rounding reproduced, the head picks llama.cpp's token on every row; the raw
    # product (errors up to raw_err) only where llama.cpp's top two logits are further apart than that
    # (a Gemma 3 row here has them 0.15 apart, and its raw argmax is the runner-up on an AVX2-only CPU)
    assert (emulated.argmax(1) == logits.argmax(1)).all()
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * raw_err
    assert (raw.argmax(1) == logits.argmax(1))[clear].all()
    return raw_err, np.abs(emulated - logits).max()


def test_exported_head_reproduces_smollm2_logits(smollm2_path):
    raw, emulated = check_head(smollm2_path)
    # ggml rounds the hidden state to 8 bits before the head's dot product: up to ~0.5 of raw error;
    # with that rounding reproduced, only fp32 summation order is left.
    assert raw < 1.0
    assert emulated < 2e-3


@pytest.mark.slow
def test_exported_head_reproduces_gemma3_logits(gemma_path):
    embd, head = read_token_matrices(gemma_path)
    assert head is embd and head.shape == (262144, 640)  # tied head
    raw, emulated = check_head(gemma_path)
    assert raw < 1.0
    assert emulated < 2e-3
