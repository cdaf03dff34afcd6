"""Reading GGUF files without llama.cpp: validation, model facts, token matrices.

Everything here goes through the pure-Python ``gguf`` package, so it is safe to
call on any file: nothing in this module can abort the interpreter.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ModelFileError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF file says about the model inside it."""

    path: str
    architecture: str
    name: str
    file_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    quant_types: dict[str, int]
    tokenizer_model: str
    tokenizer_pre: str
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None
    tokenizer_fingerprint: str
    tied_head: bool
    n_ff: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    special_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)


def check_gguf_path(path: str | os.PathLike) -> Path:
    """Raise ModelFileError unless ``path`` is a readable file starting with the GGUF magic."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"not a file: {p}")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic {magic!r}): {p}")
    return p


_SCALARS = {  # GGUFValueType -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    type_id: int
    offset: int  # from the start of the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type{self.type_id}"


class GGUFFile:
    """The metadata and tensor directory of a GGUF file, parsed once, tensors read lazily.

    ``gguf.GGUFReader`` builds a numpy view per array element, which takes
    seconds for a 262k-token vocabulary; this parser reads what it needs with
    ``struct`` and leaves tensor data on disk until asked for.
    """

    def __init__(self, path: Path):
        import mmap
        import struct

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        self.size = path.stat().st_size
        self.fields: dict[str, object] = {}
        self.token_bytes: list[bytes] = []
        with path.open("rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        try:
            off = 4
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, off)
            off += 20
            if version < 2:
                raise ModelFileError(f"GGUF version {version} is too old: {path}")

            def read_str(o: int) -> tuple[bytes, int]:
                (n,) = struct.unpack_from("<Q", buf, o)
                if o + 8 + n > self.size:
                    raise struct.error("string runs past the end of the file")
                return bytes(buf[o + 8 : o + 8 + n]), o + 8 + n

            for _ in range(n_kv):
                key_b, off = read_str(off)
                key = key_b.decode("utf-8", errors="replace")
                (vtype,) = struct.unpack_from("<I", buf, off)
                off += 4
                if vtype == _STRING:
                    val, off = read_str(off)
                    self.fields[key] = val.decode("utf-8", errors="replace")
                elif vtype == _ARRAY:
                    etype, n = struct.unpack_from("<IQ", buf, off)
                    off += 12
                    if etype == _STRING:
                        items = []
                        for _ in range(n):
                            item, off = read_str(off)
                            items.append(item)
                        if key == "tokenizer.ggml.tokens":
                            self.token_bytes = items
                        self.fields[key] = items if n <= 64 else n
                    elif etype in _SCALARS:
                        width = struct.calcsize(_SCALARS[etype])
                        if off + n * width > self.size:
                            raise struct.error("array runs past the end of the file")
                        self.fields[key] = list(struct.unpack_from(f"<{n}{_SCALARS[etype]}", buf, off)) if n <= 64 else n
                        off += n * width
                    else:
                        raise ModelFileError(f"unsupported nested array in GGUF key {key}: {path}")
                elif vtype in _SCALARS:
                    (self.fields[key],) = struct.unpack_from("<" + _SCALARS[vtype], buf, off)
                    off += struct.calcsize(_SCALARS[vtype])
                else:
                    raise ModelFileError(f"unknown GGUF value type {vtype} for key {key}: {path}")
            infos = []
            for _ in range(n_tensors):
                name_b, off = read_str(off)
                (n_dims,) = struct.unpack_from("<I", buf, off)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
                type_id, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
                off += 4 + 8 * n_dims + 12
                infos.append((name_b.decode(), tuple(int(d) for d in dims), type_id, rel))
        except struct.error as e:
            raise ModelFileError(f"damaged or truncated GGUF file {path}: {e}") from e
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise ModelFileError(f"general.alignment must be a positive power of two, got {align!r}: {path}")
        data_start = (off + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, rel in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            except (ValueError, KeyError) as e:
                raise ModelFileError(f"tensor {name} has unknown type {type_id}: {path}") from e
            n_el = int(np.prod(dims)) if dims else 1
            info = TensorInfo(name, dims, type_id, data_start + rel, n_el // block * type_size)
            if info.offset + info.n_bytes > self.size:
                raise ModelFileError(
                    f"truncated GGUF file {path}: tensor {name} ends at byte {info.offset + info.n_bytes}, "
                    f"file has {self.size}"
                )
            self.tensors[name] = info

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only memory map."""
        t = self.tensors[name]
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))

    def dequantize(self, name: str) -> np.ndarray:
        """A 2-D tensor as float32 [rows, row_length]."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        row = t.shape[0]
        arr = dequantize(self.tensor_data(name), GGMLQuantizationType(t.type_id))
        return np.ascontiguousarray(arr.reshape(-1, row), dtype=np.float32)


@lru_cache(maxsize=8)
def _open(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(Path(path))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF file at ``path`` (cached per file version); raises ModelFileError."""
    p = check_gguf_path(path)
    st = p.stat()
    return _open(str(p.resolve()), st.st_size, st.st_mtime_ns)


def _field(gf: GGUFFile, key: str, default=None):
    return gf.fields.get(key, default)


def _tokenizer_fingerprint(gf: GGUFFile, model: str, pre: str) -> str:
    """A short hash of everything that decides how text maps to token ids."""
    if not gf.token_bytes:
        raise ModelFileError(f"GGUF file has no tokenizer (tokenizer.ggml.tokens is missing): {gf.path}")
    h = hashlib.sha256()
    h.update(f"{model}\0{pre}\0".encode())
    h.update(b"\0".join(gf.token_bytes))
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        h.update(f"\0{_field(gf, key)}".encode())
    return h.hexdigest()[:16]


def read_facts(path: str | os.PathLike) -> ModelFacts:
    """Model facts of a GGUF file; raises ModelFileError for anything unusable."""
    p = check_gguf_path(path)
    gf = open_gguf(p)
    arch = _field(gf, "general.architecture")
    if not arch:
        raise ModelFileError(f"GGUF file has no general.architecture: {p}")

    def arch_int(key: str, default: int = 0) -> int:
        v = _field(gf, f"{arch}.{key}", default)
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ModelFileError(f"{arch}.{key} must be an integer, got {v!r}: {p}")
        return int(v)

    def arch_float(key: str, default: float) -> float:
        v = _field(gf, f"{arch}.{key}", default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ModelFileError(f"{arch}.{key} must be a number, got {v!r}: {p}")
        return float(v)

    embd = gf.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFileError(f"GGUF file has no token_embd.weight tensor: {p}")
    model = str(_field(gf, "tokenizer.ggml.model", ""))
    pre = str(_field(gf, "tokenizer.ggml.pre", ""))
    special = {}
    for key in ("bos", "eos", "eot", "eom", "unknown", "padding", "sep"):
        v = _field(gf, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ModelFileError(f"tokenizer.ggml.{key}_token_id must be an integer, got {v!r}: {p}")
            special[key] = int(v)
    template = _field(gf, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFileError(f"tokenizer.chat_template must be a string: {p}")
    quant = Counter(t.type_name for t in gf.tensors.values())
    facts = ModelFacts(
        path=str(p),
        architecture=str(arch),
        name=str(_field(gf, "general.name", p.stem)),
        file_size=gf.size,
        n_embd=arch_int("embedding_length", embd.shape[0]),
        n_layer=arch_int("block_count"),
        n_head=arch_int("attention.head_count"),
        n_head_kv=arch_int("attention.head_count_kv", arch_int("attention.head_count")),
        n_vocab=len(gf.token_bytes) or embd.shape[1],
        n_ctx_train=arch_int("context_length"),
        quant_types=dict(quant.most_common()),
        tokenizer_model=model,
        tokenizer_pre=pre,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        chat_template=_field(gf, "tokenizer.chat_template"),
        tokenizer_fingerprint=_tokenizer_fingerprint(gf, model, pre),
        tied_head="output.weight" not in gf.tensors,
        n_ff=arch_int("feed_forward_length"),
        rope_theta=arch_float("rope.freq_base", 10000.0),
        rms_norm_eps=arch_float("attention.layer_norm_rms_epsilon", 1e-5),
        special_tokens=special,
    )
    check_hparams(facts, gf, arch_float("attention.layer_norm_epsilon", 1e-5))
    return facts


def check_hparams(facts: ModelFacts, gf: GGUFFile, layer_norm_eps: float) -> None:
    """Refuse hyperparameters llama.cpp would abort on (GGML_ASSERT, std::out_of_range) at the first decode."""
    where = facts.path
    blocks = {int(name.split(".")[1]) for name in gf.tensors if name.startswith("blk.") and name.split(".")[1].isdigit()}
    n_blocks = max(blocks) + 1 if blocks else 0
    if facts.n_layer < 1 or facts.n_layer != n_blocks:
        raise ModelFileError(f"{facts.architecture}.block_count is {facts.n_layer}, but the file holds tensors "
                             f"for {n_blocks} layers: {where}")
    if facts.n_embd < 1 or facts.n_head < 1 or facts.n_head_kv < 1:
        raise ModelFileError(f"embedding length and head counts must be positive "
                             f"({facts.n_embd}, {facts.n_head}, {facts.n_head_kv}): {where}")
    if facts.n_head % facts.n_head_kv:
        raise ModelFileError(f"head_count {facts.n_head} is not a multiple of head_count_kv {facts.n_head_kv}: {where}")
    if facts.n_ctx_train < 0 or facts.n_ff < 0:
        raise ModelFileError(f"context_length and feed_forward_length must not be negative: {where}")
    for name, eps in (("layer_norm_rms_epsilon", facts.rms_norm_eps), ("layer_norm_epsilon", layer_norm_eps)):
        if not (np.isfinite(eps) and eps > 0):
            raise ModelFileError(f"{facts.architecture}.attention.{name} must be a positive number, got {eps}: {where}")
    if not (np.isfinite(facts.rope_theta) and facts.rope_theta > 0):
        raise ModelFileError(f"{facts.architecture}.rope.freq_base must be a positive number, got {facts.rope_theta}: {where}")
    embd_rows = gf.tensors["token_embd.weight"].shape[1] if len(gf.tensors["token_embd.weight"].shape) > 1 else 0
    if embd_rows != facts.n_vocab:
        raise ModelFileError(f"the vocabulary has {facts.n_vocab} tokens but token_embd.weight has {embd_rows} rows: {where}")
    for key, token in facts.special_tokens.items():
        if not 0 <= token < facts.n_vocab:
            raise ModelFileError(f"tokenizer.ggml.{key}_token_id {token} is outside the vocabulary "
                                 f"(0..{facts.n_vocab - 1}): {where}")


def read_token_matrices(path: str | os.PathLike):
    """The token-embedding table and the LM head as float32 torch tensors [n_vocab, n_embd].

    A GGUF without ``output.weight`` has a head tied to the embedding; then the
    same tensor object is returned twice, so nothing is stored twice.
    """
    import torch

    gf = open_gguf(path)
    embd = torch.from_numpy(gf.dequantize("token_embd.weight"))
    tied = "output.weight" not in gf.tensors
    head = embd if tied else torch.from_numpy(gf.dequantize("output.weight"))
    log.debug("exported embedding %s and %s head", tuple(embd.shape), "tied" if tied else "untied")
    return embd, head
