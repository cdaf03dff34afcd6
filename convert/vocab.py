"""Tokenizers of HF / Meta checkpoints into GGUF metadata (gguf's vocab helpers do the reading)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dovetail_gguf.errors import InvalidArgumentError

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizer names for the pre_tokenizer sections of tokenizer.json it reproduces.
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        types = [p.get("type") for p in parts]
        if types == ["Split", "ByteLevel"]:
            pattern = parts[0].get("pattern", {})
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if regex == LLAMA3_REGEX and not parts[1].get("use_regex", True):
                return "llama-bpe"
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"
    raise InvalidArgumentError(
        f"unsupported BPE pre-tokenizer {json.dumps(pre)[:200]}: llama.cpp would split text differently "
        "from transformers; supported: GPT-2 byte-level, LLaMA-3, SmolLM"
    )


def add_vocab(writer, src: Path, n_vocab: int) -> str:
    """Write the tokenizer of ``src`` (tokenizer.json or tokenizer.model) into ``writer``; returns its kind."""
    import gguf
    from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab

    if (src / "tokenizer.json").is_file() and json.loads((src / "tokenizer.json").read_text())["model"]["type"] == "BPE" \
            and not (src / "tokenizer.model").is_file():
        tj = json.loads((src / "tokenizer.json").read_text())
        pre = detect_pre_tokenizer(tj)
        vocab = BpeVocab(src)
        model, load_merges = "gpt2", True
    elif (src / "tokenizer.model").is_file():
        vocab = SentencePieceVocab(src)
        model, pre, load_merges = "llama", "default", False
    else:
        raise InvalidArgumentError(f"{src} has no tokenizer (tokenizer.model or a BPE tokenizer.json)")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > n_vocab:
        raise InvalidArgumentError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {n_vocab}")
    for i in range(len(tokens), n_vocab):  # padding rows of the embedding
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(src, load_merges=load_merges, n_vocab=n_vocab).add_to_gguf(writer)
    return f"{model}/{pre}"
