"""Text embeddings: one vector per text from a GGUF, in a llama.cpp context of their own.

The context is the embedder's alone, so embedding never touches the generation's KV cache: it may
share the target's loaded weights (:meth:`Embedder.of_target`, no second copy in memory) or load
another GGUF (an embedding model, :meth:`Embedder.load`). Each text is one sequence; as many texts
as fit go into one ``llama_decode`` (a unified cell pool, a sequence each), and llama.cpp pools each
sequence's rows into one vector with the pooling the GGUF declares (an embedding model's CLS, mean
or last token). Where it declares none (a causal LM such as the targets), the vector is the mean of
the text's rows after the first (see :meth:`Embedder._decode`).
Vectors come back L2-normalised, as OpenAI's and Ollama's APIs return them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InvalidArgumentError
from .llama_handles import Batch, LlamaContext, LlamaModel

log = logging.getLogger(__name__)

MAX_TEXTS_PER_DECODE = 64  # sequences in one decode (llama.cpp allows up to 256)
# texts are packed into decodes of at most this many tokens (a longer text goes alone): every row of a
# decode attends, masked, over all of its cells. 128 to 1,024 measured alike (benchmarks/embed_speed.py)
PACK_TOKENS = 256
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@dataclass(frozen=True)
class Embeddings:
    """The vectors of a list of texts, in order: ``vectors`` [n_texts, n_embd] float32, unit length;
    ``n_tokens``: each text's token count (after truncation)."""

    vectors: np.ndarray
    n_tokens: list[int]
    seconds: float

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)


class Embedder:
    """Embeddings from one model in one context (thread-safe: one call at a time).

    ``n_ctx`` bounds a text's tokens (a longer one is cut with ``truncate``, else refused) and the
    tokens of one decode.
    """

    def __init__(self, model: LlamaModel, n_ctx: int = 2048, n_threads: int = 2, owns_model: bool = False,
                 name: str | None = None):
        import llama_cpp

        self.model, self._owns_model = model, owns_model
        self.name = name or model.path.stem
        self.vocab = model.vocab
        n_ctx = max(int(n_ctx), 256)
        # the GGUF's own pooling, done by llama.cpp; a model that declares none (a causal LM) gets the
        # mean of its rows here, the first row left out (see _decode)
        ctx = LlamaContext(model, n_ctx, n_ctx, n_ctx, MAX_TEXTS_PER_DECODE, n_threads, unified_kv=True)
        self._ctx = ctx
        self._mean_here = ctx.pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE
        self.n_ctx = ctx.n_cells
        self.n_embd = model.n_embd
        self.pooling = "mean" if self._mean_here else POOLING_NAMES.get(ctx.pooling, str(ctx.pooling))
        self._batch = Batch(self.n_ctx, 1)
        self._lock = threading.Lock()
        log.info("embeddings from %s: %d dimensions, %s pooling, %d tokens per text at most",
                 self.name, self.n_embd, self.pooling, self.n_ctx)

    @classmethod
    def of_target(cls, target, n_ctx: int | None = None) -> "Embedder":
        """Embeddings from the target's own weights (shared, not loaded again)."""
        return cls(target._model, n_ctx or min(target.n_ctx, 2048), target.n_threads, name=target.path.stem)

    @classmethod
    def load(cls, path: str | Path, n_ctx: int = 2048, n_threads: int = 2) -> "Embedder":
        """Embeddings from another GGUF (an embedding model), loaded for this embedder alone."""
        from .gguf_io import read_facts
        from .llama_runtime import init_backend

        init_backend()
        model = LlamaModel(read_facts(path))
        try:
            return cls(model, n_ctx, n_threads, owns_model=True)
        except BaseException:
            model.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._ctx.close()
                self._ctx = None
            if self._owns_model:
                self.model.close()

    def tokenize(self, text: str, truncate: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise InvalidArgumentError("each input to embed must be text")
        tokens = self.vocab.tokenize(text, add_special=True, parse_special=False)
        if tokens.size == 0:
            raise InvalidArgumentError("an input to embed is empty")
        if tokens.size > self.n_ctx:
            if not truncate:
                raise InvalidArgumentError(f"an input to embed has {tokens.size} tokens, more than the "
                                           f"embedding context's {self.n_ctx}")
            tokens = tokens[: self.n_ctx]
        return tokens

    def embed(self, texts: Sequence[str], truncate: bool = False) -> Embeddings:
        """One unit vector per text. Raises InvalidArgumentError for an empty list or text, or a text
        longer than the context (unless ``truncate``)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidArgumentError("nothing to embed: give at least one text")
        t0 = time.perf_counter()
        encoded = [self.tokenize(t, truncate) for t in texts]
        out = np.zeros((len(encoded), self.n_embd), dtype=np.float32)
        with self._lock:
            if self._ctx is None:
                raise InvalidArgumentError("the embedder was closed")
            group: list[int] = []
            packed = 0  # tokens of the texts in ``group``
            for i, tokens in enumerate(encoded):
                if group and (packed + tokens.size > PACK_TOKENS or len(group) == MAX_TEXTS_PER_DECODE):
                    self._decode(encoded, group, out)
                    group, packed = [], 0
                group.append(i)
                packed += tokens.size
            self._decode(encoded, group, out)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.where(norms > 0, norms, 1.0)
        return Embeddings(out, [int(t.size) for t in encoded], time.perf_counter() - t0)

    def _decode(self, encoded: list[np.ndarray], group: list[int], out: np.ndarray) -> None:
        """The texts ``group`` as sequences 0..n-1 of one decode; their pooled vectors into ``out``."""
        tokens = np.concatenate([encoded[i] for i in group])
        positions = np.concatenate([np.arange(encoded[i].size, dtype=np.int32) for i in group])
        seqs = np.concatenate([np.full(encoded[i].size, s, dtype=np.int32) for s, i in enumerate(group)])
        self._ctx.clear()
        self._batch.set_rows(tokens, positions, seqs)
        self._batch.logits[: tokens.size] = 1  # pooling reads every row
        self._ctx.decode(self._batch)
        if self._mean_here:
            _, hidden = self._ctx.outputs(tokens.size)  # [rows, n_embd], the texts' rows in order
            start = 0
            for i in group:
                n = encoded[i].size
                # a causal LM's first row is its attention sink: a large vector of nearly any text's
                # start, which a plain mean lets dominate (measured: 7/8 queries found their passage
                # with it on Qwen2.5-Coder-0.5B, 8/8 without; tests/test_ollama.py)
                rows = hidden[start + 1 : start + n] if n > 1 else hidden[start : start + n]
                out[i] = rows.mean(axis=0)
                start += n
        else:
            for s, i in enumerate(group):
                out[i] = self._ctx.sequence_embedding(s)
        self._ctx.clear()
