"""The public Python API: load a target (and a draft), then generate, stream or chat.

    from dovetail_gguf import Dovetail
    with Dovetail() as dt:                      # default pair: SmolLM2 + shipped draft
        print(dt.generate("Write a haiku about CPUs.", max_tokens=64).text)
        for piece in dt.stream("def fib(n):"):
            print(piece, end="", flush=True)

One engine serves one generation at a time; calls from other threads wait
their turn. The KV cache is reused across calls when prompts share a prefix.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .chat import Message, chat_tokens
from .engine import Engine, Generation, Request
from .errors import InvalidArgumentError
from .fim import Chunk, infill_prompt
from .models import default_draft_for, resolve_target
from .options import LIMITS, GenerateOptions, check
from .embed import Embedder, Embeddings
from .prefixes import PrefixStore
from .types import GenerationResult, GenerationStats, TreeConfig
from .target import Target, TargetConfig

log = logging.getLogger(__name__)

class Dovetail:
    """A loaded target (CPU) and optional draft (GPU or CPU), ready to generate."""

    def __init__(
        self,
        target: str | Path | None = None,
        draft: str | Path | None | bool = None,
        *,
        device: str = "auto",
        draft_dtype: str = "auto",
        tree: TreeConfig | None = None,
        target_config: TargetConfig | None = None,
        adaptive: bool = True,
        ngram: bool | None = None,
        cache_slots: int = LIMITS["cache_slots"].default,
        cache_ram_mib: int = LIMITS["cache_ram_mib"].default,
        parallel: int = 1,
    ):
        """``draft``: a draft folder, None for the shipped default (if any), False for none.

        ``draft_dtype``: the draft's weights, "auto" (bf16/fp16 on a GPU, fp32 on a CPU), "fp32", "bf16", "fp16".
        ``adaptive``: size each round's tree from measured costs and acceptance, and fall back
        to plain decoding where speculation does not pay; False always drafts ``tree``.
        ``ngram``: add continuations found earlier in the context as a free branch of each tree
        (None: whenever a draft model is used); with ``draft=False`` it is suffix-index-only speculation.
        ``cache_slots``, ``cache_ram_mib``: prompt prefixes kept warm in RAM besides the live one
        (another conversation returning is not evaluated again), and the RAM they may take.
        ``parallel``: engines that generate side by side (a server's requests in flight): the first
        with the draft, the others over the same weights in contexts of their own, without it (the
        suffix index as ``ngram`` says); the same request gets the same answer in any of them.
        """
        cache_slots, cache_ram_mib = check("cache_slots", cache_slots), check("cache_ram_mib", cache_ram_mib)
        parallel = check("parallel", parallel)
        self.target = Target(resolve_target(target), target_config)
        self.drafter = None
        self.drafter_path: Path | None = None  # the draft folder in use
        if draft is not False:
            draft_dir = default_draft_for(self.target.facts) if draft in (None, True) else Path(draft)
            if draft_dir is not None:
                from .draft.io import load_drafter

                self.drafter = load_drafter(draft_dir, self.target, device=device, dtype=draft_dtype)
                self.drafter_path = draft_dir
            elif draft is True:
                raise InvalidArgumentError("no draft given and no default draft is installed")
        use_ngram = self.drafter is not None if ngram is None else bool(ngram)
        self.prefixes = PrefixStore(cache_slots, cache_ram_mib * 2**20) if cache_slots else None
        self.engine = Engine(self.target, self.drafter, tree, adaptive=adaptive, ngram=use_ngram, prefixes=self.prefixes)
        self.slots: list[_Slot] = [_Slot(self.engine)]
        try:
            for _ in range(parallel - 1):
                extra = Target(self.target.path, self.target.config, share=self.target)
                engine = Engine(extra, None, tree, adaptive=adaptive, ngram=use_ngram, prefixes=self.prefixes)
                # what the first engine learns of the suffix index's matches holds for every slot
                engine.share_learning(self.engine)
                self.slots.append(_Slot(engine))
        except BaseException:
            for slot in self.slots[1:]:
                slot.engine.target.close()
            self.target.close()
            raise
        self._closed = False
        self._embedder = None  # made on the first embed(): a context of its own over the target's weights
        self._embedder_lock = threading.Lock()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the target; every later call raises InvalidArgumentError. Waits for a running generation."""
        for slot in self.slots:
            slot.refuse_reentry()
        for slot in self.slots:
            slot.lock.acquire()
        try:
            self._closed = True
            with self._embedder_lock:
                if self._embedder is not None:
                    self._embedder.close()  # before the weights it shares
                    self._embedder = None
            for slot in self.slots[1:]:  # before the weights they share
                slot.engine.target.close()
            self.target.close()
        finally:
            for slot in self.slots:
                slot.lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this Dovetail was closed; create a new one")

    def _acquire(self, slot: int = 0) -> Engine:
        """Hold engine ``slot`` (waiting while another generation runs on it)."""
        if not 0 <= slot < len(self.slots):
            raise InvalidArgumentError(f"slot must be in 0..{len(self.slots) - 1}")
        s = self.slots[slot]
        s.refuse_reentry()
        s.lock.acquire()
        if self._closed:
            s.lock.release()
            self._check_open()
        s.holder = threading.get_ident()
        return s.engine

    def _release(self, slot: int = 0) -> None:
        s = self.slots[slot]
        s.holder = None
        s.lock.release()

    def __enter__(self) -> "Dovetail":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    # Keyword arguments of every generation method are GenerateOptions' fields (max_tokens,
    # temperature, top_p, top_k, seed, stop, prediction, min_p, the penalties, logit_bias, grammar,
    # json_schema, logprobs); or pass ``options=GenerateOptions(...)`` built once.
    def tokenize_prompt(self, prompt: str) -> list[int]:
        self._check_open()
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgumentError("the prompt is empty")
        return self.target.tokenize(prompt, add_special=True, parse_special=False).tolist()

    def chat_prompt_tokens(self, messages: Iterable[Message], tools: Sequence[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template; message text stays plain
        text. ``tools``: OpenAI-shaped tool definitions for templates with tool support."""
        self._check_open()
        return chat_tokens(self.target, messages, tools).tolist()

    def prepare(self, prompt_tokens: Sequence[int], options: GenerateOptions | None = None, **kwargs) -> Request:
        """Check a request against the loaded model without running it (see :meth:`Engine.prepare`):
        ``options``, or keywords as in :class:`GenerateOptions`, not both. A prepared request runs once."""
        self._check_open()
        if options is not None and kwargs:
            raise InvalidArgumentError(f"give options or keywords, not both (got {', '.join(kwargs)})")
        if options is None:
            try:
                options = GenerateOptions(**kwargs)
            except TypeError as e:  # an unknown keyword
                raise InvalidArgumentError(str(e).replace("__init__()", "generation options")) from None
        return self.engine.prepare(prompt_tokens, options)

    def infill_tokens(self, prefix: str, suffix: str, extra: Sequence[Chunk | dict] = (), prompt: str = "",
                      max_tokens: int | None = None) -> list[int]:
        """Token ids of a fill-in-the-middle prompt (see fim.py): the middle between ``prefix`` and
        ``suffix``, with other files of the project as ``extra`` chunks ({"text", "filename"}), cut to
        leave ``max_tokens`` of the context. Raises InvalidArgumentError for a model without FIM tokens."""
        self._check_open()
        chunks = [c if isinstance(c, Chunk) else Chunk(str(c.get("text", "")), str(c.get("filename", "tmp")))
                  for c in extra]
        return infill_prompt(self.target, prefix, suffix, chunks, prompt,
                             max_tokens if max_tokens is not None else LIMITS["max_tokens"].default).tolist()

    def _prompt_tokens(self, prompt: str, suffix: str | None, extra, kwargs: dict) -> list[int]:
        if suffix is None:
            if extra:
                raise InvalidArgumentError("extra chunks are context for fill-in-the-middle: give a suffix too")
            return self.tokenize_prompt(prompt)
        options = kwargs.get("options")
        max_tokens = options.max_tokens if options is not None else kwargs.get("max_tokens")
        return self.infill_tokens(prompt, suffix, extra, max_tokens=max_tokens if isinstance(max_tokens, int) else None)

    def generate(self, prompt: str, suffix: str | None = None, extra: Sequence[Chunk | dict] = (),
                 **kwargs) -> GenerationResult:
        """Generate after ``prompt``; keyword arguments as in :class:`GenerateOptions` (or ``options=``).
        With ``suffix``: fill in the middle between ``prompt`` and ``suffix`` (a code model's FIM
        format, ``extra`` files of the project before them; see :meth:`infill_tokens`)."""
        return self.generate_tokens(self._prompt_tokens(prompt, suffix, extra, kwargs), **kwargs)

    def generate_tokens(self, prompt_tokens: Sequence[int], **kwargs) -> GenerationResult:
        stream = self.stream_tokens(prompt_tokens, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str, suffix: str | None = None, extra: Sequence[Chunk | dict] = (),
               **kwargs) -> Iterator[str]:
        """Text pieces as they are generated; they join to the text ``generate`` returns."""
        return self.stream_tokens(self._prompt_tokens(prompt, suffix, extra, kwargs), **kwargs)

    def stream_tokens(self, prompt_tokens: Sequence[int], **kwargs) -> "Stream":
        return Stream(self, self.prepare(prompt_tokens, **kwargs))

    def stream_request(self, request: Request, slot: int = 0) -> "Stream":
        """Run a request :meth:`prepare` checked (the server checks before queueing, runs later), on
        engine ``slot`` (see ``parallel``)."""
        self._check_open()
        return Stream(self, request, slot)

    def warm(self, request: Request, slot: int = 0) -> GenerationStats:
        """Evaluate a prepared request's prompt into engine ``slot``'s KV cache without generating (see
        Engine.warm); returns its prompt counts and prefill time."""
        self._check_open()
        engine = self._acquire(slot)
        try:
            return engine.warm(request)
        finally:
            self._release(slot)

    def embed(self, texts: str | Sequence[str], truncate: bool = False) -> Embeddings:
        """One unit vector per text, from the target's own weights in a context of their own (the
        generation's cache is never touched; see embed.py); mean pooling unless the GGUF declares one.
        Runs beside a generation, on the same CPU cores."""
        return self.embedder().embed([texts] if isinstance(texts, str) else list(texts), truncate)

    def embedder(self) -> Embedder:
        """The embedder over the target's weights (made on first use)."""
        self._check_open()
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder.of_target(self.target)
            return self._embedder

    def chat(self, messages: Iterable[Message], stream: bool = False, **kwargs):
        """Answer the last message of a chat; returns a result, or a :class:`Stream` if ``stream``."""
        tokens = self.chat_prompt_tokens(messages)  # reads a generator of messages once
        return self.stream_tokens(tokens, **kwargs) if stream else self.generate_tokens(tokens, **kwargs)


class _Slot:
    """One engine and who holds it: a generation runs on a slot alone."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.holder: int | None = None  # thread id of the generation holding it

    def refuse_reentry(self) -> None:
        """One thread cannot wait for a generation it is itself running: that would never end."""
        if self.holder == threading.get_ident():
            raise InvalidArgumentError("this thread is already running a generation on this engine: "
                                       "finish or close that stream first")


class Stream:
    """An iterator of text pieces. ``result`` is set when it ends, also after :meth:`close`.

    The engine is held from the first piece until the stream ends or is closed.
    """

    def __init__(self, owner: Dovetail, request: Request, slot: int = 0):
        self.result: GenerationResult | None = None
        self._it = self._iterate(owner, request, slot)

    def _iterate(self, owner: Dovetail, request: Request, slot: int) -> Iterator[str]:
        engine = owner._acquire(slot)
        try:
            gen: Generation = engine.start(request)
            try:
                yield from gen
            finally:
                gen.close()
                self.result = gen.result
        finally:
            owner._release(slot)

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generating now; the engine is free for the next call."""
        self._it.close()
