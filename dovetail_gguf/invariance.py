"""The invariance probe: does this llama.cpp, on this CPU, with this file and thread count, compute
a row the same in any batch? Measured once, cached next to t(k) in ``verify_costs.json``.

With the invariant kernels (dovetail_gguf.kernels) the answer should be yes by construction; the
probe checks it where it matters, with random tokens after the target's current context, and sets
the target to what holds:

- trees: chains of 2..63 rows verified in one batch against the same tokens decoded one by one;
  trees are capped below the first size that differs;
- lone rows: a one-token decode against the same row decoded with a throw-away second row, at a
  short context and past 512 KV cells (where stock llama.cpp splits a lone row's attention); where
  they differ, every one-token decode carries the throw-away row (``Target.pair_single``);
- prompt batches of 64+ rows (the tiled kernels): one batch against the same tokens in two; where
  they differ, prompts are evaluated in batches below 64 rows (``Target.tiled_prefill``).

The target's cache is left as it was.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from .kernels import TILE_ROWS, llama_cpp_patched

log = logging.getLogger(__name__)

TREE_SIZES = (2, 4, 8, 16, 32, TILE_ROWS - 1)
LONG_CONTEXT = 300  # cells in use past which stock llama.cpp splits a lone row's attention (> 256)
LONE_ROWS = 8  # one-token decodes compared with paired ones, per context


@dataclass(frozen=True)
class Invariance:
    """What the probe found (see the module docstring)."""

    tree_rows: int  # the largest tree whose rows equal one-token decodes
    lone_rows_agree: bool  # a one-token decode needs no throw-away row
    tiled_prefill: bool  # prompt batches of 64+ rows give the same cache however they are split
    complete: bool  # every check ran (the context had room for all): worth caching
    patched: bool  # llama.cpp carries patches/llama-cpp-batch-invariant.patch

    def describe(self) -> str:
        """One line for the log and `dovetail info`."""
        lone = "run alone" if self.lone_rows_agree else "carry a throw-away row"
        prompt = "64+ row prompt batches on the tiled kernels" if self.tiled_prefill else \
            "prompt batches below 64 rows (tiled ones depend on the split here)"
        build = "patched llama.cpp" if self.patched else \
            "stock llama.cpp (run setup.sh for the batch-invariance patch: faster)"
        partial = "" if self.complete else ", partly probed (small context)"
        return f"invariant kernels, {build}: trees up to {self.tree_rows} rows, one-token decodes {lone}, {prompt}{partial}"


def _random_tokens(target, rng, n: int) -> np.ndarray:
    return rng.integers(0, target.n_vocab, size=n).astype(np.int32)


def _one_by_one(target, tokens: np.ndarray, paired: bool) -> np.ndarray:
    """Logits of decoding ``tokens`` one at a time from n_past, alone or with a throw-away row; cache left as it was."""
    base, keep = target.n_past, target.pair_single
    target.pair_single = paired
    try:
        rows = np.stack([target.decode_one(int(tok))[0].copy() for tok in tokens])
    finally:
        target.pair_single = keep
        target.truncate(base)
    return rows


def _as_chain(target, tokens: np.ndarray) -> np.ndarray:
    base = target.n_past
    try:
        return target.verify_tree(tokens, np.arange(-1, tokens.size - 1)).logits.copy()
    finally:
        target.truncate(base)


def probe(target) -> Invariance:
    """Run the checks on ``target`` (invariant kernels) from its current context; see the module docstring."""
    base = target.n_past
    room = min(target.n_ctx, target.n_cells) - base
    rng = np.random.default_rng(7)
    complete = True

    # trees against paired one-token decodes, and lone decodes against paired ones, short context
    limit = min(TREE_SIZES[-1], target.n_ubatch, room)
    complete &= limit == TREE_SIZES[-1]
    tokens = _random_tokens(target, rng, limit)
    ref = _one_by_one(target, tokens, paired=True)
    lone_ok = bool((_one_by_one(target, tokens[:LONE_ROWS], paired=False) == ref[:LONE_ROWS]).all())
    tree_rows, cap = 1, target.max_tree_nodes
    target.max_tree_nodes = max(cap, limit)  # the probe sizes trees past what the target allows itself
    try:
        for n in (k for k in TREE_SIZES if k <= limit):
            if not (_as_chain(target, tokens[:n]) == ref[:n]).all():
                break
            tree_rows = n
    finally:
        target.max_tree_nodes = cap

    # lone rows past 512 KV cells (300 in use)
    fill = LONG_CONTEXT - base
    if fill > 0 and room >= fill + LONE_ROWS:
        target.prefill(_random_tokens(target, rng, fill), outputs=False)
        try:
            tokens = _random_tokens(target, rng, LONE_ROWS)
            ref = _one_by_one(target, tokens, paired=True)
            lone_ok &= bool((_one_by_one(target, tokens, paired=False) == ref).all())
            if tree_rows >= LONE_ROWS and not (_as_chain(target, tokens) == ref).all():
                tree_rows = 1  # trees agree at a short context but not at a long one: trust none
        finally:
            target.truncate(base)
    elif fill > 0:
        complete = False
        lone_ok = lone_ok and target.n_cells <= 256  # attention is never split below 512 padded cells

    # a prompt batch of 2 x TILE_ROWS + 8 rows, whole and split in two
    n = 2 * TILE_ROWS + 8
    tiled_ok = False
    if room >= n + 1:
        tokens, probe_token = _random_tokens(target, rng, n), int(rng.integers(0, target.n_vocab))
        keep = target.tiled_prefill
        target.tiled_prefill = True
        try:
            after = []
            for parts in ((n,), (TILE_ROWS, n - TILE_ROWS)):
                lo = 0
                for size in parts:
                    target.prefill(tokens[lo : lo + size], outputs=False)
                    lo += size
                after.append(_one_by_one(target, np.array([probe_token], np.int32), paired=not lone_ok))
                target.truncate(base)
            tiled_ok = bool((after[0] == after[1]).all())
        finally:
            target.tiled_prefill = keep
            target.truncate(base)
    else:
        complete = False
    return Invariance(tree_rows, lone_ok, tiled_ok, complete, llama_cpp_patched())


def load_or_probe(target) -> Invariance:
    """The cached probe result for this target's machine, file, threads and kernels, else a fresh probe
    (cached when complete)."""
    from .costs import cost_key, write_entry

    key = cost_key(target) + "/invariance"
    found = _read_cached(key)
    if found is not None:
        return found
    log.info("probing llama.cpp's kernels for batch invariance (once per machine, file and thread count)")
    found = probe(target)
    if found.complete:
        write_entry(key, asdict(found))
    return found


def cached(facts, n_threads: int) -> Invariance | None:
    """The cached probe result for a file (its ``read_facts``) loaded with the default (invariant)
    kernels and ``n_threads`` threads in a new process here, or None (not probed yet)."""
    from types import SimpleNamespace

    from .costs import cost_key
    from .kernels import effective_environment, kernel_mode
    from .target import TargetConfig, default_extra_buffers

    mode = kernel_mode("invariant")
    extra = default_extra_buffers(facts, mode)
    stand_in = SimpleNamespace(path=facts.path, n_threads=n_threads, extra_buffers=extra, config=TargetConfig(),
                               kernels=mode, kernel_env=effective_environment(mode))
    return _read_cached(cost_key(stand_in) + "/invariance")


def _read_cached(key: str) -> Invariance | None:
    """The probe result cached under ``key``, or None (absent, or written in another shape)."""
    from .costs import read_entry

    entry = read_entry(key)
    try:
        return Invariance(**entry) if isinstance(entry, dict) else None
    except TypeError:
        return None


def apply(target, found: Invariance) -> None:
    """Set ``target`` to what the probe found holds, and say so in one log line."""
    target.invariance = found
    target.max_tree_nodes = min(target.max_tree_nodes, found.tree_rows)
    target.pair_single = not found.lone_rows_agree
    target.tiled_prefill = found.tiled_prefill
    log.info("%s", found.describe())
    if found.tree_rows < TILE_ROWS - 1 and target.max_tree_nodes == found.tree_rows:
        log.warning("llama.cpp computes tree rows past %d differently from one-token decodes on this "
                    "machine: trees are capped there (slower, still exact)", found.tree_rows)
