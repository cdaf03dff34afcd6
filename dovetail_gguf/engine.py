"""The speculative round loop: draft a tree, verify it in one call, accept, commit both sides.

The engine owns neither KV cache; it asks the target and the drafter to commit.
Without a drafter it runs plain one-token decoding through the same target
wrapper, which is the baseline every speed figure is measured against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from .accept import SamplingParams, accept_greedy, accept_sampling, sample_token
from .errors import ContextFullError, InvalidArgumentError
from .policy import TreePolicy
from .target import Target
from .text import Detokenizer, StopMatcher

log = logging.getLogger(__name__)


@dataclass
class TreeConfig:
    """Size of the draft tree. Defaults are Dovetail's: 16 draft tokens, depth 7, top-k 10."""

    tokens: int = 16  # draft nodes, the root not counted
    depth: int = 7
    topk: int = 10

    def validate(self, max_nodes: int | None = None) -> None:
        if self.tokens < 1 or self.depth < 1 or self.topk < 1:
            raise InvalidArgumentError("tree tokens, depth and top-k must all be >= 1")
        if max_nodes is not None and self.tokens + 1 > max_nodes:
            raise InvalidArgumentError(f"a tree of {self.tokens} draft tokens exceeds the target's {max_nodes - 1}")


@dataclass
class DraftTree:
    """A proposed tree: node 0 is the root (the last accepted token), parents precede children."""

    tokens: np.ndarray  # [n] int32 target token ids
    parents: np.ndarray  # [n] int32, -1 for the root
    scores: np.ndarray  # [n] float32 cumulative draft log-probability (root 0)


class Drafter(Protocol):
    """What the engine needs from a draft model."""

    def trim(self, n_pairs: int) -> int:
        """Keep at most the first ``n_pairs`` committed (feature, token) pairs; return how many it holds."""

    def propose(self, features: np.ndarray, tokens: np.ndarray, tree: TreeConfig) -> DraftTree:
        """Commit the new pairs (feature of position t-1, token at t), the last one being the
        root, and draft a tree below the root token ``tokens[-1]``."""


@dataclass
class GenerationStats:
    n_prompt_tokens: int = 0
    n_tokens: int = 0
    rounds: int = 0
    accepted_tokens: int = 0  # tokens emitted by rounds (bonus included)
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None

    @property
    def decode_seconds(self) -> float:
        return self.total_seconds - self.prefill_seconds

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.decode_seconds - self.draft_seconds - self.verify_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """τ: tokens a round emits on average, the target's bonus token included."""
        return self.accepted_tokens / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            decode_seconds=self.decode_seconds,
            other_seconds=self.other_seconds,
            tokens_per_second=self.tokens_per_second,
            mean_accepted_tokens=self.mean_accepted_tokens,
        )
        return d


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "context_full"
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class GenerateOptions:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.sampling.validate()


class Generation:
    """One generation in progress: iterate for text pieces; ``result`` is set once it ends."""

    def __init__(self, engine: "Engine", prompt_tokens: np.ndarray, options: GenerateOptions):
        self.result: GenerationResult | None = None
        self._it = engine._generate(prompt_tokens, options, self)

    def __iter__(self) -> Iterator[str]:
        return self._it

    def close(self) -> None:
        """Stop early (e.g. a client went away); the engine is free again at once."""
        self._it.close()


class Engine:
    """Speculative generation over one target and an optional drafter."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeConfig | None = None,
                 adaptive: bool = False):
        """``adaptive``: size each tree from measured costs and acceptance, falling back to plain
        decoding when speculation does not pay (see policy.py); else always draft ``tree``."""
        self.target = target
        self.tree = tree or TreeConfig()
        self.tree.validate(target.max_tree_nodes)
        self.set_drafter(drafter, adaptive)

    def set_drafter(self, drafter: Drafter | None, adaptive: bool | None = None) -> None:
        """Use ``drafter`` from the next generation on (None: plain decoding); ``adaptive`` as in the constructor.

        The new drafter holds no context yet: the next prompt is evaluated again from its start.
        """
        self.drafter = drafter
        if adaptive is not None:
            self.adaptive = adaptive
        self.policy: TreePolicy | None = None
        # target hidden state of every committed position, so a drafter can resume after prefix reuse
        self._hidden = np.zeros((self.target.n_ctx, self.target.n_embd), dtype=np.float32) if drafter else None
        self._device_stats = getattr(drafter, "peak_memory_bytes", None)

    def check_prompt(self, prompt_tokens) -> np.ndarray:
        """The prompt as int32 tokens; raises for an empty prompt or one that does not fit the context."""
        prompt = np.ascontiguousarray(prompt_tokens, dtype=np.int32)
        if prompt.ndim != 1 or prompt.size == 0:
            raise InvalidArgumentError("the prompt is empty")
        if prompt.size >= self.target.n_ctx:
            raise ContextFullError(
                f"the prompt has {prompt.size} tokens but the context holds {self.target.n_ctx}; "
                "shorten the prompt or raise the context size"
            )
        return prompt

    def start(self, prompt_tokens, options: GenerateOptions | None = None) -> Generation:
        """Begin generating after ``prompt_tokens``; iterate the result for text pieces."""
        options = options or GenerateOptions()
        options.validate()
        return Generation(self, self.check_prompt(prompt_tokens), options)

    # ------------------------------------------------------------------ internals
    def _prefill(self, prompt: np.ndarray) -> tuple[np.ndarray, int]:
        """Reuse the longest cached prefix, evaluate the rest.

        Returns (last logits, pairs the drafter holds). With a drafter, the
        reused prefix also stops where the drafter's own cache ends: its next
        pair needs the target feature just before it.
        """
        t = self.target
        cached = t.committed_tokens
        common = int(np.argmin(np.append(cached[: prompt.size] == prompt[: cached.size], False)))
        n_keep = min(common, prompt.size - 1)  # the last prompt token is always evaluated
        held = 0
        if self.drafter is not None:
            held = self.drafter.trim(max(n_keep - 1, 0))
            n_keep = min(n_keep, held + 1)
        t.truncate(n_keep)
        logits, hidden = t.prefill(prompt[n_keep:])
        if self._hidden is not None:
            self._hidden[n_keep : prompt.size] = hidden
        return logits, held

    def _calibrate(self) -> TreePolicy:
        """Measure t(k) for a few tree sizes on the current context (once per engine)."""
        t = self.target
        n_past, rng = t.n_past, np.random.default_rng(0)
        sizes = [k for k in (1, 2, 4, 8, 16, 32) if k <= min(t.max_tree_nodes, self.tree.tokens + 1)]
        if sizes[-1] != min(t.max_tree_nodes, self.tree.tokens + 1):
            sizes.append(min(t.max_tree_nodes, self.tree.tokens + 1))
        cost = {}
        for k in sizes:
            times = []
            for _ in range(3):
                tokens = rng.integers(0, t.n_vocab, size=k).astype(np.int32)
                t0 = time.perf_counter()
                t.verify_tree(tokens, np.arange(-1, k - 1))
                times.append(time.perf_counter() - t0)
                t.truncate(n_past)
            cost[k] = 1000 * min(times)
        log.info("verification cost (ms) by tree size: %s", {k: round(v, 2) for k, v in cost.items()})
        return TreePolicy(self.tree.tokens, self.tree.depth, self.tree.topk, cost)

    def _generate(self, prompt: np.ndarray, options: GenerateOptions, handle: Generation) -> Iterator[str]:
        t, drafter, params = self.target, self.drafter, options.sampling
        rng = np.random.default_rng(params.seed)
        stats = GenerationStats(n_prompt_tokens=int(prompt.size))
        out: list[int] = []
        detok = Detokenizer(t.token_bytes)
        stops = StopMatcher(options.stop)
        text_parts: list[str] = []
        finish, stop_hit = "length", False
        t0 = time.perf_counter()
        try:
            logits, draft_len = self._prefill(prompt)  # draft_len: pairs the drafter holds
            stats.prefill_seconds = time.perf_counter() - t0
            if drafter is not None and self.adaptive and self.policy is None:
                self.policy = self._calibrate()
            root = sample_token(logits, params, rng)
            pending = [root]
            while True:
                # emit what the last step produced, stopping exactly where a stop condition hits
                done = False
                for tok in pending:
                    if t.is_eog(tok):
                        finish, done = "stop", True
                        break
                    out.append(int(tok))
                    piece, hit = stops.feed(detok.push(tok))
                    if piece:
                        text_parts.append(piece)
                        yield piece
                    if hit:
                        finish, done, stop_hit = "stop", True, True
                        break
                    if len(out) >= options.max_tokens:
                        finish, done = "length", True
                        break
                if done:
                    break
                root = pending[-1]
                room = min(t.n_ctx, t.n_cells) - t.n_past
                if room < 1:
                    finish = "context_full"
                    break
                stats.rounds += 1
                # trees stay inside the attention window a plain step would use: bit-identical logits
                tree = self._next_tree(room, min(t.n_cells - t.n_past, t.window_room)) if drafter is not None else None
                if tree is None:  # a plain step: no drafter, no room, or speculation does not pay now
                    tv = time.perf_counter()
                    logits, hidden = t.decode_one(root)
                    if self._hidden is not None:
                        self._hidden[t.n_past - 1] = hidden
                    stats.verify_seconds += time.perf_counter() - tv
                    pending = [sample_token(logits, params, rng)]
                    stats.accepted_tokens += 1
                    continue
                td = time.perf_counter()
                # pairs the drafter lacks: (feature of position p-1, token at p) up to the root
                feats = self._hidden[draft_len : t.n_past]
                pair_tokens = np.append(t.history(draft_len + 1), root).astype(np.int32)
                proposal = drafter.propose(feats, pair_tokens, tree)
                draft_len = t.n_past
                tv = time.perf_counter()
                res = t.verify_tree(proposal.tokens, proposal.parents)
                if params.greedy:
                    acc = accept_greedy(res.layout.tokens, res.layout.parents, res.layout.ancestors, res.logits)
                else:
                    acc = accept_sampling(res.layout.tokens, res.layout.parents, res.logits, params, rng)
                lo = t.n_past
                self._hidden[lo : lo + acc.path.size] = res.hidden[acc.path]
                t.commit(acc.path)
                stats.draft_seconds += tv - td
                stats.verify_seconds += time.perf_counter() - tv
                if self.policy is not None:  # catching up on many plain steps is not a typical draft cost
                    steady = pair_tokens.size <= self.policy.max_depth + 1
                    self.policy.observe(tree.depth, acc.path.size - 1, 1000 * (tv - td) if steady else None)
                pending = [*res.layout.tokens[acc.path[1:]].tolist(), acc.next_token]
                stats.accepted_tokens += len(pending)
        finally:
            tail = "" if stop_hit else stops.feed(detok.flush())[0] + stops.flush()
            stats.total_seconds = time.perf_counter() - t0
            stats.n_tokens = len(out)
            if self._device_stats is not None:
                stats.peak_gpu_memory_bytes = self._device_stats()
            handle.result = GenerationResult("".join(text_parts) + tail, out, finish, stats)
        if tail:
            yield tail

    def _next_tree(self, room: int, free_cells: int) -> TreeConfig | None:
        """This round's tree: the policy's choice (or the configured tree), fitted to the room left."""
        if room < 2 or free_cells < 2:
            return None
        tree = self.tree
        if self.policy is not None:
            choice = self.policy.choose()
            if choice is None:
                return None
            # a tree of n nodes never needs more than n candidates per level: same tree, less drafting
            tree = TreeConfig(tokens=choice[1], depth=choice[0], topk=min(self.tree.topk, choice[1]))
        return self._fit_tree(tree, room, free_cells)

    @staticmethod
    def _fit_tree(tree: TreeConfig, room: int, free_cells: int) -> TreeConfig:
        """``tree``, made smaller where the context has little room left."""
        if room > tree.depth and free_cells > tree.tokens:
            return tree
        return TreeConfig(tokens=min(tree.tokens, free_cells - 1), depth=min(tree.depth, room - 1), topk=tree.topk)
