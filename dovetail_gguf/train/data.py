"""Self-distillation data: the GGUF target writes the answers, and we keep its hidden states.

Input prompts come from a JSONL file (ShareGPT ``{"conversations": [...]}``,
rendered with the target's chat template, or ``{"prompt": ...}`` for raw
completion) or from plain text files (teacher forcing: the text itself is the
sequence). Several sequences share every ``llama_decode``.

Output: ``shard-NNNNN.safetensors`` files (int32 tokens, fp16 post-norm hidden
states, sequence offsets, prompt lengths) and ``manifest.json`` with the
target's fingerprint, the settings and the prompts each shard covers. Shards
and the manifest are written atomically, so an interrupted run resumes where
the last shard ended, with nothing duplicated or lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ContextFullError, DovetailError, InvalidArgumentError
from ..options import check
from ..gguf_io import read_facts
from ..llama_handles import Batch, LlamaContext, LlamaModel, Vocab
from ..llama_runtime import extra_buffers_safe, init_backend, physical_cores

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class Prompt:
    text: str
    chat: bool  # render with the chat template (else raw completion)
    complete: bool = False  # plain text for teacher forcing: no generation


@dataclass
class DataConfig:
    max_new_tokens: int = 256
    max_prompt_tokens: int = 768
    temperature: float = 0.0  # 0: greedy answers, matching greedy decoding
    batch_size: int = 8  # sequences per llama_decode
    prompts_per_shard: int = 64
    seed: int = 0
    n_threads: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.prompts_per_shard < 1:
            raise InvalidArgumentError("max_new_tokens, batch_size and prompts_per_shard must be >= 1")
        if self.batch_size > 63:
            raise InvalidArgumentError("batch_size must be at most 63")
        self.temperature = check("temperature", self.temperature)  # the generation options' bound


def _conversation(obj: dict, lineno: int, path: Path) -> list[dict]:
    msgs = []
    for turn in obj["conversations"]:
        if not isinstance(turn, dict):
            raise InvalidArgumentError(f"{path}:{lineno}: each conversation turn must be an object")
        role = turn.get("role") or {"human": "user", "gpt": "assistant", "system": "system"}.get(turn.get("from", ""), "")
        content = turn.get("content", turn.get("value"))
        if role not in ("user", "assistant", "system") or not isinstance(content, str):
            raise InvalidArgumentError(f"{path}:{lineno}: a turn needs a role (user/assistant/system) and string content")
        msgs.append({"role": role, "content": content})
    while msgs and msgs[-1]["role"] == "assistant":  # the target writes the answer itself
        msgs.pop()
    if not msgs:
        raise InvalidArgumentError(f"{path}:{lineno}: the conversation has no user turn")
    return msgs


def read_prompts(path: str | os.PathLike) -> list[tuple[Prompt, list[dict] | None]]:
    """Prompts from a .jsonl file or a plain text file; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"prompt file not found: {p}")
    out: list[tuple[Prompt, list[dict] | None]] = []
    if p.suffix not in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise InvalidArgumentError(f"{p} is empty")
        return [(Prompt(text, chat=False, complete=True), None)]
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{p} is not UTF-8 text (byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InvalidArgumentError(f"{p}:{lineno}: malformed JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise InvalidArgumentError(f"{p}:{lineno}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise InvalidArgumentError(f"{p}:{lineno}: expected a JSON object")
        if "conversations" in obj:
            if not isinstance(obj["conversations"], list):
                raise InvalidArgumentError(f"{p}:{lineno}: 'conversations' must be a list")
            out.append((Prompt("", chat=True), _conversation(obj, lineno, p)))
        elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
            if obj.get("chat", False) is True:  # a user message, rendered with the chat template
                out.append((Prompt(obj["prompt"], chat=True), [{"role": "user", "content": obj["prompt"]}]))
            else:
                out.append((Prompt(obj["prompt"], chat=False), None))
        elif isinstance(obj.get("text"), str) and obj["text"]:
            out.append((Prompt(obj["text"], chat=False, complete=True), None))
        else:
            raise InvalidArgumentError(f"{p}:{lineno}: needs 'conversations', 'prompt' or 'text'")
    if not out:
        raise InvalidArgumentError(f"{p} holds no prompts")
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class _Manifest:
    def __init__(self, out_dir: Path, facts, cfg: DataConfig, prompts_file: str, n_prompts: int):
        self.path = out_dir / MANIFEST
        settings = asdict(cfg)
        settings.pop("n_threads")
        if self.path.exists():
            doc = json.loads(self.path.read_text())
            if doc["target"]["tokenizer_fingerprint"] != facts.tokenizer_fingerprint or doc["target"]["name"] != facts.name:
                raise DovetailError(
                    f"{out_dir} holds data from target '{doc['target']['name']}'; cannot resume with '{facts.name}'"
                )
            if doc["settings"] != settings or doc["n_prompts"] != n_prompts:
                raise DovetailError(f"{out_dir} was generated with other settings or prompts; use a new folder")
            self.doc = doc
        else:
            self.doc = {
                "target": {"name": facts.name, "path": facts.path, "tokenizer_fingerprint": facts.tokenizer_fingerprint,
                           "n_embd": facts.n_embd, "n_vocab": facts.n_vocab},
                "settings": settings, "prompts_file": prompts_file, "n_prompts": n_prompts, "shards": [],
            }

    @property
    def next_prompt(self) -> int:
        return self.doc["shards"][-1]["prompts"][1] if self.doc["shards"] else 0

    def save(self) -> None:
        _write_atomic(self.path, lambda t: t.write_text(json.dumps(self.doc, indent=1)))

    def add(self, name: str, first: int, end: int, n_tokens: int) -> None:
        self.doc["shards"].append({"file": name, "prompts": [first, end], "tokens": n_tokens})
        self.save()


class RowDecoder:
    """Independent sequences decoded side by side: the target model on a context of its own.

    Sequence ``s`` (1..n_seqs) has a KV stream of its own (no unified cache),
    so attention spans only that sequence's cells. No committed-prefix
    bookkeeping: that is :class:`~dovetail_gguf.target.Target`'s job.
    """

    def __init__(self, path: str | os.PathLike, n_seqs: int, seq_len: int, n_threads: int | None = None,
                 n_batch: int = 512):
        self.facts = read_facts(path)
        init_backend()
        self.model = LlamaModel(self.facts, use_extra_buffers=extra_buffers_safe(self.facts.path))
        self.vocab: Vocab = self.model.vocab
        self.n_seq_max = n_seqs + 1  # sequence 0 stays unused
        try:
            self.ctx = LlamaContext(self.model, max(seq_len * self.n_seq_max, 256), n_batch, n_batch, self.n_seq_max,
                                    n_threads or physical_cores(), unified_kv=False)
        except Exception:
            self.model.close()
            raise
        self.batch = Batch(n_batch, 1)

    @property
    def capacity(self) -> int:
        """Rows per :meth:`decode` call."""
        return self.batch.capacity

    def reset(self) -> None:
        self.ctx.clear()

    def decode(self, tokens, positions, seq_ids) -> tuple[np.ndarray, np.ndarray]:
        """Row i: ``tokens[i]`` at ``positions[i]`` of sequence ``seq_ids[i]``.

        Returns views of logits [n, n_vocab] and hidden states [n, n_embd], valid until the next call.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        seq_ids = np.asarray(seq_ids, dtype=np.int32)
        positions = np.asarray(positions, dtype=np.int32)
        n = tokens.size
        if n == 0 or n > self.capacity:
            raise InvalidArgumentError(f"a decode takes 1..{self.capacity} rows, got {n}")
        if seq_ids.min() < 1 or seq_ids.max() >= self.n_seq_max:
            raise InvalidArgumentError(f"sequence ids must be in 1..{self.n_seq_max - 1}")
        if positions.min() < 0 or positions.max() >= self.ctx.n_cells // self.n_seq_max:
            raise ContextFullError(f"positions must stay below {self.ctx.n_cells // self.n_seq_max}")
        self.vocab.check_ids(tokens)
        self.batch.set_rows(tokens, positions, seq_ids)
        self.ctx.decode(self.batch)
        return self.ctx.outputs(n)

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


def _encode(vocab: Vocab, prompt: Prompt, messages, max_tokens: int) -> np.ndarray:
    if messages is not None:  # rendered exactly as at inference
        from ..chat import chat_tokens

        toks = chat_tokens(vocab, messages)
    else:
        toks = vocab.tokenize(prompt.text, add_special=True, parse_special=False)
    return toks[:max_tokens]


def _generate_batch(dec: RowDecoder, batch: list[np.ndarray], complete: list[bool], cfg: DataConfig,
                    rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(tokens, hidden, prompt_len) for each prompt, generating B sequences per decode call."""
    dec.reset()
    n = len(batch)
    seqs = [list(map(int, b)) for b in batch]
    hidden: list[list[np.ndarray]] = [[] for _ in range(n)]
    cap = dec.capacity
    # prefill all prompts, each on its own sequence, packed into as few calls as fit
    rows = [(i, j) for i in range(n) for j in range(len(batch[i]))]
    for lo in range(0, len(rows), cap):
        chunk = rows[lo : lo + cap]
        seq = np.array([i for i, _ in chunk]) + 1
        pos = np.array([j for _, j in chunk])
        tok = np.array([batch[i][j] for i, j in chunk])
        logits, hid = dec.decode(tok, pos, seq)
        for r, (i, j) in enumerate(chunk):
            hidden[i].append(hid[r].astype(np.float16))
            if j == len(batch[i]) - 1 and not complete[i]:
                seqs[i].append(_pick(logits[r], cfg.temperature, rng))
    active = [i for i in range(n) if not complete[i] and not dec.vocab.is_eog(seqs[i][-1])]
    new = {i: 1 for i in active}
    while active:
        tok = np.array([seqs[i][-1] for i in active])
        pos = np.array([len(seqs[i]) - 1 for i in active])
        logits, hid = dec.decode(tok, pos, np.array(active) + 1)
        still = []
        for r, i in enumerate(active):
            hidden[i].append(hid[r].astype(np.float16))
            if new[i] >= cfg.max_new_tokens:
                continue
            nxt = _pick(logits[r], cfg.temperature, rng)
            seqs[i].append(nxt)
            new[i] += 1
            if not dec.vocab.is_eog(nxt):
                still.append(i)
        active = still
    for i in range(n):
        toks = np.asarray(seqs[i], dtype=np.int32)
        hid = np.stack(hidden[i])
        # a final EOG token was never evaluated; every kept token has its hidden state
        yield toks[: len(hid)], hid, (len(hid) if complete[i] else len(batch[i]))
    dec.reset()


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    return int(rng.choice(p.size, p=p / p.sum()))


def generate_data(target_path: str | os.PathLike, prompts_path: str | os.PathLike, out_dir: str | os.PathLike,
                  cfg: DataConfig | None = None, progress: bool = True) -> Path:
    """Write (or resume writing) self-distillation shards for ``target_path``."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    cfg = cfg or DataConfig()
    cfg.validate()
    prompts = read_prompts(prompts_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq_len = cfg.max_prompt_tokens + cfg.max_new_tokens
    dec = RowDecoder(target_path, cfg.batch_size, seq_len, cfg.n_threads)
    manifest = _Manifest(out, dec.facts, cfg, str(prompts_path), len(prompts))
    manifest.save()
    start = manifest.next_prompt
    rng = np.random.default_rng([cfg.seed, start])
    bar = tqdm(total=len(prompts), initial=start, unit="prompt", disable=not progress, desc="self-distillation")
    t0, n_tok = time.perf_counter(), 0
    try:
        for first in range(start, len(prompts), cfg.prompts_per_shard):
            end = min(first + cfg.prompts_per_shard, len(prompts))
            tokens, hidden, offsets, prompt_lens = [], [], [0], []
            for b in range(first, end, cfg.batch_size):
                group = prompts[b : min(b + cfg.batch_size, end)]
                enc = [_encode(dec.vocab, p, m, cfg.max_prompt_tokens if not p.complete else seq_len) for p, m in group]
                for toks, hid, plen in _generate_batch(dec, enc, [p.complete for p, _ in group], cfg, rng):
                    tokens.append(toks)
                    hidden.append(hid)
                    offsets.append(offsets[-1] + len(toks))
                    prompt_lens.append(plen)
                    n_tok += len(toks)
                bar.update(len(group))
                bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
            name = f"shard-{len(manifest.doc['shards']):05d}.safetensors"
            arrays = {"tokens": np.concatenate(tokens), "hidden": np.concatenate(hidden),
                      "offsets": np.asarray(offsets, dtype=np.int64), "prompt_lens": np.asarray(prompt_lens, dtype=np.int32)}
            _write_atomic(out / name, lambda t: save_file(arrays, str(t)))
            manifest.add(name, first, end, int(offsets[-1]))
    finally:
        bar.close()
        dec.close()
    return out


def load_shards(data_dir: str | os.PathLike) -> tuple[dict, list[tuple[np.ndarray, np.ndarray, int]]]:
    """The manifest and every sequence as (tokens, hidden fp16, prompt_len)."""
    from safetensors.numpy import load_file

    d = Path(data_dir)
    if not (d / MANIFEST).is_file():
        raise InvalidArgumentError(f"{d} holds no {MANIFEST}; run `dovetail data generate` first")
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidArgumentError(f"{d / MANIFEST} is not valid JSON: {e}") from None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list)
            or not isinstance(manifest.get("target"), dict) or "tokenizer_fingerprint" not in manifest["target"]):
        raise InvalidArgumentError(f"{d / MANIFEST} is not a data manifest (needs 'target' and 'shards')")
    from safetensors import SafetensorError

    seqs = []
    for shard in manifest["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or "/" in name or not (d / name).is_file():
            raise InvalidArgumentError(f"{d / MANIFEST} names a shard that is missing: {name!r}")
        try:
            a = load_file(str(d / name))
            off = a["offsets"]
            toks, hid, plens = a["tokens"], a["hidden"], a["prompt_lens"]
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise InvalidArgumentError(f"shard {d / name} is damaged or truncated: {e}") from None
        if off.ndim != 1 or off.size != plens.size + 1 or off[-1] != toks.size or hid.shape[0] != toks.size:
            raise InvalidArgumentError(f"shard {d / name} is inconsistent (offsets, tokens and hidden states disagree)")
        for i in range(len(off) - 1):
            seqs.append((a["tokens"][off[i] : off[i + 1]], a["hidden"][off[i] : off[i + 1]], int(a["prompt_lens"][i])))
    return manifest, seqs
