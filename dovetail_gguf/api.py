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
from typing import Iterator, Mapping, Sequence

from .accept import SamplingParams
from .engine import Engine, GenerateOptions, Generation, GenerationResult, TreeConfig
from .errors import InvalidArgumentError
from .models import default_draft_path, default_target_path
from .target import Target, TargetConfig

log = logging.getLogger(__name__)

Message = Mapping[str, str]


def render_chat(template: str | None, messages: Sequence[Message], bos: str = "", eos: str = "") -> str:
    """Render chat messages with a GGUF's Jinja chat template, ready for the assistant's turn."""
    if not template:
        raise InvalidArgumentError("this model has no chat template; use plain generation instead")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(f"message {i} needs string 'role' and 'content' fields")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise InvalidArgumentError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
    except TemplateError as e:
        raise InvalidArgumentError(f"the model's chat template failed: {e}") from e


class Dovetail:
    """A loaded target (CPU) and optional draft (GPU or CPU), ready to generate."""

    def __init__(
        self,
        target: str | Path | None = None,
        draft: str | Path | None | bool = None,
        *,
        device: str = "auto",
        tree: TreeConfig | None = None,
        target_config: TargetConfig | None = None,
        adaptive: bool = True,
    ):
        """``draft``: a draft folder, None for the shipped default (if any), False for none.

        ``adaptive``: size each round's tree from measured costs and acceptance, and fall back
        to plain decoding where speculation does not pay; False always drafts ``tree``.
        """
        self.target = Target(target or default_target_path(), target_config)
        self.drafter = None
        if draft is not False:
            draft_dir = default_draft_path() if draft in (None, True) else Path(draft)
            if draft_dir is not None:
                from .draft.io import load_drafter

                self.drafter = load_drafter(draft_dir, self.target, device=device)
            elif draft is True:
                raise InvalidArgumentError("no draft given and no default draft is installed")
        self.engine = Engine(self.target, self.drafter, tree, adaptive=adaptive)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            self.target.close()

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
    ) -> GenerateOptions:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        opts = GenerateOptions(max_tokens, SamplingParams(float(temperature), float(top_p), int(top_k), seed), stops)
        opts.validate()
        return opts

    def tokenize_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgumentError("the prompt is empty")
        return self.target.tokenize(prompt, add_special=True, parse_special=False).tolist()

    def chat_prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        if not messages:
            raise InvalidArgumentError("a chat needs at least one message")
        t = self.target
        bos = t.detokenize_special(t.bos_token_id) if t.facts.bos_token_id is not None else ""
        eos = t.detokenize_special(t.facts.eos_token_id) if t.facts.eos_token_id is not None else ""
        text = render_chat(t.chat_template, messages, bos, eos)
        add_bos = not (bos and text.startswith(bos))
        return t.tokenize(text, add_special=add_bos, parse_special=True).tolist()

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
        return Stream(self, prompt_tokens, self.options(**kwargs))

    def chat(self, messages: Sequence[Message], stream: bool = False, **kwargs):
        """Answer the last message of a chat; returns a result, or a :class:`Stream` if ``stream``."""
        tokens = self.chat_prompt_tokens(messages)
        return self.stream_tokens(tokens, **kwargs) if stream else self.generate_tokens(tokens, **kwargs)


class Stream:
    """An iterator of text pieces. ``result`` is set when it ends, also after :meth:`close`.

    The engine is held from the first piece until the stream ends or is closed.
    """

    def __init__(self, owner: Dovetail, prompt_tokens: Sequence[int], options: GenerateOptions):
        owner.engine.check_prompt(prompt_tokens)  # fail now, not at the first piece
        self.result: GenerationResult | None = None
        self._it = self._iterate(owner, prompt_tokens, options)

    def _iterate(self, owner: Dovetail, prompt_tokens, options) -> Iterator[str]:
        with owner._lock:
            gen: Generation = owner.engine.start(prompt_tokens, options)
            try:
                yield from gen
            finally:
                gen.close()
                self.result = gen.result

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generating now; the engine is free for the next call."""
        self._it.close()
