"""The target model: a GGUF on the CPU through llama.cpp's low-level API.

One :class:`Target` owns one llama.cpp model, one context and its KV cache
(the handles are :mod:`dovetail_gguf.llama_handles`).
Sequence 0 of the cache always holds exactly the committed tokens. A draft tree
is verified in one ``llama_decode``: every root-to-leaf path gets a sequence id
of its own, every node carries the ids of the paths through it, and the
committed prefix is shared with all paths, so each node attends to exactly its
ancestors. :meth:`Target.commit` keeps the accepted path and frees the rest.

Results are numpy views of llama.cpp's own output buffers: valid until the next
decode, copied only where a caller needs to keep them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ContextFullError, InvalidArgumentError, LlamaCallError
from .gguf_io import ModelFacts, read_facts
from .kernels import (DEFAULT_KERNELS, TILE_ROWS, KernelMode, apply_environment, kernel_mode, llama_cpp_patched,
                      repack_invariant)
from .llama_handles import Batch, LlamaContext, LlamaModel, Vocab
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
    n_ubatch: int = 512  # rows per compute step
    max_tree_nodes: int = 64
    max_tree_paths: int = 64  # leaves per tree; llama.cpp allows 255
    use_extra_buffers: bool | None = None  # None: automatic (kernels.repack_invariant for invariant kernels; off where AMX kernels crash)
    # which llama.cpp kernels rows may run (dovetail_gguf.kernels): "invariant" computes a row bit for
    # bit the same in any batch, so speculation, predictions and the engine's learned state never
    # change an answer; "fast" lets llama.cpp pick per batch size, which flips near-ties
    kernels: str = DEFAULT_KERNELS

    @property
    def kernel_mode(self) -> KernelMode:
        return kernel_mode(self.kernels)

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
        self.kernel_mode  # raises for an unknown setting


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


def default_extra_buffers(facts: ModelFacts, mode: KernelMode) -> bool:
    """Whether a target of ``facts`` loads llama.cpp's repacked weight layouts when its config leaves it
    open: with the fast kernels where llama.cpp's AMX kernels do not crash; with the invariant ones
    also only where every repacked type computes a row alike in any batch (a stock build's repacked
    Q4_K computes a row by its place in a block of 4)."""
    return (not mode.invariant or repack_invariant(facts.quant_types)) and extra_buffers_safe(str(facts.path))


@dataclass(frozen=True)
class SavedPrefix:
    """A committed prefix saved from the KV cache (:meth:`Target.save_prefix`)."""

    tokens: np.ndarray  # [n] int32
    row_class: np.ndarray  # [n] uint8: which kernels computed each position (see reusable_prefix)
    kv: np.ndarray  # llama_state_seq_get_data's bytes

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.row_class.nbytes + self.kv.nbytes


class Target:
    """A GGUF model on the CPU: prefill, decode one token, verify a tree, commit a path.

    The committed-prefix state machine over one :class:`LlamaModel` and one
    :class:`LlamaContext`. Its invariants, which llama.cpp's unified KV cache
    makes true and every method keeps:

    1. Sequence 0 holds exactly the committed tokens ``history[:n_past]``, at
       positions ``0..n_past-1``; no other sequence holds a cell, except the
       paths of a pending tree (checked after every commit:
       ``seq_pos_range(0) == (0, n_past - 1)``).
    2. Those tokens sit in cells ``0..n_past-1``, in position order, as plain
       one-token decoding would leave them: llama.cpp puts the rows of a batch
       into the lowest free cells, in row order, and cells freed from the end
       are the lowest free ones again. A tree's node i thus lands in cell
       ``n_past + i``, and :meth:`commit` keeps nodes 0..k-1 of the first path
       in place and re-evaluates the few accepted nodes past them.
    3. Between :meth:`verify_tree` and :meth:`commit` the tree's cells are
       pending; any other evaluation first drops them.
    4. A failed ``llama_decode`` leaves no cell past ``n_past`` (removed here).
    """

    def __init__(self, path: str | Path, config: TargetConfig | None = None, share: "Target | None" = None):
        """``share``: another Target of the same file whose loaded weights this one uses (a context of
        its own, no second copy of the model); it must outlive this one."""
        self.config = config = config or TargetConfig()
        config.validate()
        self.facts: ModelFacts = read_facts(path)  # validates the file before llama.cpp sees it
        self.path = Path(self.facts.path)
        self.kernels = mode = config.kernel_mode
        self.kernel_env = apply_environment(mode)  # before llama.cpp's first matmul in this process
        init_backend()
        self._model = self._ctx = None
        use_extra = config.use_extra_buffers
        if use_extra is None:
            use_extra = default_extra_buffers(self.facts, mode)
        self._owns_model = share is None
        self._model = LlamaModel(self.facts, config.n_gpu_layers, use_extra) if share is None else share._model
        self.extra_buffers = self._model.extra_buffers
        self.vocab: Vocab = self._model.vocab

        self.n_threads = config.n_threads or physical_cores()
        self.n_seq_max = config.max_tree_paths + 1
        self._spare_seq = config.max_tree_paths  # trees use sequences 0..n_paths - 1: never this one
        # llama.cpp rounds contexts up to 256 cells and aborts on small ones with many sequences;
        # the user's n_ctx still bounds what is generated.
        n_cells = max(config.n_ctx, 256)
        n_batch = min(config.n_batch, n_cells)
        self.n_ubatch = min(config.n_ubatch, n_batch)
        self.max_tree_nodes = min(config.max_tree_nodes, n_batch, self.n_ubatch)  # a tree is one compute step
        if mode.invariant:
            self.max_tree_nodes = min(self.max_tree_nodes, TILE_ROWS - 1)  # below the tiled kernels
        # invariant kernels (set from the probe by dovetail_gguf.invariance.apply): whether a one-token
        # decode carries a throw-away row, and whether prompt batches may run the tiled kernels
        self.pair_single = mode.invariant and not llama_cpp_patched()
        self.tiled_prefill = mode.invariant
        self.invariance = None  # the probe's findings (dovetail_gguf.invariance.Invariance)
        try:
            self._ctx = LlamaContext(self._model, n_cells, n_batch, self.n_ubatch, self.n_seq_max,
                                     self.n_threads, unified_kv=True)  # trees share one cell pool
        except LlamaCallError:
            self.close()
            raise
        self.n_cells = self._ctx.n_cells  # KV cells, at least n_ctx
        self.n_ctx = min(config.n_ctx, self.n_cells)  # positions a generation may use
        self.n_vocab = self.vocab.n_vocab
        self.n_embd = self._model.n_embd
        self._batch = Batch(n_batch, self.n_seq_max)
        self._history = np.zeros(self.n_ctx, dtype=np.int32)  # committed tokens, in cache order
        # 1 where a position was computed in a batch of TILE_ROWS+ rows (the tiled kernels), else 0
        self._row_class = np.zeros(self.n_ctx, dtype=np.uint8)
        self.n_past = 0
        # observer of every llama_decode, (rows, seconds): for benchmarks and tests; None costs nothing
        self.on_decode: Callable[[int, float], None] | None = None
        self._pending: TreeLayout | None = None
        log.info(
            "target %s: %s, n_embd %d, %d layers, vocab %d, n_ctx %d, %d threads, %s kernels%s",
            self.path.name, self.facts.architecture, self.n_embd, self.facts.n_layer,
            self.n_vocab, self.n_ctx, self.n_threads, mode.name, ", repacked layouts" if self.extra_buffers else "",
        )
        if mode.invariant:
            from .invariance import apply, load_or_probe

            try:
                apply(self, load_or_probe(self))
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the context and the model. The object is unusable afterwards."""
        if getattr(self, "_ctx", None):
            self._ctx.close()
            self._ctx = None
        if getattr(self, "_model", None):
            if getattr(self, "_owns_model", True):
                self._model.close()
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
        return self.vocab.bos_token_id

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Token ids of ``text`` (BOS added where the model wants it, if ``add_special``)."""
        if not self._model:
            raise InvalidArgumentError("the target was closed")
        return self.vocab.tokenize(text, add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens render as empty)."""
        return self.vocab.token_bytes(token)

    def detokenize_special(self, token: int) -> str:
        """The text of a token, special tokens rendered (e.g. ``<|im_start|>``)."""
        return self.vocab.detokenize_special(token)

    def detokenize(self, tokens) -> str:
        return self.vocab.detokenize(tokens)

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        return self.vocab.is_eog(token)

    # ------------------------------------------------------------------ KV cache
    def reset(self) -> None:
        """Empty the KV cache."""
        self._ctx.clear()
        self.n_past = 0
        self._pending = None

    def truncate(self, n_keep: int) -> None:
        """Drop committed tokens from position ``n_keep`` on (reuse a common prefix)."""
        if not 0 <= n_keep <= self.n_past:
            raise InvalidArgumentError(f"n_keep must be in 0..{self.n_past}")
        self._drop_pending()
        self._ctx.seq_rm(-1, n_keep, -1)
        self.n_past = n_keep

    def save_prefix(self) -> "SavedPrefix":
        """The committed prefix as it stands (tokens, row classes, KV cells), to :meth:`restore_prefix`
        later: bit for bit what was computed, so a restored prefix answers as this one would."""
        self._drop_pending()
        n = self.n_past
        return SavedPrefix(self._history[:n].copy(), self._row_class[:n].copy(), self._ctx.seq_state(0))

    def restore_prefix(self, saved: "SavedPrefix") -> None:
        """Make ``saved`` the committed prefix (whatever the cache held is dropped). On failure the
        cache is left empty."""
        self._drop_pending()
        self._ctx.clear()
        self.n_past = 0
        n = saved.tokens.size
        if n > self.n_ctx:
            raise InvalidArgumentError(f"a saved prefix of {n} tokens does not fit the context ({self.n_ctx})")
        try:
            self._ctx.set_seq_state(0, saved.kv)
            if self._ctx.seq_pos_range(0) != (0, n - 1):  # invariant 1: positions 0..n-1, nothing else
                raise LlamaCallError("a restored prefix does not hold positions 0..n-1")
        except LlamaCallError:
            self._ctx.clear()
            raise
        self._history[:n] = saved.tokens
        self._row_class[:n] = saved.row_class
        self.n_past = n

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

    def _decode(self) -> None:
        """One llama_decode of the batch; on failure, no cell past the committed ones survives (invariant 4)."""
        if not self._ctx:
            raise InvalidArgumentError("the target was closed")
        t0 = time.perf_counter() if self.on_decode is not None else 0.0
        try:
            self._ctx.decode(self._batch)
            if self.on_decode is not None:
                self.on_decode(int(self._batch.struct.n_tokens), time.perf_counter() - t0)
        except LlamaCallError:
            self._ctx.seq_rm(-1, self.n_past, -1)
            self._pending = None
            raise

    def _outputs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._ctx.outputs(n)

    def _drop_pending(self) -> None:
        """Invariant 3: a tree verified but not committed leaves no cell behind."""
        if self._pending is not None:
            self._drop_paths(self._pending.n_paths)
            self._pending = None

    def _check_committed(self) -> None:
        """Invariant 1, checked where it costs two lookups: sequence 0 spans exactly positions 0..n_past-1."""
        lo, hi = self._ctx.seq_pos_range(0)
        if (lo, hi) != ((0, self.n_past - 1) if self.n_past else (-1, -1)):
            raise LlamaCallError(f"KV cache out of step: sequence 0 holds positions {lo}..{hi}, "
                                 f"{self.n_past} tokens committed")

    # ------------------------------------------------------------------ evaluation
    def prefill(self, tokens, outputs: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Append ``tokens`` to the cache. Returns (last row's logits, hidden states of all rows), copies.

        ``outputs=False`` computes neither (returns (None, None)): no row goes through the LM
        head, which for a large vocabulary is a good part of a prompt's cost.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise InvalidArgumentError("prefill needs at least one token")
        self.vocab.check_ids(tokens)
        self._check_room(tokens.size)
        self._drop_pending()
        if tokens.size == 1 and self.pair_single:  # a lone row would run other kernels
            logits, hidden = self.decode_one(int(tokens[0]))
            return (logits.copy(), hidden[None].copy()) if outputs else (None, None)
        hidden = np.empty((tokens.size, self.n_embd), dtype=np.float32) if outputs else None
        logits = None
        if not outputs:
            self._ctx.set_embeddings(False)
            self._batch.logits[:] = 0
        try:
            for start, stop in self._chunks(tokens.size):
                chunk = tokens[start:stop]
                self._batch.set_chain(chunk, self.n_past)
                self._decode()
                if outputs:
                    lg, hd = self._outputs(chunk.size)
                    hidden[start : start + chunk.size] = hd
                    logits = lg[-1].copy()
                self._history[self.n_past : self.n_past + chunk.size] = chunk
                self._row_class[self.n_past : self.n_past + chunk.size] = chunk.size >= TILE_ROWS
                self.n_past += chunk.size
        finally:
            if not outputs:  # every other evaluation wants every row's outputs
                self._batch.logits[:] = 1
                self._ctx.set_embeddings(True)
        return logits, hidden

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """Prefill chunks of at most one compute step each. Invariant kernels: ``n`` rows split
        evenly, so with n >= TILE_ROWS every chunk has TILE_ROWS+ rows (each position then gets the
        tiled kernels' row class, see :meth:`reusable_prefix`), or, where the probe found tiled prompt
        batches to depend on their split, chunks below TILE_ROWS rows and never a lone last row."""
        step = min(self._batch.capacity, self.n_ubatch)
        if self.kernels.invariant and not self.tiled_prefill:
            step = min(step, TILE_ROWS - 1)
        n_chunks = -(-n // step)
        if self.kernels.invariant and self.tiled_prefill:
            bounds = [n * i // n_chunks for i in range(n_chunks + 1)]  # even sizes, none below n // n_chunks
        else:
            bounds = list(range(0, n, step)) + [n]
            if self.pair_single and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
                bounds[-2] -= 1  # (.., step, 1) -> (.., step - 1, 2)
        return list(zip(bounds[:-1], bounds[1:]))

    def reusable_prefix(self, prompt_size: int, common: int) -> int:
        """How much of a cached prefix shared with a prompt (``common`` tokens) to keep, so that the
        prompt's first ``prompt_size - 1`` positions end up computed exactly as a cold prefill of
        them computes them: with invariant kernels, a cold prefill gives every position the tiled
        row class when there are TILE_ROWS+ of them, else the other one; a cached position of the
        other class (a token generated earlier, say) is evaluated again, and so are enough
        positions before the prompt's end for a batch of the cold class."""
        n = prompt_size - 1  # the last prompt token is always evaluated, as a one-token decode
        n_keep = max(0, min(common, n, self.n_past))
        if not self.kernels.invariant:
            return n_keep
        cold = 1 if self.tiled_prefill and n >= TILE_ROWS else 0
        other = np.flatnonzero(self._row_class[:n_keep] != cold)
        if other.size:
            n_keep = int(other[0])
        if cold and 0 < n - n_keep < TILE_ROWS:
            n_keep = max(0, n - TILE_ROWS)
        return n_keep

    def prefill_split(self, lo: int, mid: int, hi: int) -> int:
        """Where to split a prefill of positions [lo, hi) in two calls (the first without outputs)
        near ``mid`` so that neither part is a batch of another row class than the whole."""
        if self.kernels.invariant and lo < mid < hi and min(mid - lo, hi - mid) < TILE_ROWS <= hi - lo:
            return lo
        return mid

    def decode_one(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Append one token. Returns views of its logits [n_vocab] and hidden state [n_embd]."""
        if not 0 <= token < self.n_vocab:  # the hot path's form of vocab.check_ids
            self.vocab.check_ids([token])
        self._check_room(1)
        self._drop_pending()
        self._decode_chain(np.array([token], dtype=np.int32))
        self._history[self.n_past] = token
        self._row_class[self.n_past] = 0
        self.n_past += 1
        logits, hidden = self._outputs(1)
        return logits[0], hidden[0]

    def _decode_chain(self, tokens: np.ndarray) -> None:
        """Decode consecutive tokens of sequence 0 from ``n_past``; a lone token carries a second,
        throw-away row on a spare sequence where the kernels demand it: llama.cpp then runs the batch
        kernels (a lone row gets vec_dot instead of tinyBLAS, and past 512 cells its attention is
        split across threads), so the row is computed exactly as it would be in a tree."""
        paired = tokens.size == 1 and self.pair_single and self.n_past + 2 <= self.n_cells
        if paired:
            self._batch.set_rows(np.array([tokens[0], tokens[0]], dtype=np.int32),
                                 np.array([self.n_past, 0], dtype=np.int32),
                                 np.array([0, self._spare_seq], dtype=np.int32))
        else:
            self._batch.set_chain(tokens, self.n_past)
        try:
            self._decode()
        finally:
            if paired:
                self._ctx.seq_rm(self._spare_seq, -1, -1)

    def verify_tree(self, tokens, parents) -> TreeResult:
        """Evaluate a whole draft tree in one llama_decode.

        ``tokens[i]`` sits below node ``parents[i]``; node 0 is the root, the
        first token not yet in the cache. Returns, for every node, the logits
        and hidden state of evaluating its root-to-node path alone. Call
        :meth:`commit` before the next evaluation.
        """
        layout = tree_layout(tokens, parents)
        n = layout.tokens.size
        if n > self.max_tree_nodes:
            raise InvalidArgumentError(f"tree of {n} nodes exceeds max_tree_nodes {self.max_tree_nodes}")
        if layout.n_paths > self.n_seq_max:
            raise InvalidArgumentError(f"tree has {layout.n_paths} leaves; at most {self.n_seq_max} allowed")
        self.vocab.check_ids(layout.tokens)
        self._check_room(int(layout.depth.max()) + 1)
        if self.n_past + n > self.n_cells:
            raise ContextFullError(f"no KV cells left for a tree of {n} nodes ({self.n_past} of {self.n_cells} in use)")
        self._drop_pending()
        # every path shares the committed prefix held by sequence 0
        for s in range(1, layout.n_paths):
            self._ctx.seq_cp(0, s, 0, self.n_past)
        try:
            if n == 1:  # a lone row: paired where the kernels demand it
                self._decode_chain(layout.tokens)
            else:
                self._batch.set_tree(layout.tokens, self.n_past + layout.depth, layout.seq_ids, layout.n_seq_ids)
                self._decode()
        except LlamaCallError:
            self._drop_paths(layout.n_paths)
            raise
        self._pending = layout
        logits, hidden = self._outputs(n)
        return TreeResult(logits, hidden, layout)

    def _drop_paths(self, n_paths: int, keep: int = 0) -> None:
        """Free a verified tree's cells: sequence 0 from ``keep`` cells past the committed ones, the other paths whole."""
        self._ctx.seq_rm(0, self.n_past + keep, -1)
        for s in range(1, n_paths):
            self._ctx.seq_rm(s, -1, -1)

    def commit(self, path) -> int:
        """Keep the verified nodes ``path`` (root first, each the parent of the next); free the rest.

        May run a small llama_decode (see below): views from verify_tree are invalid afterwards.
        Returns the rows that decode re-evaluated (0: none ran).
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
            self.n_past = lo + k  # where the re-evaluated rows go
            try:
                self._decode_chain(layout.tokens[path[k:]])
            except LlamaCallError:
                self._ctx.seq_rm(-1, lo, -1)
                raise
            finally:
                self.n_past = lo
        self._history[lo:hi] = layout.tokens[path]
        self._row_class[lo:hi] = 0
        self.n_past = hi
        self._check_committed()
        return int(path.size - k)
