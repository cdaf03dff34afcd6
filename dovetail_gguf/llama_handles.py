"""Thin wrappers of llama.cpp's C handles: one class per handle, each owning (or borrowing) its pointer.

- :class:`LlamaModel` owns a ``llama_model*`` and frees it on :meth:`close`.
- :class:`Vocab` borrows the model's ``llama_vocab*`` (valid while the model
  is): tokenizer and detokenizer.
- :class:`LlamaContext` owns a ``llama_context*`` and its KV memory: decode,
  output views, sequence removal / copy / shift.
- :class:`Batch` is a ``llama_batch`` whose arrays are numpy buffers owned by
  Python, so filling a batch is a handful of vectorized writes.
- :class:`GrammarState` owns a grammar ``llama_sampler*``: which tokens a GBNF
  grammar allows next, and accepting one.

No state beyond the handles lives here; what the cells mean (the committed
prefix, a tree's paths) is the business of :mod:`dovetail_gguf.target` and of
data generation.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError, LlamaCallError, ModelFileError
from .gguf_io import ModelFacts


class _OwnedHandle:
    """A C handle this object frees exactly once: on :meth:`close`, or when collected."""

    handle = None

    def _free(self, handle) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.handle:
            self._free(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class LlamaModel(_OwnedHandle):
    """A loaded GGUF model (``llama_model*``). Contexts made from it must be closed first."""

    def __init__(self, facts: ModelFacts, n_gpu_layers: int = 0, use_extra_buffers: bool = True):
        import llama_cpp

        self._lib = llama_cpp
        self.facts = facts
        self.path = Path(facts.path)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        # extra buffer types: llama.cpp's repacked CPU weight layouts (faster; a batch row may then be
        # computed by other kernels than a one-token decode)
        mp.use_extra_bufts = self.extra_buffers = bool(use_extra_buffers)
        self.handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.handle:
            raise ModelFileError(f"llama.cpp could not load {self.path} (unsupported architecture or damaged file)")
        self.vocab = Vocab(self)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.handle))

    def _free(self, handle) -> None:
        self._lib.llama_model_free(handle)


class Vocab:
    """The model's vocabulary and tokenizer (a borrowed ``llama_vocab*``)."""

    def __init__(self, model: LlamaModel):
        self._lib = model._lib
        self._model = model
        self.facts = model.facts
        self.handle = model._lib.llama_model_get_vocab(model.handle)
        self.n_vocab = int(model._lib.llama_vocab_n_tokens(self.handle))
        self._piece_cache: dict[int, bytes] = {}

    @property
    def chat_template(self) -> str | None:
        return self.facts.chat_template

    def check_ids(self, ids, what: str = "token ids") -> np.ndarray:
        """``ids`` as an int32 array; raises InvalidArgumentError if one is outside the vocabulary
        (llama.cpp aborts the process on such an id). The one place this range is checked."""
        arr = np.asarray(ids)
        if arr.size and (arr.dtype.kind not in "iu" or arr.ndim != 1 or int(arr.min()) < 0
                         or int(arr.max()) >= self.n_vocab):
            raise InvalidArgumentError(f"{what} must be in 0..{self.n_vocab - 1}")
        return arr.astype(np.int32, copy=False).reshape(-1)

    @property
    def bos_token_id(self) -> int:
        return int(self._lib.llama_vocab_bos(self.handle))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Token ids of ``text`` (BOS added where the model wants it, if ``add_special``)."""
        if not self._model.handle:
            raise InvalidArgumentError("the model was closed")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(f"the text holds a character that is not valid Unicode at index {e.start} "
                                       "(a lone surrogate?)") from None
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self.handle, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # llama_tokenize returns minus the size it needs
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self.handle, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise LlamaCallError(f"tokenization failed ({n})")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens render as empty)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self.handle, token, buf, 64, 0, False)
            if n < 0:  # minus the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self.handle, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def detokenize_special(self, token: int) -> str:
        """The text of a token, special tokens rendered (e.g. ``<|im_start|>``)."""
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self.handle, int(token), buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens) -> str:
        return b"".join(self.token_bytes(int(t)) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        return bool(self._lib.llama_vocab_is_eog(self.handle, int(token)))


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class GrammarState(_OwnedHandle):
    """A GBNF grammar at some point of its input (a grammar ``llama_sampler*``, owned).

    llama.cpp aborts the process if a grammar is made to accept a token it does not allow, so
    :meth:`accept` is only ever called after :meth:`allows` said yes (the sampler guarantees it).
    """

    def __init__(self, vocab: Vocab, gbnf: str, root: str = "root", _handle=None):
        self._lib = vocab._lib
        self._vocab = vocab
        if _handle is not None:
            self.handle = _handle
            return
        self.handle = self._lib.llama_sampler_init_grammar(vocab.handle, gbnf.encode("utf-8"), root.encode("utf-8"))
        if not self.handle:
            raise InvalidArgumentError("llama.cpp could not parse the grammar (run with -vv for its message)")

    def _free(self, handle) -> None:
        self._lib.llama_sampler_free(handle)

    def clone(self) -> "GrammarState":
        return GrammarState(self._vocab, "", _handle=self._lib.llama_sampler_clone(self.handle))

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids)] bool: which of ``ids`` the grammar allows next (one llama.cpp call)."""
        data = np.zeros(len(ids), dtype=_TOKEN_DATA)
        data["id"] = ids
        arr = self._lib.llama_token_data_array(
            data.ctypes.data_as(ctypes.POINTER(self._lib.llama_token_data)), len(ids), -1, False)
        self._lib.llama_sampler_apply(self.handle, ctypes.byref(arr))
        return np.isfinite(data["logit"])

    def allows(self, token: int) -> bool:
        return bool(self.allowed(np.array([token], dtype=np.int32))[0])

    def accept(self, token: int) -> None:
        """Advance past ``token``, which :meth:`allows` must have accepted."""
        self._lib.llama_sampler_accept(self.handle, int(token))


class Batch:
    """A ``llama_batch`` whose arrays are numpy buffers owned by Python."""

    def __init__(self, capacity: int, n_seq_max: int):
        import llama_cpp

        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)  # [capacity]
        self.pos = np.zeros(capacity, dtype=np.int32)  # [capacity]
        self.n_seq_id = np.ones(capacity, dtype=np.int32)  # [capacity]
        self.seq_id = np.zeros((capacity, n_seq_max), dtype=np.int32)  # [capacity, n_seq_max]
        self.logits = np.ones(capacity, dtype=np.int8)  # every row outputs
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

    def set_rows(self, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray | int) -> None:
        """Row i: ``tokens[i]`` at ``positions[i]`` of the single sequence ``seq_ids[i]`` (an int: all rows')."""
        n = tokens.shape[0]
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.n_seq_id[:n] = 1
        self.seq_id[:n, 0] = seq_ids
        self.struct.n_tokens = n

    def set_chain(self, tokens: np.ndarray, first_pos: int) -> None:
        """Consecutive tokens of sequence 0 from position ``first_pos``."""
        n = tokens.shape[0]
        self.set_rows(tokens, np.arange(first_pos, first_pos + n, dtype=np.int32), 0)

    def set_tree(self, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray, n_seq_ids: np.ndarray) -> None:
        """Row i: ``tokens[i]`` at ``positions[i]``, in the ``n_seq_ids[i]`` sequences ``seq_ids[i, :n]``."""
        n, width = seq_ids.shape
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.n_seq_id[:n] = n_seq_ids
        self.seq_id[:n, :width] = seq_ids
        self.struct.n_tokens = n


class LlamaContext(_OwnedHandle):
    """A ``llama_context*`` and its KV memory, made from a :class:`LlamaModel` (which must outlive it).

    Every row of a decode outputs logits and the post-norm hidden state
    (``embeddings = True``, no pooling).
    """

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int,
                 n_threads: int, unified_kv: bool, pooling: int | None = None):
        import llama_cpp

        self._lib = llama_cpp
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = n_seq_max
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.embeddings = True  # post-norm hidden state of every row, next to its logits
        # unspecified: the GGUF's own (causal LMs: none, one row per token); an embedding context
        # pools each sequence into one vector (llama_get_embeddings_seq)
        cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if pooling is None else pooling
        cp.kv_unified = unified_kv  # one cell pool shared by all sequences (trees need it)
        self.handle = llama_cpp.llama_init_from_model(model.handle, cp)
        if not self.handle:
            raise LlamaCallError(f"llama.cpp could not create a context of {n_ctx} tokens for {model.path}")
        self.memory = llama_cpp.llama_get_memory(self.handle)
        self.n_cells = int(llama_cpp.llama_n_ctx(self.handle))  # llama.cpp may round n_ctx up
        self.n_vocab = model.vocab.n_vocab
        self.n_embd = model.n_embd
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.memory))
        self.pooling = int(llama_cpp.llama_pooling_type(self.handle))  # what llama.cpp settled on

    def _free(self, handle) -> None:
        self._lib.llama_free(handle)

    def set_embeddings(self, on: bool) -> None:
        """Hidden states (and so logits) for every row (on, the default), or outputs only where
        the batch asks for them (off: a prefill that needs no outputs skips the LM head)."""
        self._lib.llama_set_embeddings(self.handle, bool(on))

    def decode(self, batch: Batch) -> None:
        """``llama_decode``. Its codes (llama.h): 0 ok; 1 no KV slot for the batch; -1 invalid batch;
        2 aborted and < -1 fatal, both leaving the micro-batches already processed in the memory.
        All but 0 raise :class:`LlamaCallError`; the caller removes what the failed call may have left."""
        if not self.handle:
            raise InvalidArgumentError("the target was closed")
        rc = self._lib.llama_decode(self.handle, batch.struct)
        if rc != 0:
            raise LlamaCallError(f"llama_decode failed with code {rc}")

    def outputs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the last decode's logits [n, n_vocab] and hidden states [n, n_embd] (valid until the next)."""
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self.handle), shape=(n, self.n_vocab))
        hidden = np.ctypeslib.as_array(self._lib.llama_get_embeddings(self.handle), shape=(n, self.n_embd))
        return logits, hidden

    def sequence_embedding(self, seq: int) -> np.ndarray:
        """A pooled context's vector of sequence ``seq`` after the last decode [n_embd] (a view)."""
        ptr = self._lib.llama_get_embeddings_seq(self.handle, seq)
        if not ptr:
            raise LlamaCallError(f"llama.cpp holds no pooled embedding of sequence {seq}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    # ------------------------------------------------------------------ KV memory
    def clear(self) -> None:
        self._lib.llama_memory_clear(self.memory, True)

    def seq_rm(self, seq: int, lo: int, hi: int) -> None:
        """Remove cells of ``seq`` (-1: every sequence) at positions [lo, hi) (-1: open). llama.cpp
        returns false only for a partial removal it cannot do (recurrent models); that raises."""
        if not self._lib.llama_memory_seq_rm(self.memory, seq, lo, hi):
            raise LlamaCallError(f"llama_memory_seq_rm(seq {seq}, {lo}, {hi}) failed")

    def seq_cp(self, src: int, dst: int, lo: int, hi: int) -> None:
        """Add sequence ``dst`` to the cells of ``src`` at positions [lo, hi) (shares them, copies nothing)."""
        self._lib.llama_memory_seq_cp(self.memory, src, dst, lo, hi)

    def seq_add(self, seq: int, lo: int, hi: int, delta: int) -> None:
        """Shift the positions of ``seq``'s cells in [lo, hi) by ``delta`` (RoPE re-applied lazily)."""
        self._lib.llama_memory_seq_add(self.memory, seq, lo, hi, delta)

    def seq_state(self, seq: int) -> np.ndarray:
        """``llama_state_seq_get_data``: the cells of ``seq`` (positions and K/V), as bytes (uint8)."""
        size = int(self._lib.llama_state_seq_get_size(self.handle, seq))
        buf = np.empty(size, dtype=np.uint8)
        got = int(self._lib.llama_state_seq_get_data(self.handle, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                     size, seq))
        if got != size:
            raise LlamaCallError(f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return buf

    def set_seq_state(self, seq: int, state: np.ndarray) -> None:
        """``llama_state_seq_set_data``: put cells saved by :meth:`seq_state` into ``seq`` (0 = failed: raises)."""
        got = int(self._lib.llama_state_seq_set_data(self.handle, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                     state.size, seq))
        if got == 0:
            raise LlamaCallError("llama_state_seq_set_data could not restore a saved sequence")

    def seq_pos_range(self, seq: int) -> tuple[int, int]:
        """(smallest, largest) position held by ``seq``; (-1, -1) when it holds none."""
        return (int(self._lib.llama_memory_seq_pos_min(self.memory, seq)),
                int(self._lib.llama_memory_seq_pos_max(self.memory, seq)))
