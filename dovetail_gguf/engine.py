"""The speculative round loop: propose, plan, verify, accept, commit.

A round gathers proposals from its sources (the suffix index over the context,
a client's predicted output, and, where its expected gain beats its cost, the
draft model's tree), plans the subtree worth verifying from one cost model
(plan.py), verifies it in one call, accepts, and commits both sides. The engine
owns neither KV cache; it asks the target and the drafter to commit. With no
source it runs plain one-token decoding through the same target wrapper, which
is the baseline every speed figure is measured against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .accept import Sampler, accept_greedy
from .costs import CostModel
from .errors import ContextFullError, InvalidArgumentError
from .llama_handles import GrammarState
from .options import GenerateOptions
from .plan import (DRAFT, PREDICTION, Proposal, RoundPlan, likeliest_path, merge, plan_round, restrict, tested_nodes,
                   tree_depths)
from .prefixes import SAVE_MIN_TOKENS, SWAP_MIN_TOKENS, CachedPrefix, PrefixStore, common_prefix
from .policy import TreePolicy
from .proposers import CONTEXT_PRIOR, AcceptanceModel, DraftProposer, SuffixProposer, prediction_proposer
from .suffix import SuffixIndex
from .target import Target
from .text import Detokenizer, StopMatcher
from .types import (  # noqa: F401  (re-exported: the engine's vocabulary)
    Drafter,
    DraftTree,
    GenerationResult,
    GenerationStats,
    RoundRecord,
    TreeConfig,
)

log = logging.getLogger(__name__)

# A draft model reads at most this many of a new prompt's last positions (the shipped drafts were
# trained on 256-token windows); the rest of a long prompt is evaluated without outputs.
DRAFT_WINDOW = 256


@dataclass(eq=False)
class Request:
    """One generation's inputs, checked against this model by :meth:`Engine.prepare`; runs once.

    The options were checked when they were built; here only what needs the model is added."""

    prompt: np.ndarray  # [n] int32, fits the context
    options: GenerateOptions
    prediction: np.ndarray  # [m] int32, the prediction's tokens (empty: none)
    grammar: GrammarState | None  # parsed once; the sampler owns it from the start on
    started: bool = False


class Generation:
    """One generation in progress: iterate for text pieces; ``result`` is set once it ends."""

    def __init__(self, engine: "Engine", request: Request):
        self.result: GenerationResult | None = None
        self._it = engine._generate(request, self)

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


@dataclass(eq=False)
class _Run:
    """One generation's state beside the engine's learned one: what its rounds read and write."""

    sampler: Sampler
    stats: GenerationStats
    context: SuffixIndex | None  # the suffix index over prompt and answer (None: the engine does not look)
    sources: list[SuffixProposer]  # the context's and the prediction's proposers
    draft_len: int  # (feature, token) pairs the drafter holds


class Engine:
    """Speculative generation over one target, an optional drafter, the suffix index and predictions."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeConfig | None = None,
                 adaptive: bool = True, ngram: bool = False, prefixes: PrefixStore | None = None):
        """``adaptive``: plan each round from measured costs and acceptance, falling back to plain
        decoding when speculation does not pay (see plan.py); else always draft ``tree`` and verify
        every candidate. ``ngram``: propose continuations found earlier in the context (the suffix
        index) in every round; with no drafter, the only source besides a prediction. ``prefixes``:
        where prompt prefixes other than the live one are kept warm (None: only the live one).
        """
        self.target = target
        self.tree = tree or TreeConfig()
        self.tree.validate(target.max_tree_nodes)
        self.ngram = ngram
        self.prefixes = prefixes
        self.set_drafter(drafter, adaptive)

    def set_drafter(self, drafter: Drafter | None, adaptive: bool | None = None) -> None:
        """Use ``drafter`` from the next generation on (None: no draft model); ``adaptive`` as in the constructor.

        The new drafter holds no context yet: the next prompt is evaluated again from its start.
        """
        self.drafter = drafter
        if adaptive is not None:
            self.adaptive = adaptive
        self.policy: TreePolicy | None = None  # sizes the draft model's tree, and says when drafting pays
        self.costs = CostModel(self.target, self.target.max_tree_nodes)
        self._context_acceptance = AcceptanceModel(np.asarray(CONTEXT_PRIOR))  # learned across generations
        self._draft_source = DraftProposer()
        # target hidden state of every committed position, so a drafter can resume after prefix reuse
        self._hidden = np.zeros((self.target.n_ctx, self.target.n_embd), dtype=np.float32) if drafter else None
        self._hidden_lo = 0  # _hidden holds the features of positions _hidden_lo .. n_past - 1
        self._fresh_drafter = drafter is not None  # nothing of the target's cache may be reused for it yet
        self._device_stats = getattr(drafter, "peak_memory_bytes", None)
        if self.prefixes is not None:
            self.prefixes.clear()  # their features were the old drafter's business

    def share_learning(self, other: "Engine") -> None:
        """Learn the suffix index's acceptance together with ``other`` (an engine over the same weights):
        requests served side by side each add to what all of them plan with."""
        self._context_acceptance = other._context_acceptance

    @property
    def cost_table(self) -> dict[int, float] | None:
        """t(k) in ms by rows, as measured so far (None before any measurement)."""
        return self.costs.table or None

    def check_prompt(self, prompt_tokens) -> np.ndarray:
        """The prompt as int32 tokens; raises for an empty prompt, ids outside the vocabulary, or a
        prompt that does not fit the context."""
        prompt = self.target.vocab.check_ids(np.ascontiguousarray(prompt_tokens).reshape(-1), "prompt token ids")
        if prompt.size == 0:
            raise InvalidArgumentError("the prompt is empty")
        if prompt.size >= self.target.n_ctx:
            raise ContextFullError(
                f"the prompt has {prompt.size} tokens but the context holds {self.target.n_ctx}; "
                "shorten the prompt or raise the context size"
            )
        return prompt

    def prepare(self, prompt_tokens: Sequence[int], options: GenerateOptions | None = None) -> Request:
        """Check a request against this model, before it waits its turn: the prompt fits, token ids
        (prompt, logit bias, prediction) are in the vocabulary, llama.cpp parses the grammar.
        Raises a DovetailError otherwise. Safe to call while another generation runs."""
        options = options if options is not None else GenerateOptions()
        if not isinstance(options, GenerateOptions):
            raise InvalidArgumentError(f"options must be GenerateOptions, got {type(options).__name__}")
        prompt = self.check_prompt(prompt_tokens)
        self.target.vocab.check_ids(np.fromiter(options.logit_bias, dtype=np.int64, count=len(options.logit_bias)),
                                    "logit_bias token ids")
        prediction = self._prediction_tokens(options.prediction)
        grammar = GrammarState(self.target.vocab, options.gbnf) if options.gbnf is not None else None
        return Request(prompt, options, prediction, grammar)

    def start(self, request: Request | Sequence[int], options: GenerateOptions | None = None) -> Generation:
        """Begin generating; iterate the result for text pieces. ``request``: a prepared one, or prompt
        tokens to prepare with ``options``."""
        if not isinstance(request, Request):
            request = self.prepare(request, options)
        elif options is not None:
            raise InvalidArgumentError("a prepared request carries its options")
        self._claim(request)
        return Generation(self, request)

    def warm(self, request: Request) -> GenerationStats:
        """Evaluate a prepared request's prompt into the cache and generate nothing: a later prompt
        that shares its prefix starts from there (an editor warming the cache with new context).
        Returns the prompt's counts and prefill time (no tokens generated)."""
        self._claim(request)
        stats = GenerationStats(n_prompt_tokens=int(request.prompt.size))
        t0 = time.perf_counter()
        _, _, stats.n_cached_tokens = self._prefill(request.prompt)
        stats.prefill_seconds = stats.total_seconds = time.perf_counter() - t0
        return stats

    @staticmethod
    def _claim(request: Request) -> None:
        """A prepared request runs once (its grammar state goes to the one sampler that uses it)."""
        if request.started:
            raise InvalidArgumentError("a prepared request runs once; prepare it again")
        request.started = True

    # ------------------------------------------------------------------ phases
    def _prefill(self, prompt: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Reuse the longest cached prefix, evaluate the rest.

        Returns (last logits, pairs the drafter holds, prompt tokens reused from the cache). The target keeps the
        whole reused prefix; a drafter that holds less of it (after a stretch
        of plain decoding, say) catches up at its next draft from the target
        features stored for every committed position.
        """
        t = self.target
        common = common_prefix(t.history(0), prompt)
        if self.prefixes is not None:
            common = self._switch_prefix(prompt, common)
        # the last prompt token is always evaluated; with invariant kernels, the cached positions kept
        # are those a cold prefill would compute alike (see Target.reusable_prefix)
        n_keep = t.reusable_prefix(prompt.size, common)
        held = 0
        out_lo = prompt.size  # new positions from here on are evaluated with outputs
        if self.drafter is not None:
            if self._fresh_drafter:  # its features of the cached prefix were never recorded
                n_keep, self._fresh_drafter = 0, False
            held = self.drafter.trim(max(n_keep - 1, 0))
            # a drafter that can skip reads a long prompt's last DRAFT_WINDOW features only: the rows
            # before them need no outputs, so the prefill spends no LM head on them
            window = max(0, prompt.size - 1 - DRAFT_WINDOW) if hasattr(self.drafter, "skip_to") else 0
            out_lo = t.prefill_split(n_keep, max(n_keep, window), prompt.size - 1)
        t.truncate(n_keep)
        if n_keep < min(out_lo, prompt.size - 1):  # outputs (through the LM head) only where a drafter reads them
            t.prefill(prompt[n_keep : min(out_lo, prompt.size - 1)], outputs=False)
        if out_lo < prompt.size - 1:
            _, hidden = t.prefill(prompt[out_lo:-1], outputs=True)
            self._hidden[out_lo : prompt.size - 1] = hidden
        if self.drafter is not None:
            # the features held now run, without a gap, from _hidden_lo to the prompt's end
            if out_lo > n_keep or self._hidden_lo > n_keep:
                self._hidden_lo = out_lo
            if held < self._hidden_lo:
                held = self.drafter.skip_to(self._hidden_lo)
        # the last prompt token alone, as a one-token decode: its logits are then the same whether
        # or not the rest of the prompt was cached (a batch row can differ from a single-row decode
        # in the last bits), so identical greedy requests give identical answers
        logits, hidden = t.decode_one(int(prompt[-1]))
        if self._hidden is not None:
            self._hidden[prompt.size - 1] = hidden
        return logits.copy(), held, n_keep

    def _switch_prefix(self, prompt: np.ndarray, common: int) -> int:
        """Keep the live prefix warm if ``prompt`` would drop it, and put back a stored prefix that
        shares more of ``prompt`` (another conversation returning). Returns the tokens the live
        prefix now shares with ``prompt``."""
        t = self.target
        entry, shared = self.prefixes.best(prompt)
        # a prefix saved without the draft's features would make the draft read the whole prompt again
        switch = entry is not None and shared >= common + SWAP_MIN_TOKENS and (self._hidden is None or entry.hidden is not None)
        if (switch or t.n_past - common >= SAVE_MIN_TOKENS) and t.n_past >= SAVE_MIN_TOKENS:
            hidden = self._hidden[self._hidden_lo : t.n_past].copy() if self._hidden is not None else None
            self.prefixes.put(CachedPrefix(t.save_prefix(), hidden, self._hidden_lo))
        if not switch:
            return common
        self.prefixes.take(entry)
        t.restore_prefix(entry.saved)
        if self.drafter is not None:
            self.drafter.trim(0)  # it held the other conversation's pairs: it catches up from the features
            if entry.hidden is not None:
                self._hidden[entry.hidden_lo : t.n_past] = entry.hidden
                self._hidden_lo, self._fresh_drafter = entry.hidden_lo, False
            else:
                self._fresh_drafter = True
        return shared

    def _sampler(self, request: Request) -> Sampler:
        grammar, request.grammar = request.grammar, None  # the sampler owns and closes it
        o = request.options
        return Sampler(o.sampling(), request.prompt.tolist(), self.target.is_eog, grammar, o.logprobs)

    def _prediction_tokens(self, prediction: str | tuple[int, ...] | None) -> np.ndarray:
        if not prediction:
            return np.zeros(0, dtype=np.int32)
        if isinstance(prediction, str):
            return self.target.tokenize(prediction, add_special=False, parse_special=False)
        return self.target.vocab.check_ids(np.asarray(prediction, dtype=np.int64), "prediction token ids")

    def _start_sources(self, prompt: np.ndarray, prediction: np.ndarray) -> tuple[SuffixIndex | None, list[SuffixProposer]]:
        """The suffix index over the prompt (when the engine looks for repeats), and the proposers of
        the context and of the prediction."""
        context = SuffixIndex(prompt) if self.ngram else None
        sources = []
        if context is not None:
            sources.append(SuffixProposer(context, acceptance=self._context_acceptance))
        if prediction.size:
            sources.append(prediction_proposer(prompt[-8:], prediction))
        return context, sources

    def _record_cost(self, n: int, seconds: float) -> None:
        """A decode of ``n`` rows took ``seconds``: refine t(n) (the context grows, machines drift)."""
        if self.costs.record(n, seconds) and self.policy is not None:
            self.policy.costs_changed(n)

    def _calibration_round(self, root: int, tail: list[int], room: int, free_cells: int, run: _Run) -> list[int]:
        """A round of the size t(k) is next measured for, so timing costs no decode of its own.

        One row is a plain step; k rows verify the root and k - 1 free guesses: the sources'
        likeliest chain, padded with the root token (no drafting: on a CPU a draft call can cost
        more than the decode it times). Once every size has had its round, the policy starts.
        """
        rows = self.costs.calibration.pop(0)
        if rows == 1 or room < 2 or free_cells < 2:
            pending = self._plain_step(root, run)
            proposals: list[Proposal] = []
        else:
            n = min(rows - 1, room - 1, free_cells - 1)
            proposals = [s.propose(tail, n) for s in run.sources]
            cands = self._candidates(root, proposals, run.sampler)
            guess = cands.tokens[likeliest_path(cands)[1 : n + 1]]
            chain = np.concatenate([guess, np.full(n - guess.size, root, dtype=np.int32)])
            plan = RoundPlan(np.arange(n + 1), np.append(np.int32(root), chain).astype(np.int32),
                             np.arange(-1, n, dtype=np.int32), np.zeros(n + 1, dtype=np.uint8), 0.0, 0.0)
            pending, _ = self._verify(plan, run)
        self._observe_sources(proposals, pending, run)
        if not self.costs.calibration and self.costs.finish_calibration():
            if self.adaptive and self.drafter is not None and self.policy is None:
                self.policy = self._make_policy()
        return pending

    def _make_policy(self) -> TreePolicy | None:
        if not self.costs.ready():
            return None
        return TreePolicy(self.tree.tokens, self.tree.depth, self.tree.topk, self.costs.table,
                          draft_ms_per_depth=float(getattr(self.drafter, "step_ms", 0.0)))

    def _plain_step(self, root: int, run: _Run) -> list[int]:
        """Decode one token; the next token is sampled from its logits."""
        t = self.target
        tv = time.perf_counter()
        logits, hidden = t.decode_one(root)
        if self._hidden is not None:
            self._hidden[t.n_past - 1] = hidden
        seconds = time.perf_counter() - tv
        run.stats.verify_seconds += seconds
        self._record_cost(1, seconds)
        run.stats.accepted_tokens += 1
        run.stats.verified_rows += 1
        return [run.sampler.choose(logits)]

    def _draft(self, root: int, tree: TreeConfig, draft_len: int) -> DraftTree:
        """The drafter's tree below ``root``, after feeding it the pairs it lacks."""
        t = self.target
        feats = self._hidden[draft_len : t.n_past]  # (feature of position p-1, token at p) up to the root
        pair_tokens = np.append(t.history(draft_len + 1), root).astype(np.int32)
        return self.drafter.propose(feats, pair_tokens, tree)

    def _verify(self, plan: RoundPlan, run: _Run) -> tuple[list[int], np.ndarray]:
        """Verify the plan's nodes in one call, accept, commit. Returns (tokens emitted, accepted path)."""
        t, sampler, stats = self.target, run.sampler, run.stats
        tv = time.perf_counter()
        res = t.verify_tree(plan.tokens, plan.parents)
        self._record_cost(plan.rows, time.perf_counter() - tv)
        if sampler.plain_greedy:
            acc = accept_greedy(res.layout.tokens, res.layout.parents, res.layout.ancestors, res.logits)
        else:
            acc = sampler.walk(res.layout.tokens, res.layout.parents, res.logits)
        if self._hidden is not None:
            self._hidden[t.n_past : t.n_past + acc.path.size] = res.hidden[acc.path]
        stats.reevaluated_rows += t.commit(acc.path)
        stats.verify_seconds += time.perf_counter() - tv
        pending = [*res.layout.tokens[acc.path[1:]].tolist(), acc.next_token]
        stats.accepted_tokens += len(pending)
        stats.verified_rows += plan.rows
        return pending, acc.path

    def _generate(self, request: Request, handle: Generation) -> Iterator[str]:
        t = self.target
        prompt, options = request.prompt, request.options
        stats = GenerationStats(n_prompt_tokens=int(prompt.size))
        sampler: Sampler | None = None
        out = _Output(t, options)
        t0 = time.perf_counter()
        try:
            sampler = self._sampler(request)
            logits, draft_len, stats.n_cached_tokens = self._prefill(prompt)  # pairs the drafter holds
            stats.prefill_seconds = time.perf_counter() - t0
            run = _Run(sampler, stats, *self._start_sources(prompt, request.prediction), draft_len)
            if self.adaptive and self.drafter is not None and self.policy is None:
                self.policy = self._make_policy()  # None until t(k) is known (cached, or timed by the first rounds)
            elif self.adaptive and run.sources:
                self.costs.ready()  # loads the cache, or starts calibrating
            pending = [sampler.choose(logits)]
            while True:
                sampler.accept(pending)
                if run.context is not None:
                    run.context.extend(pending)  # the stream is the context and the root
                yield from out.emit(pending)  # 1. what the last step produced, up to a stop condition
                if out.finish:
                    break
                room = min(t.n_ctx, t.n_cells) - t.n_past
                if room < 1:
                    out.finish = "context_full"
                    break
                stats.rounds += 1
                room = min(room, options.max_tokens - len(out.tokens))  # a round emits at most one token per row
                pending = self._round(pending[-1], room, run)  # 2. one round
        except GeneratorExit:  # closed by the caller (a client went away): not a normal end
            out.finish = out.finish or "cancelled"
            raise
        except BaseException:
            out.finish = out.finish or "error"
            raise
        finally:
            self.costs.save()  # what this generation measured serves the next process too
            tail = out.tail()
            stats.total_seconds = time.perf_counter() - t0
            stats.n_tokens = len(out.tokens)
            if self._device_stats is not None:
                stats.peak_gpu_memory_bytes = self._device_stats()
            logprobs = None
            if sampler is not None:
                sampler.close()
                logprobs = sampler.records[: len(out.tokens)] if sampler.logprobs is not None else None
            handle.result = GenerationResult("".join(out.parts) + tail, out.tokens, out.finish or "length", stats,
                                             logprobs)
        if tail:
            yield tail

    # ------------------------------------------------------------------ one round
    def _round(self, root: int, room: int, run: _Run) -> list[int]:
        """Propose, plan, verify, accept, commit. Returns the tokens the round emits.

        Trees stay inside the attention window a plain step would use, so their logits are
        bit-identical to plain decoding's.
        """
        t, sampler, stats = self.target, run.sampler, run.stats
        tr, verify_before = time.perf_counter(), stats.verify_seconds
        limit = min(t.n_cells - t.n_past, t.window_room, self._node_limit(), room)  # rows, root included
        tail = self._tail(root, run)
        if self.costs.calibration:
            return self._calibration_round(root, tail, room, limit, run)
        proposals = [s.propose(tail, limit - 1) for s in run.sources] if limit >= 2 else []
        plan = self._plan(root, proposals, limit, sampler)
        draft_ms = predicted_draft_ms = 0.0
        tree = self._draft_tree(plan, room, limit)
        if tree is not None:
            predicted_draft_ms = self._predicted_draft_ms(tree)
            steady = t.n_past - run.draft_len <= self.tree.depth  # catching up on many positions is not typical
            td = time.perf_counter()
            proposals.append(self._draft_source.proposal(self._draft(root, tree, run.draft_len)))
            draft_ms = 1000 * (time.perf_counter() - td)
            stats.draft_seconds += draft_ms / 1000
            stats.draft_rounds += 1
            run.draft_len = t.n_past
            plan = self._plan(root, proposals, limit, sampler)
        if plan.plain:
            pending, path = self._plain_step(root, run), np.zeros(1, dtype=np.int64)
        else:
            pending, path = self._verify(plan, run)
        self._observe_round(plan, path, proposals, pending, tree, draft_ms if tree is not None and steady else None,
                            run)
        verify_ms = 1000 * (stats.verify_seconds - verify_before)
        round_ms = 1000 * (time.perf_counter() - tr)
        self.costs.record_overhead(round_ms - draft_ms - verify_ms)
        if self.adaptive and self.costs.table:  # a round the cost model planned
            stats.round_log.append(RoundRecord(plan.rows, tree is not None, round(predicted_draft_ms + plan.expected_ms, 3),
                                               round(round_ms, 3), round(plan.expected_tokens, 3), len(pending)))
        return pending

    def _predicted_draft_ms(self, tree: TreeConfig) -> float:
        """What the cost model expects drafting ``tree`` to take."""
        if self.policy is not None:
            return float(self.policy.draft_ms(tree.depth))
        return float(getattr(self.drafter, "step_ms", 0.0)) * tree.depth

    def _tail(self, root: int, run: _Run) -> list[int]:
        """The context's last tokens, the root included: what the suffix sources match."""
        if run.context is not None:
            return run.context.tokens[-64:].tolist()
        return [*self.target.history(max(0, self.target.n_past - 63)).tolist(), root]

    @staticmethod
    def _candidates(root: int, proposals: list[Proposal], sampler: Sampler):
        """The merged proposals, without the nodes a grammar refuses (they could never be accepted)."""
        cands = merge(root, proposals)
        if sampler.grammar is not None and cands.size:
            cands = restrict(cands, sampler.prune(cands.tokens, cands.parents))
        return cands

    def _plan(self, root: int, proposals: list[Proposal], limit: int, sampler: Sampler) -> RoundPlan:
        cands = self._candidates(root, proposals, sampler)
        return plan_round(cands, self.costs.verify_ms, limit, self.costs.overhead_ms, take_all=not self.adaptive)

    def _draft_tree(self, plan: RoundPlan, room: int, limit: int) -> TreeConfig | None:
        """The draft model's tree for this round, or None where its expected gain does not beat its cost
        (or beat the plan the free sources already give)."""
        t, drafter = self.target, self.drafter
        if drafter is None or t.n_past > getattr(drafter, "max_positions", t.n_ctx) or room < 2 or limit < 2:
            return None
        if not self.adaptive:
            return self._fit_tree(self.tree, room, limit)
        if self.policy is None:
            return None  # the costs could not be measured (no room): plain decoding this time
        choice = self.policy.choose()
        if choice is None:
            return None
        depth, tokens = choice
        draft_speed = float(self.policy.speed(depth, tokens))
        free_speed = plan.expected_tokens / max(plan.expected_ms, 1e-9)
        if not plan.plain and free_speed >= draft_speed:
            return None  # the free sources already do better than drafting would
        # a tree of n nodes never needs more than n candidates per level: same tree, less drafting
        return self._fit_tree(TreeConfig(tokens=tokens, depth=depth, topk=min(self.tree.topk, tokens)), room, limit)

    def _observe_round(self, plan: RoundPlan, path: np.ndarray, proposals: list[Proposal], pending: list[int],
                       tree: TreeConfig | None, draft_ms: float | None, run: _Run) -> None:
        """Every source learns from what the round emitted; the tree policy and the statistics from what it verified."""
        stats = run.stats
        self._observe_sources(proposals, pending, run)
        on_path = (plan.sources[path[1:]] & PREDICTION) > 0 if path.size > 1 else np.zeros(0, dtype=bool)
        stats.accepted_prediction_tokens += int(on_path.sum())
        stats.rejected_prediction_tokens += int(((plan.sources[1:] & PREDICTION) > 0).sum() - on_path.sum())
        if tree is None:
            return
        # the draft's tree as drafted, whether or not the plan verified all of it: its depth, and how
        # far down it the round's emitted tokens went (what verifying it whole would have accepted)
        draft = next(p for p in proposals if p.source == DRAFT)
        reached = int(tree_depths(draft.parents).max())
        _, hit = tested_nodes(draft.tokens, draft.parents, pending)
        on_tree = int(hit.sum())  # at most one child per level matches
        if reached == 0:
            return
        stats.record_tree(reached, on_tree)
        if self.policy is not None:
            self.policy.observe(reached, min(on_tree, reached), draft_ms)

    def _observe_sources(self, proposals: list[Proposal], pending: list[int], run: _Run) -> None:
        for prop in proposals:
            source = self._draft_source if prop.source == DRAFT else next(
                (s for s in run.sources if s.source == prop.source), None)
            if source is not None:
                source.observe(prop, pending)

    def _node_limit(self) -> int:
        """Most nodes (root included) one verification may hold."""
        return self.target.max_tree_nodes

    @staticmethod
    def _fit_tree(tree: TreeConfig, room: int, free_cells: int) -> TreeConfig:
        """``tree``, made smaller where the context has little room left (never deeper than its nodes)."""
        if room > tree.depth and free_cells > tree.tokens:
            return tree
        tokens = min(tree.tokens, free_cells - 1)
        return TreeConfig(tokens=tokens, depth=min(tree.depth, room - 1, tokens), topk=tree.topk)

