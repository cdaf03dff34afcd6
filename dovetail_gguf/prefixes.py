"""Recent prompt prefixes kept warm in RAM: an assistant's other conversations, an editor's other files.

The target's KV cache holds one committed prefix, the live one. When a request's prompt shares little
of it (another conversation), the engine saves the live prefix here (its KV cells through
``llama_state_seq_get_data``, its row classes, and the target features the draft reads) and, when a
stored prefix shares more of the prompt than the live one does, puts that one back in its place: a
copy of what was computed, so the answer is the one a cold prefill gives (the invariant kernels and
``Target.reusable_prefix`` see to that, as for the live prefix). Least recently used out, at most
``slots`` prefixes and ``max_bytes`` in all.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from .target import SavedPrefix

log = logging.getLogger(__name__)

SAVE_MIN_TOKENS = 64  # a shorter prefix costs less to evaluate again than to keep
SWAP_MIN_TOKENS = 32  # a stored prefix replaces the live one when it shares this many more tokens


@dataclass
class CachedPrefix:
    """A saved prefix and the draft's features of its positions ``hidden_lo`` .. n-1 (None: no draft)."""

    saved: SavedPrefix
    hidden: np.ndarray | None
    hidden_lo: int

    @property
    def n_tokens(self) -> int:
        return int(self.saved.tokens.size)

    @property
    def nbytes(self) -> int:
        return self.saved.nbytes + (self.hidden.nbytes if self.hidden is not None else 0)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(a.size, b.size)
    return int(np.argmin(np.append(a[:n] == b[:n], False)))


class PrefixStore:
    """At most ``slots`` saved prefixes and ``max_bytes`` of them, least recently used out."""

    def __init__(self, slots: int, max_bytes: int):
        self.slots, self.max_bytes = int(slots), int(max_bytes)
        self._entries: list[CachedPrefix] = []  # most recently used last
        self._lock = threading.Lock()  # /health reads while the engine writes
        self.hits = 0  # prompts that took a stored prefix

    def best(self, prompt: np.ndarray) -> tuple[CachedPrefix | None, int]:
        """The stored prefix sharing the most leading tokens with ``prompt``, and how many."""
        with self._lock:  # engines of other slots may change the list meanwhile
            scored = [(common_prefix(e.saved.tokens, prompt), -i, e) for i, e in enumerate(self._entries)]
        if not scored:
            return None, 0
        shared, _, entry = max(scored, key=lambda x: x[:2])
        return entry, shared

    def take(self, entry: CachedPrefix) -> None:
        """Remove ``entry``: it becomes the live prefix."""
        with self._lock:
            self._entries = [e for e in self._entries if e is not entry]
            self.hits += 1

    def put(self, entry: CachedPrefix) -> None:
        """Keep ``entry``; the least recently used go while the store is over its bounds."""
        if self.slots < 1 or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            # a stored prefix that ``entry`` extends holds nothing ``entry`` lacks
            self._entries = [e for e in self._entries if common_prefix(e.saved.tokens, entry.saved.tokens) < e.n_tokens]
            self._entries.append(entry)
            while len(self._entries) > self.slots or sum(e.nbytes for e in self._entries) > self.max_bytes:
                gone = self._entries.pop(0)
                log.debug("prefix cache: dropped %d tokens (least recently used)", gone.n_tokens)

    def clear(self) -> None:
        with self._lock:
            self._entries = []

    def state(self) -> dict:
        """For /health and /metrics: entries, their tokens and bytes, the bounds, hits."""
        with self._lock:
            return {"slots": self.slots, "max_bytes": self.max_bytes, "entries": len(self._entries),
                    "tokens": sum(e.n_tokens for e in self._entries),
                    "bytes": sum(e.nbytes for e in self._entries), "hits": self.hits}
