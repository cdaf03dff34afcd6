"""The one thread that owns the engine, its bounded FIFO queue, and the server's counters."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from ..api import Dovetail
from ..engine import Request
from ..errors import DovetailError
from ..options import LIMITS
from ..prefixes import common_prefix

log = logging.getLogger(__package__)

class Metrics:
    """Counters for ``GET /metrics``, in Prometheus's text format. The engine worker counts generations,
    a middleware counts responses by status; one lock serves both threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[int] = collections.Counter()
        self.generations = self.prompt_tokens = self.completion_tokens = self.rounds = self.accepted_tokens = 0
        self.tokens_per_second = 0.0  # of the last generation that finished (not cancelled)

    def request(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def generation(self, result) -> None:
        """Count a generation that ended or was cancelled (its tokens were computed either way)."""
        if result is None:
            return
        s = result.stats
        with self._lock:
            self.generations += 1
            self.prompt_tokens += s.n_prompt_tokens
            self.completion_tokens += s.n_tokens
            self.rounds += s.rounds
            self.accepted_tokens += s.accepted_tokens
            if result.finish_reason not in ("cancelled", "error") and s.n_tokens:
                self.tokens_per_second = s.tokens_per_second

    def text(self, worker: "EngineWorker") -> str:
        """The exposition text (format 0.0.4)."""
        with self._lock:
            rows = [
                ("requests_total", "counter", "HTTP responses, by status code.",
                 [(f'{{status="{k}"}}', v) for k, v in sorted(self.requests.items())]),
                ("generations_total", "counter", "Generations that ended or were cancelled.", [("", self.generations)]),
                ("prompt_tokens_total", "counter", "Prompt tokens of those generations.", [("", self.prompt_tokens)]),
                ("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)]),
                ("rounds_total", "counter", "Decoding rounds (one target call each); tokens per round is "
                 "accepted_tokens_total / rounds_total.", [("", self.rounds)]),
                ("accepted_tokens_total", "counter", "Tokens emitted by rounds, the target's own token included.",
                 [("", self.accepted_tokens)]),
                ("tokens_per_second", "gauge", "Decode speed of the last finished generation.",
                 [("", round(self.tokens_per_second, 3))]),
                ("queue_depth", "gauge", "Requests waiting for the engine.", [("", worker.queue_depth)]),
                ("max_queue", "gauge", "The queue's bound; past it a request gets 429.", [("", worker.max_queue)]),
                ("busy", "gauge", "1 while the engine runs a generation.", [("", int(worker.busy))]),
                ("in_flight", "gauge", "Generations running side by side (at most --parallel).", [("", worker.in_flight)]),
            ]
        prefixes = worker.dt.prefixes.state() if worker.dt.prefixes is not None else None
        if prefixes is not None:
            rows += [
                ("cached_prefixes", "gauge", "Prompt prefixes kept warm in RAM besides the live one.", [("", prefixes["entries"])]),
                ("cached_prefix_bytes", "gauge", "RAM those prefixes take.", [("", prefixes["bytes"])]),
                ("cached_prefix_hits_total", "counter", "Prompts that continued a prefix kept warm.", [("", prefixes["hits"])]),
            ]
        out = []
        for name, kind, help_text, samples in rows:
            out += [f"# HELP dovetail_{name} {help_text}", f"# TYPE dovetail_{name} {kind}"]
            out += [f"dovetail_{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"


class QueueFullError(DovetailError):
    """The request queue is at its bound; try again later."""


@dataclass(eq=False)  # a job is itself: the queue finds it by identity
class Job:
    """One generation request, checked (engine.Request), in; events out (on the event loop's queue).

    Events: ("piece", str), ("done", GenerationResult), ("error", DovetailError | Exception).
    """

    request: Request
    loop: asyncio.AbstractEventLoop
    warm_only: bool = False  # evaluate the prompt into the cache, generate nothing (then "done", its GenerationStats)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # set once the engine let go of it
    result: object = None  # the GenerationResult, also of a cancelled generation (once ``finished``)

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            self.cancelled.set()


async def job_events(worker: "EngineWorker", job: Job, request=None):
    """``job``'s events as they come: ("piece", str) ..., then ("done", result) or ("error", e). With
    ``request`` (a starlette Request), its client is looked at every half second, pieces or not: once
    it is gone the job is cancelled and ("gone", None) is the last event."""
    checked = time.monotonic()
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            kind, value = None, None
        if request is not None and time.monotonic() - checked > 0.5:
            checked = time.monotonic()
            if await request.is_disconnected():  # the client gave up: free its place or the engine
                worker.cancel(job)
                yield "gone", None
                return
        if kind is not None:
            yield kind, value
            if kind in ("done", "error"):
                return


async def final_event(worker: "EngineWorker", job: Job, request=None) -> tuple[str, object]:
    """A whole (not streamed) answer's end: ("done", result), ("error", e) or ("gone", None), pieces
    skipped; the job is cancelled on the way out (a no-op once done)."""
    try:
        async for kind, value in job_events(worker, job, request):
            if kind != "piece":
                return kind, value
        return "gone", None
    finally:
        worker.cancel(job)


class EngineWorker:
    """The one thread that runs generations: up to one per engine slot (``Dovetail(parallel=N)``) side
    by side, a round of each in turn, so a short request is not stuck behind a long one; the rest wait
    in FIFO order, at most ``max_queue`` of them."""

    def __init__(self, dt: Dovetail, max_queue: int = LIMITS["max_queue"].default, metrics: Metrics | None = None):
        self.dt = dt
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else Metrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[_Active] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dovetail-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def parallel(self) -> int:
        return len(self.dt.slots)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop ``job`` from the queue, or stop its generation at its next round."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def stop(self) -> None:
        """Cancel everything; the worker ends after the current round."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
            for a in self._active:
                a.job.cancelled.set()
            self._waiting.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._active:
                    return
                admitted = []
                free = [i for i in range(self.parallel) if i not in {a.slot for a in self._active}]
                while self._waiting and free:
                    job = self._waiting.popleft()
                    slot = self._pick_slot(job, free)
                    free.remove(slot)
                    admitted.append((job, slot))
            for job, slot in admitted:
                self._start(job, slot)
            for a in list(self._active):  # a round of each generation in flight, in turn
                if not self._step(a):
                    with self._cond:
                        self._active.remove(a)

    def _pick_slot(self, job: Job, free: list[int]) -> int:
        """The free slot whose live prefix shares most of the job's prompt (the first on a tie: it has the draft)."""
        prompt = job.request.prompt
        return max(free, key=lambda i: (common_prefix(self.dt.slots[i].engine.target.history(0), prompt), -i))

    def _start(self, job: Job, slot: int) -> None:
        if job.cancelled.is_set():
            job.finished.set()
            return
        try:
            if job.warm_only:
                job.send("done", self.dt.warm(job.request, slot))
                job.finished.set()
                return
            stream = self.dt.stream_request(job.request, slot)
        except Exception as e:  # noqa: BLE001 - the client gets the error, the worker goes on
            self._fail(job, e)
            return
        with self._cond:
            self._active.append(_Active(job, stream, slot))

    def _step(self, a: "_Active") -> bool:
        """One piece of ``a`` (at most one round of its engine); False once it ended."""
        job = a.job
        try:
            if job.cancelled.is_set():
                raise StopIteration
            job.send("piece", next(a.stream))
            return True
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001
            a.stream.close()
            self._fail(job, e)
            return False
        a.stream.close()  # also frees the engine after a cancel
        job.result = a.stream.result
        if job.result is not None:
            self.metrics.generation(job.result)
        if not job.cancelled.is_set():
            job.send("done", job.result)
        job.finished.set()
        return False

    @staticmethod
    def _fail(job: Job, e: BaseException) -> None:
        if not isinstance(e, DovetailError):  # a bug must not kill the worker; the client gets a 500 event
            log.error("generation failed", exc_info=e)
        job.send("error", e)
        job.finished.set()


@dataclass(eq=False)
class _Active:
    """A generation in flight: its job, its stream, the engine slot it holds."""

    job: Job
    stream: object
    slot: int
