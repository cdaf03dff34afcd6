"""Generation options: one typed object, and the one table of their defaults and bounds.

Every front end builds a :class:`GenerateOptions`: the Python API from keywords, the CLI from its
flags (whose defaults and help come from :data:`LIMITS`), each server surface from its request's
fields. It is checked once, where it is built, and then passed as it is to the engine, which only
adds the checks that need the model (token ids against its vocabulary, the grammar against its
tokens: :meth:`dovetail_gguf.engine.Engine.prepare`).

A bound is written in :data:`LIMITS` and nowhere else; a broken rule raises
:class:`~dovetail_gguf.errors.InvalidArgumentError` with the same words from every surface, e.g.
``temperature must be in [0, 2], got 3.0``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Limit:
    """A numeric option: its type, default, bounds (None: unbounded) and what it means."""

    kind: type  # int or float
    default: int | float | None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # ``lo`` itself is outside the range
    help: str = ""

    def rule(self, name: str) -> str:
        """The rule in words: ``temperature must be in [0, 2]``."""
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{name} must be {'an integer ' if self.kind is int else ''}in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        if self.lo is not None:
            return f"{name} must be {what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{name} must be {what} <= {_num(self.hi)}"
        return f"{name} must be {what}"

    def bounds(self) -> str:
        """The range in words, for help texts: ``[0, 2]``, ``>= 1``, ``any integer``."""
        return self.rule("").removeprefix(" must be ").removeprefix("an integer ").removeprefix("a number ").removeprefix("in ") or "any"

    def check(self, name: str, value: Any) -> int | float:
        """``value`` as this option's type; raises InvalidArgumentError naming the rule it breaks."""
        broken = InvalidArgumentError(f"{self.rule(name)}, got {value!r}")
        if value is None or isinstance(value, (bool, str, bytes)):
            raise broken
        if isinstance(value, numbers.Integral):
            value = int(value) if self.kind is int else float(value)
        else:
            try:
                f = float(value)
            except (TypeError, ValueError):
                raise broken from None
            if math.isnan(f) or (self.kind is int and not f.is_integer()):
                raise broken
            value = int(f) if self.kind is int else f
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise broken
        if self.hi is not None and value > self.hi:
            raise broken
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# The one table. Server surfaces map their field names onto these (OpenAI's ``max_tokens``, Ollama's
# ``num_predict``), the CLI reads its defaults and help here, and the Python API its keywords.
LIMITS: dict[str, Limit] = {
    "max_tokens": Limit(int, 256, 1, help="Maximum new tokens."),
    "temperature": Limit(float, 0.0, 0.0, 2.0, help="0 = greedy (the target's own answer)."),
    "top_p": Limit(float, 1.0, 0.0, 1.0, lo_open=True, help="Nucleus cut (at temperature 1)."),
    "top_k": Limit(int, 0, 0, help="0 = no top-k cut."),
    "min_p": Limit(float, 0.0, 0.0, 1.0, help="Keep tokens at least this fraction as likely as the likeliest (0 = off)."),
    "repeat_penalty": Limit(float, 1.0, 0.0, 10.0, lo_open=True, help="Penalise recent tokens (1 = off)."),
    "repeat_last_n": Limit(int, 64, -1, help="Recent tokens the penalties look at (0 = none, -1 = the whole context)."),
    "presence_penalty": Limit(float, 0.0, -2.0, 2.0, help="Subtracted once from the logit of every recent token."),
    "frequency_penalty": Limit(float, 0.0, -2.0, 2.0, help="Subtracted from a recent token's logit per occurrence."),
    "logit_bias": Limit(float, None, -100.0, 100.0, help="Added to a token's logit; -100 keeps it out."),
    "logprobs": Limit(int, None, 0, 20, help="Alternatives reported per token, with its log-probability."),
    "seed": Limit(int, None, help="Random seed for sampling (negative: a random seed)."),
    "stop": Limit(int, None, 0, 4, help="How many stop strings: the answer ends before the first one it produces."),
    "stop_chars": Limit(int, None, 0, 256, help="Characters in one stop string."),
    # the server's settings (dovetail serve)
    "served_max_tokens": Limit(int, 512, 1, help="max_tokens of a request that gives none (capped at the context)."),
    "max_queue": Limit(int, 64, 1, help="Requests that may wait for the engine; past it a request gets 429 with Retry-After."),
    "parallel": Limit(int, 2, 1, 16, help="Requests generated side by side, each in an engine of its own over the "
                                         "same weights, a round of each in turn (the first engine has the draft)."),
    # prompt prefixes kept warm besides the live one (dovetail_gguf.prefixes)
    "cache_slots": Limit(int, 4, 0, 64, help="Prompt prefixes (other conversations, other files) kept warm in RAM "
                                              "besides the one in the KV cache; 0 keeps only that one."),
    "cache_ram_mib": Limit(int, 1024, 1, 2**20, help="RAM those prefixes may take, in MiB (least recently used out)."),
    # the draft tree (dovetail_gguf.types.TreeConfig)
    "tree_tokens": Limit(int, 16, 1, 63, help="Draft tokens per tree (root not counted)."),
    "tree_depth": Limit(int, 7, 1, 64, help="Maximum tree depth."),
    "tree_topk": Limit(int, 10, 1, 64, help="Children considered per expanded node."),
}


def check(name: str, value: Any) -> int | float:
    """``value`` checked against ``LIMITS[name]``."""
    return LIMITS[name].check(name, value)


def default(name: str) -> Any:
    return LIMITS[name].default


def one_of(**given: Any) -> tuple[str | None, Any]:
    """The one of ``given`` that is not None, as (name, value); (None, None) if none is; raises
    InvalidArgumentError naming them when several are (a grammar and a JSON schema, say)."""
    named = [(k, v) for k, v in given.items() if v is not None]
    if len(named) > 1:
        raise InvalidArgumentError(f"give one of {' / '.join(given)}, not several (got {', '.join(k for k, _ in named)})")
    return named[0] if named else (None, None)


@dataclass(frozen=True)
class GenerateOptions:
    """Everything that shapes one answer, checked once when built.

    Sampling follows llama.cpp's chain in its order: logit bias, penalties, top-k, top-p, min-p,
    then temperature (0: greedy). ``prediction``: OpenAI's Predicted Outputs, text (or token ids)
    the answer is expected to repeat; it only proposes draft tokens and never changes the output.
    ``grammar``: GBNF text the output must match; ``json_schema``: a JSON Schema (a dict or its
    JSON text) it must validate against; at most one of the two. ``logprobs``: record each
    token's log-probability and this many alternatives.
    """

    max_tokens: int = LIMITS["max_tokens"].default
    temperature: float = LIMITS["temperature"].default
    top_p: float = LIMITS["top_p"].default
    top_k: int = LIMITS["top_k"].default
    seed: int | None = None
    stop: str | Sequence[str] | None = ()
    prediction: str | Sequence[int] | None = None
    min_p: float = LIMITS["min_p"].default
    repeat_penalty: float = LIMITS["repeat_penalty"].default
    repeat_last_n: int = LIMITS["repeat_last_n"].default
    presence_penalty: float = LIMITS["presence_penalty"].default
    frequency_penalty: float = LIMITS["frequency_penalty"].default
    logit_bias: Mapping[int, float] | None = None
    grammar: str | None = None
    json_schema: dict | str | None = None
    logprobs: int | None = None
    # derived when built: the GBNF text the output must match (from grammar or json_schema), or None
    gbnf: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: set once, here)
        for f in fields(self):  # the numeric fields, each against its row of the table
            limit, value = LIMITS.get(f.name), getattr(self, f.name)
            if limit is None or f.name in ("stop", "logit_bias") or (value is None and limit.default is None):
                continue
            put(f.name, limit.check(f.name, value))
        if self.seed is not None and self.seed < 0:
            put("seed", None)  # as llama.cpp and OpenAI: a negative seed means a random one
        put("stop", _stops(self.stop))
        put("logit_bias", _bias(self.logit_bias))
        put("prediction", _prediction(self.prediction))
        kind, structure = one_of(grammar=self.grammar, json_schema=self.json_schema)
        if kind == "grammar":
            if not isinstance(structure, str) or not structure.strip():
                raise InvalidArgumentError("the grammar is empty")
            put("gbnf", structure)
        elif kind == "json_schema":
            from .structured import json_schema_grammar

            put("gbnf", json_schema_grammar(structure))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sampling(self):
        """The sampler's view of these options (accept.SamplingParams)."""
        from .accept import SamplingParams

        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed, self.min_p, self.repeat_penalty,
                              self.repeat_last_n, self.presence_penalty, self.frequency_penalty, self.logit_bias)


def _stops(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    most, longest = LIMITS["stop"].hi, LIMITS["stop_chars"].hi
    if len(stops) > most:
        raise InvalidArgumentError(f"at most {most} stop strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise InvalidArgumentError(f"stop strings are text, got {s!r}")
        if len(s) > longest:
            raise InvalidArgumentError(f"stop strings are at most {longest} characters, got {len(s)}")
    return stops


def _bias(bias) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise InvalidArgumentError(f"logit_bias maps token ids to numbers, got {type(bias).__name__}")
    out = {}
    for tok, value in bias.items():
        try:
            tid = int(tok) if not isinstance(tok, (bool, float)) else None
        except (TypeError, ValueError):
            tid = None
        if tid is None:
            raise InvalidArgumentError(f"logit_bias maps token ids to numbers, got {tok!r}: {value!r}")
        out[tid] = check("logit_bias", value)
    return out


def _prediction(prediction) -> str | tuple[int, ...] | None:
    if prediction is None or isinstance(prediction, str):
        return prediction
    try:
        tokens = tuple(int(t) for t in prediction)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"prediction must be a string or token ids, got {type(prediction).__name__}") from None
    return tokens
