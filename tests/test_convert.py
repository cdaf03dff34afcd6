"""convert/: tiny random LLaMA checkpoints made here, converted, and checked against transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from convert.hf import convert
from dovetail_gguf.gguf_io import read_facts
from dovetail_gguf.target import Target, TargetConfig

transformers = pytest.importorskip("transformers")

TEXTS = [
    "def f(x):\n\treturn x + 1\r\n", "Hello   world,  spaces\t\ttabs", "numbers 1234567 and 3.14159",
    "Café naïve résumé Ångström", "日本語のテキストと中文", "emoji 🦙🚀✨ end", "MixedCase_snake-kebab/path.py",
]


@pytest.fixture(scope="module")
def bpe_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model trained here on varied text."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    lines = [f"{t} {i} the quick brown fox jumps over the lazy dog" for i, t in enumerate(TEXTS * 40)]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   # LLaMA's settings: no normalization, whitespace kept as it is
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True)
    return d / "tokenizer.model"


def tiny_model(cfg_kwargs: dict, arch: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg_cls, model_cls = (MistralConfig, MistralForCausalLM) if arch == "mistral" else (LlamaConfig, LlamaForCausalLM)
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=1024, rms_norm_eps=1e-5)
    m = model_cls(cfg_cls(**{**base, **cfg_kwargs}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)  # norms not all ones
    return m.eval()


def save_sp_tokenizer(sp_model, out):
    from transformers import LlamaTokenizer

    shutil.copy(sp_model, out / "tokenizer.model")
    LlamaTokenizer(vocab_file=str(out / "tokenizer.model"), legacy=False).save_pretrained(out)


def check_logits(model, gguf_path, n_vocab: int, n: int = 300, tol: float = 1e-3):
    ids = np.random.default_rng(1).integers(3, n_vocab, n).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[None])).logits[0].float().numpy()
    with Target(gguf_path, TargetConfig(n_ctx=512, n_threads=2)) as t:
        got = np.stack([t.decode_one(int(x))[0].copy() for x in ids])
    assert np.abs(got - ref).max() < tol, np.abs(got - ref).max()


def check_tokenization(gguf_path, reference):
    with Target(gguf_path, TargetConfig(n_ctx=256, n_threads=2)) as t:
        for text in TEXTS:
            assert t.tokenize(text, add_special=False).tolist() == reference(text), text


@pytest.mark.slow
def test_llama2_like_mha_untied_sentencepiece(tmp_path, sp_model):
    import sentencepiece as spm

    src = tmp_path / "llama2"
    model = tiny_model(dict(vocab_size=400, num_key_value_heads=4, tie_word_embeddings=False))
    model.save_pretrained(src)
    save_sp_tokenizer(sp_model, src)
    out = convert(src, tmp_path / "llama2.gguf", "f32", progress=False)
    facts = read_facts(out)
    assert facts.tokenizer_model == "llama" and not facts.tied_head and facts.n_head_kv == 4
    check_logits(model, out, 400)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    check_tokenization(out, lambda s: sp.encode(s))


@pytest.mark.slow
def test_llama3_like_gqa_tied_rope_scaling_bpe(tmp_path, bpe_tokenizer):
    from convert.vocab import LLAMA3_REGEX

    src = tmp_path / "llama3"
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = tiny_model(dict(vocab_size=len(bpe_tokenizer), num_key_value_heads=2, tie_word_embeddings=True,
                            rope_theta=500000.0, rope_scaling=scaling))
    model.save_pretrained(src)
    bpe_tokenizer.save_pretrained(src)
    tj = json.loads((src / "tokenizer.json").read_text())  # LLaMA-3's pre-tokenizer
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    out = convert(src, tmp_path / "llama3.gguf", "f32", progress=False)
    facts = read_facts(out)
    assert facts.tokenizer_pre == "llama-bpe" and facts.tied_head and facts.n_head_kv == 2
    check_logits(model, out, len(bpe_tokenizer))
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(src)
    check_tokenization(out, lambda s: ref(s, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_mistral_like(tmp_path, bpe_tokenizer):
    src = tmp_path / "mistral"
    model = tiny_model(dict(vocab_size=len(bpe_tokenizer), num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
                       arch="mistral")
    model.save_pretrained(src)
    bpe_tokenizer.save_pretrained(src)
    out = convert(src, tmp_path / "mistral.gguf", "f32", progress=False)
    check_logits(model, out, len(bpe_tokenizer))
    check_tokenization(out, lambda s: bpe_tokenizer(s, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_quantized_outputs(tmp_path, bpe_tokenizer):
    src = tmp_path / "q"
    model = tiny_model(dict(vocab_size=len(bpe_tokenizer), num_key_value_heads=2, hidden_size=256, intermediate_size=512))
    model.save_pretrained(src, max_shard_size="1MB")  # sharded safetensors with an index
    assert (src / "model.safetensors.index.json").is_file()
    bpe_tokenizer.save_pretrained(src)
    f32 = convert(src, tmp_path / "f32.gguf", "f32", progress=False)
    q8 = convert(src, tmp_path / "q8.gguf", "q8_0", progress=False)
    q4 = convert(src, tmp_path / "q4km.gguf", "q4_k_m", progress=False)
    assert "Q8_0" in read_facts(q8).quant_types and read_facts(q4).quant_types.get("Q4_K", 0) > 0
    ids = np.random.default_rng(2).integers(0, len(bpe_tokenizer), 40).astype(np.int32)
    outs = {}
    for path in (f32, q8, q4):
        with Target(path, TargetConfig(n_ctx=256, n_threads=2)) as t:
            logits, _ = t.prefill(ids)
            outs[path.name] = logits
            assert np.isfinite(logits).all()
            gen = [int(np.argmax(logits))]
            for _ in range(5):
                gen.append(int(np.argmax(t.decode_one(gen[-1])[0])))
    diff = np.abs(outs["q8.gguf"] - outs["f32.gguf"]).max()
    assert diff < 0.05 * np.abs(outs["f32.gguf"]).max()
    # Q4_K_M is coarser but must still be the same function: logits that move together, f32's choice near the top
    f32_logits, q4_logits = outs["f32.gguf"], outs["q4km.gguf"]
    corr = np.corrcoef(f32_logits, q4_logits)[0, 1]
    assert corr > 0.9, corr
    assert int(np.argmax(f32_logits)) in np.argsort(q4_logits)[-5:]


def test_pytorch_bin_and_meta_layouts(tmp_path, sp_model):
    model = tiny_model(dict(vocab_size=400, num_key_value_heads=2, tie_word_embeddings=False))
    hf = tmp_path / "bin"
    hf.mkdir()
    model.config.save_pretrained(hf)
    torch.save(model.state_dict(), hf / "pytorch_model.bin")  # the older PyTorch checkpoint format
    save_sp_tokenizer(sp_model, hf)
    assert list(hf.glob("pytorch_model*.bin"))
    check_logits(model, convert(hf, tmp_path / "bin.gguf", "f32", progress=False), 400, n=40)
    # Meta's layout: consolidated.00.pth with interleaved (not rotate-half) Q/K rows, params.json, tokenizer.model
    from convert.hf import permute_rope_rows

    meta = tmp_path / "meta"
    meta.mkdir()
    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    state = {}
    for k, v in sd.items():
        if k in names:
            state[names[k]] = v
            continue
        i, rest = k[len("model.layers."):].split(".", 1)
        part = rest.rsplit(".weight", 1)[0]
        if part.endswith("q_proj"):
            v = torch.from_numpy(permute_rope_rows(v.numpy(), 4))
        elif part.endswith("k_proj"):
            v = torch.from_numpy(permute_rope_rows(v.numpy(), 2))
        state[f"layers.{i}.{layer[part]}.weight"] = v
    torch.save(state, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "vocab_size": 400, "norm_eps": 1e-5, "rope_theta": 10000.0}))
    shutil.copy(sp_model, meta / "tokenizer.model")
    check_logits(model, convert(meta, tmp_path / "meta.gguf", "f32", progress=False), 400, n=40)


def test_bad_input(tmp_path, sp_model):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dovetail_gguf", "convert", *args], capture_output=True, text=True, timeout=120)

    good = tmp_path / "good"
    model = tiny_model(dict(vocab_size=400, num_key_value_heads=2))
    model.save_pretrained(good)
    save_sp_tokenizer(sp_model, good)
    out = tmp_path / "out.gguf"
    cases = []
    cases.append(((str(tmp_path / "missing"), "-o", str(out)), "not found"))
    (tmp_path / "noconfig").mkdir()
    cases.append(((str(tmp_path / "noconfig"), "-o", str(out)), "no config.json"))
    gpt = tmp_path / "gpt"
    shutil.copytree(good, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (gpt / "config.json").write_text(json.dumps(cfg))
    cases.append(((str(gpt), "-o", str(out)), "unsupported architecture GPT2LMHeadModel"))
    trunc = tmp_path / "trunc"
    shutil.copytree(good, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(((str(trunc), "-o", str(out)), "safetensors"))
    shapes = tmp_path / "shapes"
    shutil.copytree(good, shapes)
    cfg = json.loads((shapes / "config.json").read_text())
    cfg["intermediate_size"] = 999
    (shapes / "config.json").write_text(json.dumps(cfg))
    cases.append(((str(shapes), "-o", str(out)), "config.json implies"))
    cases.append(((str(good), "-o", str(out), "--outtype", "q3_xs"), "unknown --outtype"))
    for args, message in cases:
        r = cli(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert not out.exists() and not list(tmp_path.glob(".out.gguf.*"))  # nothing half-written
    assert cli(str(good), "-o", str(out), "--outtype", "f16").returncode == 0 and out.is_file()
    r = cli(str(good), "-o", str(out))
    assert r.returncode == 2 and "--force" in r.stderr
    assert cli(str(good), "-o", str(out), "--force").returncode == 0
