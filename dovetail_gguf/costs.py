"""Verification costs t(k), measured once per machine, target file and thread count, cached on disk.

The adaptive engine needs t(k), the time one ``llama_decode`` of a k-node tree
takes, to size its trees. Where none are cached, its first rounds verify
``CALIBRATION_SIZES`` rows in turn (real rounds, whose tokens are kept) and
time them. The figures are kept in ``verify_costs.json`` in the user's cache
folder (see :func:`dovetail_gguf.models.cache_dir`) and every later process on
the same machine, file and settings reuses them. The engine keeps refining
them from the rounds it runs: each size keeps how many decodes it has timed, their spread and
when it was last timed, and a size not timed for MAX_AGE_DAYS leaves the cache.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .llama_runtime import build_id, cpu_model
from .models import cache_dir

log = logging.getLogger(__name__)

COSTS_FILE = "verify_costs.json"
CALIBRATION_SIZES = (1, 2, 4)  # rows of the first rounds where nothing is cached; other sizes: when first used


def cost_key(target) -> str:
    """What t(k) depends on: the machine, llama.cpp, the file, the threads and the kernel choice."""
    st = os.stat(target.path)
    return json.dumps({
        "cpu": cpu_model(), "cores": os.cpu_count(), "llama_cpp": build_id(),
        "file": str(Path(target.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "threads": target.n_threads, "extra_buffers": target.extra_buffers, "gpu_layers": target.config.n_gpu_layers,
        "kernels": target.kernels.name, "kernel_env": target.kernel_env,
    }, sort_keys=True)


def _costs_path() -> Path:
    return cache_dir() / COSTS_FILE


def _read_all() -> dict:
    try:
        doc = json.loads(_costs_path().read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_entry(key: str):
    """The cached value under ``key`` (None if absent)."""
    return _read_all().get(key)


def write_entry(key: str, value) -> None:
    """Cache ``value`` (JSON) under ``key``, next to the t(k) tables."""
    _write_entry(key, value)


IMPLAUSIBLE_BELOW_T1 = 0.8  # a cached t(k) under this fraction of t(1) marks an entry timed on a busy machine
MAX_AGE_DAYS = 30.0  # a cached size not timed again for this long is dropped (t(1) is always kept)


@dataclass
class SizeStats:
    """How t(k) of one size was measured: decodes timed, the typical relative deviation of one
    timing from the mean (a decayed average of |ms - mean| / mean), and when it was last timed."""

    n: int = 0
    spread: float = 0.0
    at: float = 0.0  # unix time

    def record(self, ms: float, mean: float | None = None, rate: float = 0.1) -> None:
        """One more timing, now; with the ``mean`` it is compared with, the spread moves too (the
        mean relative deviation while there are few timings, decayed at ``rate`` after)."""
        if mean is not None and self.n:
            self.spread += max(rate, 1.0 / self.n) * (abs(ms - mean) / max(mean, 1e-9) - self.spread)
        self.n += 1
        self.at = time.time()


def load_costs(target, stats: dict[int, SizeStats] | None = None) -> dict[int, float] | None:
    """Cached t(k) in ms for this target and settings, or None. ``stats``, if given, is filled
    with each size's :class:`SizeStats`. Sizes older than MAX_AGE_DAYS are left out."""
    entry = _read_all().get(cost_key(target))
    if not isinstance(entry, dict):
        return None
    now, costs = time.time(), {}
    try:
        for k, v in entry.items():
            if not isinstance(v, dict):  # each size is {"ms", "n", "spread", "at"}
                return None
            meta = SizeStats(int(v.get("n", 1)), float(v.get("spread", 0.0)), float(v.get("at", 0.0)))
            v = v["ms"]
            if int(k) != 1 and meta.at and now - meta.at > MAX_AGE_DAYS * 86400:
                continue
            costs[int(k)] = float(v)
            if stats is not None:
                stats[int(k)] = meta
    except (TypeError, ValueError, KeyError):
        return None
    if 1 not in costs or not all(np.isfinite(v) and v > 0 for v in costs.values()):
        return None
    if min(costs.values()) < IMPLAUSIBLE_BELOW_T1 * costs[1]:  # k rows never cost less than one: timed under load
        log.info("cached t(k) for %s look measured under load (t(1) %.1f ms); measuring again", target.path.name, costs[1])
        return None
    return costs


def save_costs(target, costs: dict[int, float], stats: dict[int, SizeStats] | None = None) -> None:
    """Store t(k) for this target and settings, with each size's sample count, spread and age
    (atomically; a cache that cannot be written is only logged)."""
    stats = stats or {}
    now = time.time()
    entry = {}
    for k, v in sorted(costs.items()):
        st = stats.get(k) or SizeStats(1, 0.0, now)
        entry[str(k)] = {"ms": round(v, 4), "n": st.n, "spread": round(st.spread, 4), "at": round(st.at, 1)}
    _write_entry(cost_key(target), entry)


def _write_entry(key: str, value) -> None:
    """Read, change one entry, write atomically; under a lock, so two processes keep each other's entries."""
    path = _costs_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = _read_all()
            doc[key] = value
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the cost cache %s: %s", path, e)


EXPLORE_ROW_COST = 0.1  # t(k) past the largest measured k, per row, in units of t(1) (see estimate_ms)


def estimate_ms(table: dict[int, float], rows):
    """t(rows) in ms from measured sizes ``table`` (1 included; ``rows`` a number or an array): the one
    estimator the planner, the tree policy and the bench price rounds with.

    A measured size: its time. Any other: linear between measured sizes, but never above an
    optimistic guess, the largest measured size below it plus ``EXPLORE_ROW_COST`` t(1) a row
    (flatter than any machine measured so far; kernels that batch rows in blocks make some sizes
    much cheaper than their neighbours). So a size that might pay is tried once; its measurement
    then replaces the guess. Rows-proportional while nothing is measured.
    """
    if not table:
        return np.asarray(rows, dtype=np.float64) * 1.0
    if np.ndim(rows) == 0 and rows in table:  # the common case, a measured size: no arrays
        return float(table[rows])
    ks = np.fromiter(sorted(table), dtype=np.float64)
    vs = np.fromiter((table[k] for k in sorted(table)), dtype=np.float64, count=ks.size)
    return _estimate(ks, vs, rows)


def _estimate(ks: np.ndarray, vs: np.ndarray, rows):
    """:func:`estimate_ms` over a table as sorted arrays (sizes ``ks``, times ``vs``; ks[0] is 1)."""
    r = np.asarray(rows, dtype=np.float64)
    below = np.maximum(np.searchsorted(ks, r, side="right") - 1, 0)  # the largest measured size <= rows
    optimistic = vs[below] + (r - ks[below]) * EXPLORE_ROW_COST * vs[0]
    inside = np.interp(r, ks, vs)  # linear between measured sizes, flat past the largest
    out = np.where(r > ks[-1], optimistic, np.minimum(inside, optimistic))
    return float(out) if np.ndim(out) == 0 else out
ROW_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)  # the sizes rounds use: few to measure


SPEED_RATE = 0.25  # how fast the machine-speed estimate follows a decode's timing
SHAPE_RATE = 0.1  # how fast a size's ratio t(k) / t(1) follows its timings
OUTLIER = 1.5  # one timing moves an estimate as if it were at most this far from it (or its inverse)
STALE_AFTER_DECODES = 128  # a size no decode has timed for this many decodes is priced lower (below)
STALE_DISCOUNT = 0.75  # ... by this factor, once (a trial then costs at most 1 / 0.75 of its price)
MAX_RATIO_PER_ROW = 1.5  # t(k) / t(1) above 1.5 k: timed under load (k decodes of one row cost k t(1))


class CostModel:
    """What a round costs on this machine: t(k) by rows verified, and the per-round overhead.

    t(k) = speed * shape(k): ``speed`` is t(1) now, which every decode refines (a shared machine
    slows down and speeds up as a whole, by tens of percent, within seconds), and ``shape(k)``
    = t(k) / t(1) is learned from the decodes of k rows, each timing divided by the speed of
    its moment. A size timed only during a slow spell is then not overpriced after it, and one
    outlier moves a ratio little (a timing counts as at most ``OUTLIER`` times off). A size the
    planner stopped using because it was timed high is priced ``STALE_DISCOUNT`` lower after
    ``STALE_AFTER_DECODES`` decodes without a timing, once, so it is tried again where it might
    pay, at a price never far below its last timing.

    Calibrate: with nothing cached, the first rounds verify ``CALIBRATION_SIZES`` rows in
    turn and are timed (see the engine's calibration round). Refine: every later decode
    folds its time in; a size used for the first time, or not timed for
    ``STALE_AFTER_DECODES`` decodes, takes its next timing whole. Persist: :meth:`save` keeps
    t(k) at the current speed for the next process. Estimate: :meth:`verify_ms` answers
    for any size, arrays included (:func:`estimate_ms`); ``table`` holds t(k) of the sizes timed recently.
    """

    def __init__(self, target, max_rows: int):
        self.target = target
        self.max_rows = max_rows
        self.table: dict[int, float] | None = None  # None: not loaded yet; {} while calibrating
        self.stats: dict[int, SizeStats] = {}  # per size: timings, spread, last timed
        self.calibration: list[int] = []  # rows the next rounds verify to time t(k)
        self.overhead_ms = 0.0  # per-round work outside decodes and drafting (planning, accepting, ...)
        self.speed = 0.0  # t(1) in ms now
        self.shape: dict[int, float] = {}  # t(k) / t(1), 1 included
        self._timed_at: dict[int, int] = {}  # the decode count when each size was last timed
        self._decodes = 0
        self._arrays: tuple[dict, np.ndarray, np.ndarray] | None = None  # (the table they hold, sizes, t)
        self.dirty = False

    def ready(self) -> bool:
        """Whether t(k) is known (cached, or calibrated); the first call loads the cache, or
        starts calibrating (the next rounds' sizes are then in ``calibration``)."""
        if self.table is None:
            stats: dict[int, SizeStats] = {}
            cached = load_costs(self.target, stats)
            if cached is None:
                self.table, self.stats = {}, {}
                self.calibration = [k for k in (1, *CALIBRATION_SIZES) if k <= self.max_rows]
                return False
            self.adopt(cached)
            self.stats = stats
        return not self.calibration

    def adopt(self, costs: dict[int, float]) -> None:
        """Start from t(k) in ms (1 included), as cached or calibrated."""
        self.speed = float(costs[1])
        self.shape = {k: _plausible(k, float(v) / self.speed) for k, v in costs.items()}
        self._timed_at = {k: self._decodes for k in costs}
        self.table = {}
        self._refresh()

    def _refresh(self) -> None:
        """``table`` (in place: the tree policy holds it) from the speed and each size's ratio."""
        for k, r in self.shape.items():
            if self._age(k):  # not timed for long: lower, but not below the optimistic guess
                r = max(r * STALE_DISCOUNT, 1.0 + EXPLORE_ROW_COST * (k - 1))
            self.table[k] = self.speed * r

    def _age(self, k: int) -> int:
        """Whole STALE_AFTER_DECODES spans since size ``k`` was last timed (t(1) never ages: every
        timing refines the speed)."""
        return 0 if k == 1 else (self._decodes - self._timed_at.get(k, self._decodes)) // STALE_AFTER_DECODES

    def verify_ms(self, rows):
        """t(rows) in ms (a number or an array) by :func:`estimate_ms` over ``table``."""
        if not self.table:
            return estimate_ms(self.table, rows)
        if self._arrays is None or self._arrays[0] != self.table:  # the table changed (a timing, a test)
            ks = np.fromiter(sorted(self.table), dtype=np.float64)
            vs = np.fromiter((self.table[k] for k in ks.astype(int).tolist()), dtype=np.float64, count=ks.size)
            self._arrays = (dict(self.table), ks, vs)
        _, ks, vs = self._arrays
        return _estimate(ks, vs, rows)

    def record(self, rows: int, seconds: float) -> bool:
        """A decode of ``rows`` rows took ``seconds``; returns True when t(rows) was refined."""
        if self.table is None:
            return False
        ms = 1000 * seconds
        if not self.shape:  # calibrating: the quickest of its rounds' timings (a first decode can be slow)
            self.table[rows] = min(self.table.get(rows, ms), ms)
            self.stats.setdefault(rows, SizeStats()).record(ms)
            return False
        if rows in self.shape and not self._age(rows):  # t(1) always is: adopt() starts from it
            expected = self.speed * self.shape[rows]
            self.stats.setdefault(rows, SizeStats()).record(ms, expected)
            off = min(max(ms / expected, 1.0 / OUTLIER), OUTLIER)  # this timing against the estimate
            if rows > 1:  # the ratio moves with the timing at the speed of its moment
                self.shape[rows] = _plausible(rows, self.shape[rows] * (1.0 + SHAPE_RATE * (off - 1.0)))
            self.speed *= 1.0 + SPEED_RATE * (off - 1.0)
        else:  # a new size, or one not timed for long: this timing replaces the guess
            self.stats[rows] = SizeStats()
            self.stats[rows].record(ms)
            self.shape[rows] = _plausible(rows, ms / self.speed)
        self._decodes += 1
        self._timed_at[rows] = self._decodes
        self._refresh()
        self.dirty = True
        return True

    def record_overhead(self, ms: float) -> None:
        self.overhead_ms += 0.1 * (max(ms, 0.0) - self.overhead_ms)

    def finish_calibration(self) -> bool:
        """After the last calibration round: True when t(k) is now known; else measure again next time."""
        if len(self.table) < 2:  # no room for a tree: measure again next time
            self.table = None
            return False
        log.info("verification cost (ms) by rows: %s", {k: round(v, 2) for k, v in sorted(self.table.items())})
        self.adopt(dict(self.table))
        self.dirty = True
        return True

    def save(self) -> None:
        if self.dirty and self.table:
            save_costs(self.target, self.table, self.stats)
        self.dirty = False


def _plausible(k: int, ratio: float) -> float:
    """t(k) / t(1) within what a machine can show: k rows cost at least one and at most
    ``MAX_RATIO_PER_ROW`` k (a ratio above was timed while the machine was busy)."""
    return 1.0 if k == 1 else min(max(ratio, 1.0), MAX_RATIO_PER_ROW * k)
