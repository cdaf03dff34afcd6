"""The target model: a GGUF on the CPU through llama.cpp's low-level API.

One :class:`Target` owns one llama.cpp model, one context and its KV cache.
Sequence 0 of the cache always holds exactly the committed tokens. A draft tree
is verified in one ``llama_decode``: every root-to-leaf path gets a sequence id
of its own, every node carries the ids of the paths through it, and the
committed prefix is shared with all paths, so each node attends to exactly its
ancestors. :meth:`Target.commit` keeps the accepted path and frees the rest.

Results are numpy views of llama.cpp's own output buffers: valid until the next
decode, copied only where a caller needs to keep them.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ContextFullError, InvalidArgumentError, LlamaCallError, ModelFileError
from .gguf_io import ModelFacts, read_facts
from .llama_runtime import extra_buffers_safe, init_backend, physical_cores

log = logging.getLogger(__name__)

LLAMA_MAX_SEQ = 256
KV_WINDOW_PAD = 256  # llama.cpp attends over the used cells padded to a multiple of this


@dataclass
class TargetConfig:
    """How the target is loaded and run."""

    n_ctx: int = 4096
    n_threads: int | None = None  # None: the number of physical cores
    n_gpu_layers: int = 0  # layers offloaded to a GPU (needs a GPU build of llama.cpp)
    n_batch: int = 512  # rows per llama_decode call (prefill chunk)
    n_ubatch: int = 512  # rows per compute step; trees stay below 64 rows for bit-stable kernels
    max_tree_nodes: int = 64
    max_tree_paths: int = 64  # leaves per tree; llama.cpp allows 255
    use_extra_buffers: bool | None = None  # None: automatic (off only where AMX kernels crash)
    # exact: no repacked weight layouts, so a tree row is computed by the same kernels as a one-token
    # decode and greedy output is bit-identical to llama.cpp's plain decoding with the same setting.
    # Off (fast): the fastest kernels; a batch row can then differ from a one-token decode in the last
    # bits, which flips the argmax only at near-ties of the top two logits.
    exact: bool = False
    unified_kv: bool = True  # trees need it; independent sequences (decode_rows) run faster without

    def validate(self) -> None:
        if self.n_ctx < 16:
            raise InvalidArgumentError(f"n_ctx must be at least 16, got {self.n_ctx}")
        if self.n_threads is not None and self.n_threads < 1:
            raise InvalidArgumentError(f"threads must be at least 1, got {self.n_threads}")
        if not 1 <= self.max_tree_nodes <= self.n_batch:
            raise InvalidArgumentError(f"max_tree_nodes must be in 1..n_batch ({self.n_batch})")
        if not 1 <= self.max_tree_paths < LLAMA_MAX_SEQ:
            raise InvalidArgumentError(f"max_tree_paths must be in 1..{LLAMA_MAX_SEQ - 1}")
        if self.n_batch < self.max_tree_paths + 1:  # llama.cpp reserves an output row per sequence (GGML_ASSERT)
            raise InvalidArgumentError(f"n_batch must be at least max_tree_paths + 1 = {self.max_tree_paths + 1}, "
                                       f"got {self.n_batch}")
        if self.n_ubatch < 1 or self.n_ctx > 1 << 24:
            raise InvalidArgumentError("n_ubatch must be positive and n_ctx at most 16M")
        if self.n_gpu_layers < 0:
            raise InvalidArgumentError("n_gpu_layers must be >= 0")


@dataclass(frozen=True)
class TreeLayout:
    """What the target derives from (tokens, parents) to verify a tree in one call."""

    tokens: np.ndarray  # [n] int32
    parents: np.ndarray  # [n] int32, -1 for the root
    depth: np.ndarray  # [n] int32, root 0
    seq_ids: np.ndarray  # [n, n_paths] int32, each row's seq ids packed first
    n_seq_ids: np.ndarray  # [n] int32
    n_paths: int
    ancestors: np.ndarray  # [n, n] bool: ancestors[i, j] is True when j is i or an ancestor of i


def tree_layout(tokens, parents) -> TreeLayout:
    """Depths and per-path sequence ids of a tree given as (tokens, parent indices).

    Node 0 is the root (parent -1); every other node's parent comes before it.
    Path ``s`` is the path to the ``s``-th leaf in node order; it uses sequence
    id ``s`` (path 0 shares sequence 0 with the committed prefix).
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    parents = np.ascontiguousarray(parents, dtype=np.int32)
    n = tokens.shape[0]
    if tokens.ndim != 1 or parents.shape != tokens.shape or n == 0:
        raise InvalidArgumentError("a tree needs 1-D tokens and parents of the same, non-zero length")
    if parents[0] != -1 or (n > 1 and (parents[1:] < 0).any()):
        raise InvalidArgumentError("node 0 must be the only root (parent -1)")
    if (parents >= np.arange(n)).any():
        raise InvalidArgumentError("every node's parent must come before it")
    # ancestor-or-self matrix by repeated squaring of the parent relation (log2(depth) steps)
    anc = np.eye(n, dtype=bool)
    anc[np.arange(1, n), parents[1:]] = True
    steps = max(1, int(np.ceil(np.log2(max(n, 2)))))
    for _ in range(steps):
        a = anc.astype(np.float32)  # BLAS: integer matmul has no fast path in numpy
        nxt = (a @ a) > 0
        if (nxt == anc).all():
            break
        anc = nxt
    depth = anc.sum(axis=1).astype(np.int32) - 1
    is_leaf = np.ones(n, dtype=bool)
    is_leaf[parents[1:]] = False
    leaves = np.flatnonzero(is_leaf)
    member = anc[leaves].T  # [n, n_paths]: node j lies on the path to leaf s
    n_paths = leaves.shape[0]
    ids = np.where(member, np.arange(n_paths, dtype=np.int32), np.int32(LLAMA_MAX_SEQ))
    ids.sort(axis=1)
    return TreeLayout(tokens, parents, depth, ids, member.sum(axis=1).astype(np.int32), n_paths, anc)


@dataclass
class TreeResult:
    """Target outputs for every node of a verified tree (views, valid until the next decode)."""

    logits: np.ndarray  # [n, n_vocab] float32
    hidden: np.ndarray  # [n, n_embd] float32, post-norm last hidden state
    layout: TreeLayout


class _Batch:
    """A llama_batch whose arrays are numpy buffers owned by Python."""

    def __init__(self, capacity: int, n_seq_max: int):
        import llama_cpp

        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros((capacity, n_seq_max), dtype=np.int32)
        self.logits = np.ones(capacity, dtype=np.int8)
        row_ptr = ctypes.POINTER(ctypes.c_int32)
        self._seq_rows = (row_ptr * capacity)(
            *[ctypes.cast(self.seq_id.ctypes.data + i * self.seq_id.strides[0], row_ptr) for i in range(capacity)]
        )
        b = llama_cpp.llama_batch()
        b.token = self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        b.embd = None
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = self._seq_rows
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b

    def set_chain(self, tokens: np.ndarray, first_pos: int) -> None:
        """Fill with consecutive tokens of sequence 0."""
        n = tokens.shape[0]
        self.token[:n] = tokens
        self.pos[:n] = np.arange(first_pos, first_pos + n, dtype=np.int32)
        self.n_seq_id[:n] = 1
        self.seq_id[:n, 0] = 0
        self.struct.n_tokens = n


class Target:
    """A GGUF model on the CPU: prefill, decode one token, verify a tree, commit a path."""

    def __init__(self, path: str | Path, config: TargetConfig | None = None):
        import llama_cpp

        self.config = config = config or TargetConfig()
        config.validate()
        self.facts: ModelFacts = read_facts(path)  # validates the file before llama.cpp sees it
        self.path = Path(self.facts.path)
        init_backend()
        self._lib = llama_cpp
        self._model = self._ctx = None

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = config.n_gpu_layers
        use_extra = False if config.exact else config.use_extra_buffers
        if use_extra is None:
            use_extra = extra_buffers_safe(str(self.path))
        mp.use_extra_bufts = self.extra_buffers = bool(use_extra)
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {self.path} (unsupported architecture or damaged file)")

        self.n_threads = config.n_threads or physical_cores()
        self.n_seq_max = config.max_tree_paths + 1
        cp = llama_cpp.llama_context_default_params()
        # llama.cpp rounds contexts up to 256 cells and aborts on small ones with many sequences;
        # the user's n_ctx still bounds what is generated.
        cp.n_ctx = max(config.n_ctx, 256)
        n_batch = min(config.n_batch, cp.n_ctx)
        self.max_tree_nodes = min(config.max_tree_nodes, n_batch)
        cp.n_batch = n_batch
        cp.n_ubatch = min(config.n_ubatch, n_batch)
        cp.n_seq_max = self.n_seq_max
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.embeddings = True  # post-norm hidden state of every row, next to its logits
        cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # causal LMs: none, one row per token
        cp.kv_unified = config.unified_kv  # one cell pool shared by all path sequences
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise LlamaCallError(f"llama.cpp could not create a context of {config.n_ctx} tokens for {self.path}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_cells = int(llama_cpp.llama_n_ctx(self._ctx))  # KV cells, at least n_ctx
        self.n_ctx = min(config.n_ctx, self.n_cells)  # positions a generation may use
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self._mem))
        self._batch = _Batch(n_batch, self.n_seq_max)
        self._history = np.zeros(self.n_ctx, dtype=np.int32)  # committed tokens, in cache order
        self.n_past = 0
        self._pending: TreeLayout | None = None
        self._piece_cache: dict[int, bytes] = {}
        log.info(
            "target %s: %s, n_embd %d, %d layers, vocab %d, n_ctx %d, %d threads",
            self.path.name, self.facts.architecture, self.n_embd, self.facts.n_layer,
            self.n_vocab, self.n_ctx, self.n_threads,
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the context and the model. The object is unusable afterwards."""
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ vocabulary
    @property
    def committed_tokens(self) -> np.ndarray:
        """The tokens the KV cache holds, in order (a copy)."""
        return self._history[: self.n_past].copy()

    def history(self, lo: int, hi: int | None = None) -> np.ndarray:
        """A read-only view of committed tokens [lo, hi)."""
        view = self._history[lo : self.n_past if hi is None else min(hi, self.n_past)]
        view.flags.writeable = False
        return view

    @property
    def chat_template(self) -> str | None:
        return self.facts.chat_template

    @property
    def bos_token_id(self) -> int:
        return int(self._lib.llama_vocab_bos(self._vocab))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Token ids of ``text`` (BOS added where the model wants it, if ``add_special``)."""
        if not self._model:
            raise InvalidArgumentError("the target was closed")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(f"the text holds a character that is not valid Unicode at index {e.start} "
                                       "(a lone surrogate?)") from None
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise LlamaCallError(f"tokenization failed ({n})")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens render as empty)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def detokenize_special(self, token: int) -> str:
        """The text of a token, special tokens rendered (e.g. ``<|im_start|>``)."""
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens) -> str:
        return b"".join(self.token_bytes(int(t)) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, int(token)))

    # ------------------------------------------------------------------ KV cache
    def reset(self) -> None:
        """Empty the KV cache."""
        self._lib.llama_memory_clear(self._mem, True)
        self.n_past = 0
        self._pending = None

    def truncate(self, n_keep: int) -> None:
        """Drop committed tokens from position ``n_keep`` on (reuse a common prefix)."""
        if not 0 <= n_keep <= self.n_past:
            raise InvalidArgumentError(f"n_keep must be in 0..{self.n_past}")
        self._seq_rm(-1, n_keep, -1)
        self.n_past = n_keep
        self._pending = None

    def shift_context(self, n_keep: int, n_discard: int) -> None:
        """Forget committed tokens [n_keep, n_keep + n_discard) and slide the rest back."""
        if not self.can_shift:
            raise ContextFullError("the context is full and this model's KV cache cannot be shifted")
        if n_keep < 0 or n_discard <= 0 or n_keep + n_discard > self.n_past:
            raise InvalidArgumentError("invalid context shift")
        lo, hi = n_keep, n_keep + n_discard
        self._seq_rm(0, lo, hi)
        self._lib.llama_memory_seq_add(self._mem, 0, hi, self.n_past, -n_discard)
        self._history[lo : self.n_past - n_discard] = self._history[hi : self.n_past]
        self.n_past -= n_discard
        self._pending = None

    @property
    def window_room(self) -> int:
        """Cells a batch can use without widening the attention window past the one a single
        next-token decode would use. A wider window changes llama.cpp's summation order, and
        so the logits in their last bits."""
        return -(-(self.n_past + 1) // KV_WINDOW_PAD) * KV_WINDOW_PAD - self.n_past

    def _check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextFullError(
                f"context full: {self.n_past} tokens in the cache + {n_new} new > n_ctx {self.n_ctx}"
            )

    def _check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.n_vocab):
            raise InvalidArgumentError(f"token ids must be in 0..{self.n_vocab - 1}")

    def _seq_rm(self, seq: int, lo: int, hi: int) -> None:
        """Remove cells of ``seq`` (-1: every sequence) at positions [lo, hi) (-1: open). llama.cpp
        returns false only for a partial removal it cannot do; every removal here is one it can."""
        if not self._lib.llama_memory_seq_rm(self._mem, seq, lo, hi):
            raise LlamaCallError(f"llama_memory_seq_rm(seq {seq}, {lo}, {hi}) failed")

    def _decode(self) -> None:
        if not self._ctx:
            raise InvalidArgumentError("the target was closed")
        rc = self._lib.llama_decode(self._ctx, self._batch.struct)
        if rc != 0:
            raise LlamaCallError(f"llama_decode failed with code {rc}")

    def _outputs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(n, self.n_vocab))
        hidden = np.ctypeslib.as_array(self._lib.llama_get_embeddings(self._ctx), shape=(n, self.n_embd))
        return logits, hidden

    # ------------------------------------------------------------------ evaluation
    def prefill(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Append ``tokens`` to the cache. Returns (last row's logits, hidden states of all rows), copies."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise InvalidArgumentError("prefill needs at least one token")
        self._check_tokens(tokens)
        self._check_room(tokens.size)
        self._pending = None
        hidden = np.empty((tokens.size, self.n_embd), dtype=np.float32)
        step = self._batch.capacity
        logits = None
        for start in range(0, tokens.size, step):
            chunk = tokens[start : start + step]
            self._batch.set_chain(chunk, self.n_past)
            self._decode()
            lg, hd = self._outputs(chunk.size)
            hidden[start : start + chunk.size] = hd
            logits = lg[-1].copy()
            self._history[self.n_past : self.n_past + chunk.size] = chunk
            self.n_past += chunk.size
        return logits, hidden

    def decode_one(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Append one token. Returns views of its logits [n_vocab] and hidden state [n_embd]."""
        if not 0 <= token < self.n_vocab:
            raise InvalidArgumentError(f"token id {token} is outside 0..{self.n_vocab - 1}")
        self._check_room(1)
        self._pending = None
        b = self._batch
        b.token[0] = token
        b.pos[0] = self.n_past
        b.n_seq_id[0] = 1
        b.seq_id[0, 0] = 0
        b.struct.n_tokens = 1
        self._decode()
        self._history[self.n_past] = token
        self.n_past += 1
        logits, hidden = self._outputs(1)
        return logits[0], hidden[0]

    def verify_tree(self, tokens, parents) -> TreeResult:
        """Evaluate a whole draft tree in one llama_decode.

        ``tokens[i]`` sits below node ``parents[i]``; node 0 is the root, the
        first token not yet in the cache. Returns, for every node, the logits
        and hidden state of evaluating its root-to-node path alone. Call
        :meth:`commit` before the next evaluation.
        """
        if not self.config.unified_kv:
            raise InvalidArgumentError("tree verification needs TargetConfig(unified_kv=True)")
        layout = tree_layout(tokens, parents)
        n = layout.tokens.size
        if n > self.max_tree_nodes:
            raise InvalidArgumentError(f"tree of {n} nodes exceeds max_tree_nodes {self.max_tree_nodes}")
        if layout.n_paths > self.n_seq_max:
            raise InvalidArgumentError(f"tree has {layout.n_paths} leaves; at most {self.n_seq_max} allowed")
        self._check_tokens(layout.tokens)
        self._check_room(int(layout.depth.max()) + 1)
        if self.n_past + n > self.n_cells:
            raise ContextFullError(f"no KV cells left for a tree of {n} nodes ({self.n_past} of {self.n_cells} in use)")
        # every path shares the committed prefix held by sequence 0
        for s in range(1, layout.n_paths):
            self._lib.llama_memory_seq_cp(self._mem, 0, s, 0, self.n_past)
        b = self._batch
        b.token[:n] = layout.tokens
        b.pos[:n] = self.n_past + layout.depth
        b.n_seq_id[:n] = layout.n_seq_ids
        b.seq_id[:n, : layout.n_paths] = layout.seq_ids
        b.struct.n_tokens = n
        try:
            self._decode()
        except LlamaCallError:
            self._drop_paths(layout.n_paths)
            raise
        self._pending = layout
        logits, hidden = self._outputs(n)
        return TreeResult(logits, hidden, layout)

    def decode_rows(self, tokens, positions, seq_ids) -> tuple[np.ndarray, np.ndarray]:
        """Raw multi-sequence decode: row i is token ``tokens[i]`` at ``positions[i]`` of sequence ``seq_ids[i]``.

        For batch work such as data generation, several independent sequences
        per call. It bypasses the committed-prefix bookkeeping: call
        :meth:`reset` before using prefill/verify_tree/commit again. Returns
        views of logits [n, n_vocab] and hidden states [n, n_embd].
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n = tokens.size
        if n == 0 or n > self._batch.capacity:
            raise InvalidArgumentError(f"decode_rows takes 1..{self._batch.capacity} rows, got {n}")
        seq_ids = np.asarray(seq_ids, dtype=np.int32)
        positions = np.asarray(positions, dtype=np.int32)
        if seq_ids.min() < 0 or seq_ids.max() >= self.n_seq_max:
            raise InvalidArgumentError(f"sequence ids must be in 0..{self.n_seq_max - 1}")
        if positions.min() < 0 or positions.max() >= self.n_cells:
            raise ContextFullError(f"positions must stay below {self.n_cells}")
        self._check_tokens(tokens)
        self.n_past, self._pending = 0, None
        b = self._batch
        b.token[:n] = tokens
        b.pos[:n] = positions
        b.n_seq_id[:n] = 1
        b.seq_id[:n, 0] = seq_ids
        b.struct.n_tokens = n
        self._decode()
        return self._outputs(n)

    def _drop_paths(self, n_paths: int, keep: int = 0) -> None:
        """Free a verified tree's cells: sequence 0 from ``keep`` cells past the committed ones, the other paths whole."""
        self._seq_rm(0, self.n_past + keep, -1)
        for s in range(1, n_paths):
            self._seq_rm(s, -1, -1)

    def commit(self, path) -> None:
        """Keep the verified nodes ``path`` (root first, each the parent of the next); free the rest.

        May run a small llama_decode (see below): views from verify_tree are invalid afterwards.
        """
        layout = self._pending
        if layout is None:
            raise InvalidArgumentError("commit() needs a verify_tree() call first")
        path = np.asarray(path, dtype=np.int64)
        n = layout.tokens.size
        if path.ndim != 1 or path.size == 0 or path[0] != 0 or (path >= n).any() or (path < 0).any():
            raise InvalidArgumentError("an accepted path starts at the root and names nodes of the tree")
        if path.size > 1 and (layout.parents[path[1:]] != path[:-1]).any():
            raise InvalidArgumentError("an accepted path must follow parent links")
        lo, hi = self.n_past, self.n_past + path.size
        # Nodes 0..k-1 of the tree sit in cells lo..lo+k-1, in order, on sequence 0 (the first
        # path is laid out first). Accepted nodes past them sit in scattered cells: re-evaluate
        # those few tokens as a chain so the cache stays compact and in position order, exactly
        # as plain decoding leaves it (scattered cells change the attention's summation order).
        on_first = layout.seq_ids[path, 0] == 0
        k = int(np.argmin(np.append((path == np.arange(path.size)) & on_first, False)))
        self._drop_paths(layout.n_paths, keep=k)
        self._pending = None
        if k < path.size:
            self._batch.set_chain(layout.tokens[path[k:]], lo + k)
            self._decode()
        self._history[lo:hi] = layout.tokens[path]
        self.n_past = hi
