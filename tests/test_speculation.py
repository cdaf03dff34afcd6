"""Free suffix-index branches, Predicted Outputs and the verification-cost cache, on the real SmolLM2 target."""

from __future__ import annotations

import numpy as np
import pytest

import dovetail_gguf.costs as costs_mod
from dovetail_gguf.engine import Engine, GenerateOptions
from dovetail_gguf.target import Target, TargetConfig

COPY_PROMPT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu\n" * 3 + "alpha beta"


@pytest.fixture(scope="module")
def smol(smollm2_path):
    t = Target(smollm2_path, TargetConfig(n_ctx=1024, n_threads=2))
    yield t
    t.close()


def run(engine: Engine, prompt, n=48):
    engine.target.reset()
    gen = engine.start(prompt, GenerateOptions(max_tokens=n))
    for _ in gen:
        pass
    return gen.result


@pytest.mark.parametrize("adaptive", [False, True])
def test_ngram_branches_are_accepted_on_a_copying_prompt_and_keep_greedy_output(smol, adaptive, tmp_path, monkeypatch):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    prompt = smol.tokenize(COPY_PROMPT)
    plain = run(Engine(smol), prompt)
    spec = run(Engine(smol, None, adaptive=adaptive, ngram=True), prompt)
    assert spec.tokens == plain.tokens
    assert spec.stats.mean_accepted_tokens > 1.5, spec.stats  # the copied words come in chains


def test_ngram_mode_equals_plain_on_text_that_does_not_repeat(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    prompt = smol.tokenize("The history of the printing press begins")
    assert run(Engine(smol, None, ngram=True), prompt, 40).tokens == run(Engine(smol), prompt, 40).tokens


def test_costs_are_timed_by_the_first_rounds_once_and_reused_by_a_later_engine(smollm2_path, tmp_path, monkeypatch):
    """No decode is spent on timing: with nothing cached, the first rounds verify 1, 1, 2 and 4
    rows and are timed; a later engine with the same settings finds the figures cached."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    from dovetail_gguf.llama_handles import LlamaContext

    calls, decodes, llama_rows = [], [], []
    real_round, real_verify, real_one = Engine._calibration_round, Target.verify_tree, Target.decode_one
    real_decode = LlamaContext.decode
    # every llama_decode, whoever calls it (prefill, plain steps, trees, commit's re-evaluation)
    monkeypatch.setattr(LlamaContext, "decode", lambda self, batch: llama_rows.append(batch.struct.n_tokens)
                        or real_decode(self, batch))
    monkeypatch.setattr(Engine, "_calibration_round", lambda self, *a, **k: calls.append(1) or real_round(self, *a, **k))
    monkeypatch.setattr(Target, "verify_tree", lambda self, tokens, *a: decodes.append(len(tokens)) or real_verify(self, tokens, *a))
    monkeypatch.setattr(Target, "decode_one", lambda self, *a: decodes.append(1) or real_one(self, *a))
    implausible = costs_mod.IMPLAUSIBLE_BELOW_T1
    monkeypatch.setattr(costs_mod, "IMPLAUSIBLE_BELOW_T1", 0.0)  # a busy machine's timings are kept here (see below)
    prompt = None
    for threads, expect_calls in ((2, 4), (2, 4), (1, 8)):
        with Target(smollm2_path, TargetConfig(n_ctx=512, n_threads=threads)) as t:
            prompt = t.tokenize(COPY_PROMPT) if prompt is None else prompt
            decodes.clear()
            llama_rows.clear()
            before = len(calls)
            result = run(Engine(t, None, adaptive=True, ngram=True), prompt, 16)  # room for the calibration sizes
            assert result.stats.n_tokens == 16
            # every decode but the prompt's last token (always a one-token decode) was a round that emitted tokens
            assert len(decodes) == result.stats.rounds + 1
            # every row llama.cpp computed is accounted for: the prompt (its last token among the
            # decodes), the rounds' rows, and commit's re-evaluations, which the statistics count
            assert sum(llama_rows) == len(prompt) - 1 + sum(decodes) + result.stats.reevaluated_rows
            assert sum(decodes) - 1 == result.stats.verified_rows
            if len(calls) > before:  # the calibration rounds' sizes, in order
                assert decodes[1:5] == [1, 1, 2, 4]
            assert {1, 2, 4} <= set(costs_mod.load_costs(t) or {})
        assert len(calls) == expect_calls  # a second engine, same settings: no calibration round
    assert (tmp_path / "verify_costs.json").is_file()
    # costs timed on a busy machine (one row dearer than three) are measured again, not trusted
    monkeypatch.setattr(costs_mod, "IMPLAUSIBLE_BELOW_T1", implausible)
    with Target(smollm2_path, TargetConfig(n_ctx=512, n_threads=2)) as t:
        costs_mod.save_costs(t, {1: 72.9, 2: 54.8, 3: 39.1})
        assert costs_mod.load_costs(t) is None
        run(Engine(t, None, adaptive=True, ngram=True), prompt, 8)
        assert len(calls) == 12


def test_start_up_near_the_context_end_still_generates(smollm2_path, tmp_path, monkeypatch):
    """A prompt a few tokens short of n_ctx: calibration must not need room the context lacks."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    from dovetail_gguf import Dovetail

    cfg = TargetConfig(n_ctx=256, n_threads=2)
    with Dovetail(smollm2_path, False, target_config=cfg) as plain:
        prompt = plain.tokenize_prompt("word " * 400)[: 256 - 5]
        want = plain.generate_tokens(prompt, max_tokens=20)
    with Dovetail(smollm2_path, None, target_config=cfg) as dt:  # adaptive, with the shipped draft
        got = dt.generate_tokens(prompt, max_tokens=20)
    assert want.finish_reason == got.finish_reason == "context_full"
    assert got.tokens == want.tokens and len(got.tokens) >= 4


def test_a_new_drafter_gets_every_feature_of_a_reused_prompt(smollm2_path):
    """After set_drafter, the prompt is evaluated again from its start: no pair gets a zero feature."""
    from dovetail_gguf import Dovetail
    from dovetail_gguf.draft.io import load_drafter
    from dovetail_gguf.models import default_draft_for

    with Dovetail(smollm2_path, False, target_config=TargetConfig(n_ctx=512, n_threads=2)) as dt:
        prompt = dt.tokenize_prompt("Hello there, how are you today?")
        dt.generate_tokens(prompt, max_tokens=4)  # the target's cache now holds the prompt
        dt.engine.set_drafter(load_drafter(default_draft_for(dt.target.facts), dt.target, "cpu"), adaptive=False)
        dt.generate_tokens(prompt, max_tokens=4)
        assert (np.abs(dt.engine._hidden[: len(prompt)]).sum(axis=1) > 0).all()


def test_engine_and_api_share_defaults():
    import inspect

    from dovetail_gguf import Dovetail

    assert inspect.signature(Engine).parameters["adaptive"].default is True
    assert inspect.signature(Dovetail).parameters["adaptive"].default is True


def test_a_second_turn_keeps_the_targets_cache_whatever_the_drafter_holds(smollm2_path, monkeypatch):
    """The drafter may hold few pairs (rounds without drafting); the target still reuses the whole
    prefix and the drafter catches up from the stored features: only the new tokens are evaluated."""
    from dovetail_gguf import Dovetail

    with Dovetail(smollm2_path, target_config=TargetConfig(n_ctx=1024, n_threads=2)) as dt:
        first = dt.tokenize_prompt("The old lighthouse keeper climbed the stairs")
        r1 = dt.generate_tokens(first, max_tokens=40)
        held = dt.engine.drafter.trim(10**9)  # what the drafter holds now (trim to more keeps all)
        second = [*first, *r1.tokens, *dt.target.tokenize(" Later that night, the keeper", add_special=False).tolist()]
        rows = []
        real = Target.prefill
        monkeypatch.setattr(Target, "prefill", lambda self, tokens, *a, **k: rows.append(len(tokens)) or real(self, tokens, *a, **k))
        r2 = dt.generate_tokens(second, max_tokens=20)
        assert sum(rows) <= len(second) - len(first) - len(r1.tokens) + 1, (rows, held)
        assert r2.stats.n_tokens == 20
        assert (np.abs(dt.engine._hidden[: len(second)]).sum(axis=1) > 0).all()  # every feature is there


def test_two_processes_writing_the_cost_cache_keep_each_others_entries(tmp_path):
    """The cache's read-modify-write runs under a lock: concurrent writers lose nothing."""
    import subprocess
    import sys

    script = ("import sys; from dovetail_gguf import costs\n"
              "for i in range(40): costs._write_entry(f'{sys.argv[1]}-{i}', {'1': 1.0})\n")
    env = {**__import__("os").environ, "DOVETAIL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, name], env=env) for name in ("a", "b", "c")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    import json

    keys = set(json.loads((tmp_path / "verify_costs.json").read_text()))
    assert keys == {f"{n}-{i}" for n in "abc" for i in range(40)}


def test_the_cost_cache_keeps_counts_spread_and_ages_and_forgets_old_sizes(smol, tmp_path, monkeypatch):
    import time

    from dovetail_gguf.costs import CostModel, SizeStats, _write_entry, cost_key, load_costs, save_costs

    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    now = time.time()
    stats = {1: SizeStats(5, 0.02, now - 90 * 86400), 2: SizeStats(3, 0.1, now), 8: SizeStats(1, 0.0, now - 40 * 86400)}
    save_costs(smol, {1: 40.0, 2: 45.0, 8: 90.0}, stats)
    got: dict = {}
    assert load_costs(smol, got) == {1: 40.0, 2: 45.0}  # t(8) not timed for 40 days: gone; t(1) always kept
    assert (got[2].n, got[2].spread) == (3, 0.1) and got[2].at == pytest.approx(now, abs=1)
    _write_entry(cost_key(smol), {"1": 40.0, "4": 60.0})  # an entry without counts and ages: timed again
    assert load_costs(smol) is None
    save_costs(smol, {1: 40.0, 4: 60.0})
    assert load_costs(smol) == {1: 40.0, 4: 60.0}
    model = CostModel(smol, 64)
    assert model.ready()
    for seconds in (0.050, 0.070, 0.060):  # three more timings of t(4): counted, spread measured
        model.record(4, seconds)
    assert model.stats[4].n == 4 and 0.05 < model.stats[4].spread < 0.3 and model.table[4] > 60.0
    model.save()
    again: dict = {}
    assert load_costs(smol, again)[4] == pytest.approx(model.table[4], abs=1e-3) and again[4].n == 4


def test_every_planned_round_logs_its_predicted_and_measured_time(smol, tmp_path, monkeypatch):
    """Once t(k) is known, each round records its rows, the planner's predicted time and expected
    tokens, and what it took and emitted; the log accounts for every round, row and token, and the
    bench's cost-model summary reads it."""
    from dovetail_gguf.bench import RunRecord, cost_model_gap

    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    prompt = smol.tokenize(COPY_PROMPT)
    engine = Engine(smol, None, adaptive=True, ngram=True)
    run(engine, prompt, 16)  # times t(k) in its first rounds
    s = run(engine, prompt, 40).stats
    log = s.round_log
    assert len(log) == s.rounds
    assert sum(r.rows for r in log) == s.verified_rows
    assert sum(r.emitted for r in log) == s.accepted_tokens
    assert any(r.rows > 1 for r in log)  # the copied words come in chains
    for r in log:  # (a size's first prediction may be a guess: its first timing replaces it)
        assert r.predicted_ms > 0 and r.measured_ms > 0
        assert 1.0 <= r.expected_tokens <= r.rows and 1 <= r.emitted <= r.rows
    rec = RunRecord("dovetail", 0, s.n_tokens, s.decode_seconds, round_log=[list(vars(r).values()) for r in log])
    gap = cost_model_gap([rec])
    assert gap["all"]["rounds"] == len(log)
    assert gap["plain"]["rounds"] + gap["free"]["rounds"] == len(log)
    assert gap["free"]["emitted_over_expected"] == pytest.approx(
        sum(r.emitted for r in log if r.rows > 1) / sum(r.expected_tokens for r in log if r.rows > 1))
    # the plain engine plans nothing and logs nothing
    assert run(Engine(smol), prompt, 8).stats.round_log == []
