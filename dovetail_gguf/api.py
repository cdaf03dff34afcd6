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
from typing import Iterable, Iterator, Mapping, Sequence

from .accept import SamplingParams
from .chat import Message, chat_tokens
from .engine import Engine, Generation
from .types import GenerateOptions, GenerationResult, TreeConfig
from .errors import InvalidArgumentError
from .models import default_draft_for, resolve_target
from .structured import json_schema_grammar
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
    ):
        """``draft``: a draft folder, None for the shipped default (if any), False for none.

        ``draft_dtype``: the draft's weights, "auto" (bf16/fp16 on a GPU, fp32 on a CPU), "fp32", "bf16", "fp16".
        ``adaptive``: size each round's tree from measured costs and acceptance, and fall back
        to plain decoding where speculation does not pay; False always drafts ``tree``.
        ``ngram``: add continuations found earlier in the context as a free branch of each tree
        (None: whenever a draft model is used); with ``draft=False`` it is suffix-index-only speculation.
        """
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
        self.engine = Engine(self.target, self.drafter, tree, adaptive=adaptive, ngram=use_ngram)
        self._lock = threading.Lock()
        self._holder: int | None = None  # thread id of the generation holding the engine
        self._closed = False

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the target; every later call raises InvalidArgumentError. Waits for a running generation."""
        self._refuse_reentry()
        with self._lock:
            self._closed = True
            self.target.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this Dovetail was closed; create a new one")

    def _refuse_reentry(self) -> None:
        """One thread cannot wait for a generation it is itself running: that would never end."""
        if self._holder == threading.get_ident():
            raise InvalidArgumentError("this thread is already running a generation on this engine: "
                                       "finish or close that stream first")

    def _acquire(self) -> None:
        self._refuse_reentry()
        self._lock.acquire()
        if self._closed:
            self._lock.release()
            self._check_open()
        self._holder = threading.get_ident()

    def _release(self) -> None:
        self._holder = None
        self._lock.release()

    def __enter__(self) -> "Dovetail":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    @staticmethod
    def options(
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        prediction: str | Sequence[int] | None = None,
        *,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        grammar: str | None = None,
        json_schema: dict | str | None = None,
        logprobs: int | None = None,
    ) -> GenerateOptions:
        """Generation settings, with llama.cpp's meanings and its order: logit bias, penalties,
        top-k, top-p, min-p, then temperature (0: greedy).

        ``prediction``: OpenAI's Predicted Outputs, text (or token ids) the answer is expected to
        repeat (the file being edited, say); it speeds up the parts that match and never changes
        the output. The result's stats count ``accepted_prediction_tokens`` and
        ``rejected_prediction_tokens``. ``grammar``: GBNF text the output must match;
        ``json_schema``: a JSON Schema it must validate against (one of the two). ``logprobs``:
        record each token's log-probability and that many alternatives (0..20) in the result."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
        if seed is not None and seed < 0:  # as in llama.cpp and OpenAI's API: a negative seed means a random one
            seed = None
        if grammar is not None and json_schema is not None:
            raise InvalidArgumentError("give a grammar or a JSON schema, not both")
        if json_schema is not None:
            grammar = json_schema_grammar(json_schema)
        bias = {}
        for tok, value in (logit_bias or {}).items():
            try:
                bias[int(tok)] = float(value)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"logit_bias maps token ids to numbers, got {tok!r}: {value!r}") from None
        params = SamplingParams(float(temperature), float(top_p), int(top_k), seed, float(min_p), float(repeat_penalty),
                                int(repeat_last_n), float(presence_penalty), float(frequency_penalty), bias)
        opts = GenerateOptions(max_tokens, params, stops, prediction, grammar, logprobs)
        opts.validate()
        return opts

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

    def generate(self, prompt: str, **kwargs) -> GenerationResult:
        """Generate after ``prompt``; keyword arguments as in :meth:`options`."""
        return self.generate_tokens(self.tokenize_prompt(prompt), **kwargs)

    def generate_tokens(self, prompt_tokens: Sequence[int], **kwargs) -> GenerationResult:
        stream = self.stream_tokens(prompt_tokens, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Text pieces as they are generated; they join to the text ``generate`` returns."""
        return self.stream_tokens(self.tokenize_prompt(prompt), **kwargs)

    def stream_tokens(self, prompt_tokens: Sequence[int], **kwargs) -> "Stream":
        self._check_open()
        return Stream(self, prompt_tokens, self.options(**kwargs))

    def chat(self, messages: Iterable[Message], stream: bool = False, **kwargs):
        """Answer the last message of a chat; returns a result, or a :class:`Stream` if ``stream``."""
        tokens = self.chat_prompt_tokens(messages)  # reads a generator of messages once
        return self.stream_tokens(tokens, **kwargs) if stream else self.generate_tokens(tokens, **kwargs)


class Stream:
    """An iterator of text pieces. ``result`` is set when it ends, also after :meth:`close`.

    The engine is held from the first piece until the stream ends or is closed.
    """

    def __init__(self, owner: Dovetail, prompt_tokens: Sequence[int], options: GenerateOptions):
        owner.engine.check_prompt(prompt_tokens)  # fail now, not at the first piece
        owner.engine.check_options(options)
        self.result: GenerationResult | None = None
        self._it = self._iterate(owner, prompt_tokens, options)

    def _iterate(self, owner: Dovetail, prompt_tokens, options) -> Iterator[str]:
        owner._acquire()
        try:
            gen: Generation = owner.engine.start(prompt_tokens, options)
            try:
                yield from gen
            finally:
                gen.close()
                self.result = gen.result
        finally:
            owner._release()

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generating now; the engine is free for the next call."""
        self._it.close()
