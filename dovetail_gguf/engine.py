"""The speculative round loop: draft a tree, verify it in one call, accept, commit both sides.

The engine owns neither KV cache; it asks the target and the drafter to commit.
Without a drafter it runs plain one-token decoding through the same target
wrapper, which is the baseline every speed figure is measured against.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import numpy as np

from .accept import SamplingParams, accept_greedy, accept_sampling, sample_token
from .costs import (
    CALIBRATION_SIZES,
    interpolate,
    load_costs,
    load_exact_rows,
    probe_exact_rows,
    save_costs,
    save_exact_rows,
    update_cost,
)
from .errors import ContextFullError, InvalidArgumentError
from .ngram import lookup as ngram_lookup
from .ngram import merge_chain
from .policy import ChainPolicy, TreePolicy
from .target import Target
from .text import Detokenizer, StopMatcher
from .types import (  # noqa: F401  (re-exported: the engine's vocabulary)
    Drafter,
    DraftTree,
    GenerateOptions,
    GenerationResult,
    GenerationStats,
    TreeConfig,
)

log = logging.getLogger(__name__)


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


class _Output:
    """What a generation has emitted: tokens, text pieces, and why it ended (None while running)."""

    def __init__(self, target: Target, options: GenerateOptions):
        self.tokens: list[int] = []
        self.parts: list[str] = []
        self.finish: str | None = None
        self._stop_hit = False
        self._is_eog = target.is_eog
        self._detok = Detokenizer(target.token_bytes)
        self._stops = StopMatcher(options.stop)
        self._max_tokens = options.max_tokens

    def emit(self, tokens: list[int]) -> Iterator[str]:
        """Text of ``tokens``, stopping exactly where EOS, a stop string or max_tokens hits."""
        for tok in tokens:
            if self._is_eog(tok):
                self.finish = "stop"
                return
            self.tokens.append(int(tok))
            piece, hit = self._stops.feed(self._detok.push(tok))
            if piece:
                self.parts.append(piece)
                yield piece
            if hit:
                self.finish, self._stop_hit = "stop", True
                return
            if len(self.tokens) >= self._max_tokens:
                self.finish = "length"
                return

    def tail(self) -> str:
        """Text held back (an incomplete UTF-8 sequence, a possible stop string's start), unless a stop hit."""
        if self._stop_hit:
            return ""
        return self._stops.feed(self._detok.flush())[0] + self._stops.flush()


class Engine:
    """Speculative generation over one target, an optional drafter and optional n-gram branches."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeConfig | None = None,
                 adaptive: bool = True, ngram: bool = False):
        """``adaptive``: size each tree from measured costs and acceptance, falling back to plain
        decoding when speculation does not pay (see policy.py); else always draft ``tree``.
        ``ngram``: add continuations found earlier in the context (prompt lookup) to each tree as a
        free branch, sized by their measured acceptance; with no drafter, the only source of drafts.
        """
        self.target = target
        self.tree = tree or TreeConfig()
        self.tree.validate(target.max_tree_nodes)
        self.ngram = ngram
        self.set_drafter(drafter, adaptive)

    def set_drafter(self, drafter: Drafter | None, adaptive: bool | None = None) -> None:
        """Use ``drafter`` from the next generation on (None: no draft model); ``adaptive`` as in the constructor.

        The new drafter holds no context yet: the next prompt is evaluated again from its start.
        """
        self.drafter = drafter
        if adaptive is not None:
            self.adaptive = adaptive
        self.policy: TreePolicy | None = None
        self.chain_policy = ChainPolicy(max_len=min(8, self.target.max_tree_nodes - 1)) if self.ngram else None
        self._verify_ms: dict[int, float] | None = None  # t(k), measured or cached, for the policies
        self._calibration: list[int] = []  # rows the next rounds verify to time t(k), when no cache had it
        self._costs_dirty = False
        # target hidden state of every committed position, so a drafter can resume after prefix reuse
        self._hidden = np.zeros((self.target.n_ctx, self.target.n_embd), dtype=np.float32) if drafter else None
        self._fresh_drafter = drafter is not None  # nothing of the target's cache may be reused for it yet
        self._draft_len = 0  # pairs the drafter holds during a generation
        self._max_nodes: int | None = None  # exact mode: the largest tree computed like one-token decodes
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

    # ------------------------------------------------------------------ phases
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
            if self._fresh_drafter:  # its features of the cached prefix were never recorded
                n_keep, self._fresh_drafter = 0, False
            held = self.drafter.trim(max(n_keep - 1, 0))
            n_keep = min(n_keep, held + 1)
        t.truncate(n_keep)
        logits, hidden = t.prefill(prompt[n_keep:])
        if self._hidden is not None:
            self._hidden[n_keep : prompt.size] = hidden
        return logits, held

    def _costs(self) -> dict[int, float] | None:
        """t(k) in ms, shared by the policies, or None while they are being measured.

        Cached for this machine, file and threads; else the next rounds time them (see
        :meth:`_calibration_round`) and the policies start once they have. Every later decode
        refines them and adds the sizes it uses.
        """
        if self._verify_ms is None:
            costs = load_costs(self.target)
            if costs is None:
                self._verify_ms = {}
                self._calibration = [k for k in (1, *CALIBRATION_SIZES) if k <= self._node_limit()]
                return None
            self._verify_ms = costs
        return None if self._calibration else self._verify_ms

    def _record_cost(self, n: int, seconds: float) -> None:
        """A decode of ``n`` rows took ``seconds``: refine t(n) (the context grows, machines drift)."""
        if self._verify_ms is None:
            return
        ms = 1000 * seconds
        if self._calibration:  # the quickest of the calibration rounds' timings: a first decode can be slow
            self._verify_ms[n] = min(self._verify_ms.get(n, ms), ms)
            return
        update_cost(self._verify_ms, n, ms)
        self._costs_dirty = True
        if self.policy is not None:
            self.policy.costs_changed(n)

    def _calibration_round(self, root: int, room: int, free_cells: int, params: SamplingParams, rng,
                           stats: GenerationStats) -> list[int]:
        """A round of the size t(k) is next measured for, so timing costs no decode of its own.

        One row is a plain step; k rows verify the root and k - 1 free guesses: the n-gram
        continuation, padded with the root token (no drafting: on a CPU a draft call can cost
        more than the decode it times). Once every size has had its round, the costs are logged
        and the policies start (or, if some size found no room, the next generation tries again).
        """
        rows = self._calibration.pop(0)
        if rows == 1 or room < 2 or free_cells < 2:
            pending = self._plain_step(root, params, rng, stats)
        else:
            n = min(rows - 1, room - 1, free_cells - 1)
            found = self._ngram_continuation(root, n)
            chain = np.concatenate([found, np.full(n - found.size, root, dtype=np.int32)])
            pending, _, _, on_chain = self._tree_step(root, None, chain, params, rng, stats)
            if self.chain_policy is not None and found.size:  # a real n-gram branch: its acceptance counts
                self.chain_policy.observe(found.size, min(on_chain, found.size))
        if not self._calibration:
            measured = {k: round(v, 2) for k, v in sorted(self._verify_ms.items())}
            if len(measured) < 2:  # no room for a tree: measure again next time
                self._verify_ms = None
                return pending
            log.info("verification cost (ms) by rows: %s", measured)
            self._costs_dirty = True
            if self.adaptive and self.drafter is not None and self.policy is None:
                self.policy = self._make_policy()
        return pending

    def _exact_rows(self) -> int:
        """In exact mode: the largest tree whose rows the target computes as one-token decodes (cached)."""
        t = self.target
        limit = min(t.max_tree_nodes, self.tree.tokens + 1 + (self.chain_policy.max_len if self.ngram else 0))
        rows = load_exact_rows(t)
        if rows is None:
            rows = probe_exact_rows(t, limit)
            if min(t.n_ctx, t.n_cells) - t.n_past >= limit:  # a complete probe: keep it
                save_exact_rows(t, rows)
            log.info("exact mode: trees of up to %d rows match one-token decoding here", rows)
        return max(1, min(rows, limit))

    def _make_policy(self) -> TreePolicy | None:
        costs = self._costs()
        if costs is None:
            return None
        return TreePolicy(self.tree.tokens, self.tree.depth, self.tree.topk, costs,
                          draft_ms_per_depth=float(getattr(self.drafter, "step_ms", 0.0)))

    def _verify_cost(self, n):
        return interpolate(self._verify_ms, n) if self._verify_ms else np.asarray(n, dtype=np.float64)

    def _plain_step(self, root: int, params: SamplingParams, rng, stats: GenerationStats) -> list[int]:
        """Decode one token; the next token is sampled from its logits."""
        t = self.target
        tv = time.perf_counter()
        logits, hidden = t.decode_one(root)
        if self._hidden is not None:
            self._hidden[t.n_past - 1] = hidden
        seconds = time.perf_counter() - tv
        stats.verify_seconds += seconds
        self._record_cost(1, seconds)
        stats.accepted_tokens += 1
        stats.verified_rows += 1
        return [sample_token(logits, params, rng)]

    def _draft(self, root: int, tree: TreeConfig, draft_len: int) -> DraftTree:
        """The drafter's tree below ``root``, after feeding it the pairs it lacks."""
        t = self.target
        feats = self._hidden[draft_len : t.n_past]  # (feature of position p-1, token at p) up to the root
        pair_tokens = np.append(t.history(draft_len + 1), root).astype(np.int32)
        return self.drafter.propose(feats, pair_tokens, tree)

    def _tree_step(self, root: int, proposal: DraftTree | None, chain: np.ndarray, params: SamplingParams, rng,
                   stats: GenerationStats) -> tuple[list[int], int, int, int]:
        """Verify the draft tree (or just the root) with ``chain`` added as a branch; accept; commit.

        Returns (tokens emitted, depth the draft tree reached, its nodes accepted, chain tokens accepted).
        """
        t = self.target
        tokens = proposal.tokens if proposal is not None else np.array([root], dtype=np.int32)
        parents = proposal.parents if proposal is not None else np.array([-1], dtype=np.int32)
        n_tree = tokens.size
        tokens, parents, chain_nodes = merge_chain(tokens, parents, chain)
        tv = time.perf_counter()
        res = t.verify_tree(tokens, parents)
        self._record_cost(tokens.size, time.perf_counter() - tv)
        if params.greedy:
            acc = accept_greedy(res.layout.tokens, res.layout.parents, res.layout.ancestors, res.logits)
        else:
            acc = accept_sampling(res.layout.tokens, res.layout.parents, res.logits, params, rng)
        if self._hidden is not None:
            self._hidden[t.n_past : t.n_past + acc.path.size] = res.hidden[acc.path]
        t.commit(acc.path)
        stats.verify_seconds += time.perf_counter() - tv
        reached = int(res.layout.depth[:n_tree].max())  # levels the draft tree really had
        on_tree = int(np.argmin(np.append(acc.path[1:] < n_tree, False)))  # accepted nodes of the draft tree
        on_chain = int(np.isin(acc.path[1:], chain_nodes).sum())
        pending = [*res.layout.tokens[acc.path[1:]].tolist(), acc.next_token]
        stats.accepted_tokens += len(pending)
        stats.verified_rows += tokens.size
        if proposal is not None:
            stats.record_tree(reached, on_tree)
        return pending, reached, on_tree, on_chain

    def _chain(self, root: int, room: int, n_tree_nodes: int, tree_expected: float) -> np.ndarray:
        """The n-gram branch for this round (maybe empty): as long as the chain policy says pays next to
        the draft tree, looked up only when some length would."""
        limit = min(self.chain_policy.max_len, room - 1, self._node_limit() - n_tree_nodes)
        if limit < 1:
            return np.zeros(0, dtype=np.int32)
        if self.adaptive:  # a fixed tree takes every candidate found
            limit = self.chain_policy.choose(limit, self._verify_cost, n_tree_nodes, tree_expected)
            if limit == 0:
                return np.zeros(0, dtype=np.int32)
        return self._ngram_continuation(root, limit)

    def _ngram_continuation(self, root: int, limit: int) -> np.ndarray:
        """Up to ``limit`` tokens that followed the context's last few tokens earlier in it (root included)."""
        return ngram_lookup(np.append(self.target.history(0), root).astype(np.int32), limit)

    def _generate(self, prompt: np.ndarray, options: GenerateOptions, handle: Generation) -> Iterator[str]:
        t, params = self.target, options.sampling
        rng = np.random.default_rng(params.seed)
        stats = GenerationStats(n_prompt_tokens=int(prompt.size))
        out = _Output(t, options)
        t0 = time.perf_counter()
        try:
            logits, self._draft_len = self._prefill(prompt)  # pairs the drafter holds
            stats.prefill_seconds = time.perf_counter() - t0
            if self.target.config.exact and self._max_nodes is None:
                self._max_nodes = self._exact_rows()
            if self.adaptive and self.drafter is not None and self.policy is None:
                self.policy = self._make_policy()  # None until t(k) is known (cached, or timed by the first rounds)
            elif self.adaptive and self.ngram:
                self._costs()
            pending = [sample_token(logits, params, rng)]
            while True:
                yield from out.emit(pending)  # 1. what the last step produced, up to a stop condition
                if out.finish:
                    break
                room = min(t.n_ctx, t.n_cells) - t.n_past
                if room < 1:
                    out.finish = "context_full"
                    break
                stats.rounds += 1
                pending = self._round(pending[-1], room, params, rng, stats)  # 2. one round
        except GeneratorExit:  # closed by the caller (a client went away): not a normal end
            out.finish = out.finish or "cancelled"
            raise
        except BaseException:
            out.finish = out.finish or "error"
            raise
        finally:
            if self._costs_dirty:  # what this generation measured serves the next process too
                save_costs(t, self._verify_ms)
                self._costs_dirty = False
            tail = out.tail()
            stats.total_seconds = time.perf_counter() - t0
            stats.n_tokens = len(out.tokens)
            if self._device_stats is not None:
                stats.peak_gpu_memory_bytes = self._device_stats()
            handle.result = GenerationResult("".join(out.parts) + tail, out.tokens, out.finish or "length", stats)
        if tail:
            yield tail

    def _round(self, root: int, room: int, params: SamplingParams, rng, stats: GenerationStats) -> list[int]:
        """Propose (draft tree and n-gram branch, each only where it pays), verify once, accept, commit.

        Returns the tokens the round emits. Trees stay inside the attention window a plain step
        would use, so their logits are bit-identical to plain decoding's.
        """
        t, drafter = self.target, self.drafter
        free_cells = min(t.n_cells - t.n_past, t.window_room)
        if self._calibration:
            return self._calibration_round(root, room, min(free_cells, self._node_limit()), params, rng, stats)
        within_reach = drafter is not None and t.n_past <= getattr(drafter, "max_positions", t.n_ctx)  # else plain
        tree = self._next_tree(room, free_cells) if within_reach else None
        proposal, draft_ms, steady = None, None, False
        if tree is not None:
            steady = t.n_past - self._draft_len <= self.tree.depth  # catching up on many positions is not typical
            td = time.perf_counter()
            proposal = self._draft(root, tree, self._draft_len)
            draft_ms = 1000 * (time.perf_counter() - td)
            stats.draft_seconds += draft_ms / 1000
            self._draft_len = t.n_past
        n_tree = proposal.tokens.size if proposal is not None else 1
        chain = np.zeros(0, dtype=np.int32)
        free_cells = min(free_cells, self._node_limit())  # a chain fills at most what is left of the limit
        if self.ngram and room >= 2 and free_cells > n_tree:
            expected = self.policy.expected(tree.depth) if (self.policy is not None and tree is not None) else 1.0
            chain = self._chain(root, min(room, free_cells - n_tree + 1), n_tree, expected)
        if proposal is None and chain.size == 0:
            return self._plain_step(root, params, rng, stats)
        pending, reached, on_tree, on_chain = self._tree_step(root, proposal, chain, params, rng, stats)
        if self.policy is not None and tree is not None:
            self.policy.observe(reached, on_tree, draft_ms if steady else None)
        if chain.size:
            self.chain_policy.observe(chain.size, on_chain)
        return pending

    def _node_limit(self) -> int:
        """Most nodes (root included) one verification may hold."""
        return self._max_nodes or self.target.max_tree_nodes

    def _next_tree(self, room: int, free_cells: int) -> TreeConfig | None:
        """This round's tree: the policy's choice (or the configured tree), fitted to the room left."""
        free_cells = min(free_cells, self._node_limit())
        if room < 2 or free_cells < 2:
            return None
        if self.adaptive and self.policy is None:
            return None  # the costs could not be measured (no room): plain decoding this time
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
        """``tree``, made smaller where the context has little room left (never deeper than its nodes)."""
        if room > tree.depth and free_cells > tree.tokens:
            return tree
        tokens = min(tree.tokens, free_cells - 1)
        return TreeConfig(tokens=tokens, depth=min(tree.depth, room - 1, tokens), topk=tree.topk)
