"""The cost model t(k) on a machine whose speed drifts: pure, no model (timings are fed in)."""

from __future__ import annotations

import pytest

from dovetail_gguf.costs import STALE_AFTER_DECODES, CostModel

SHAPE = {1: 10.0, 2: 16.0, 4: 25.0, 8: 40.0}  # t(k) in ms on a quiet machine


def model(table=SHAPE) -> CostModel:
    m = CostModel(None, 64)
    m.adopt(dict(table))
    return m


def feed(m: CostModel, rows: int, ms: float, times: int = 1) -> None:
    for _ in range(times):
        m.record(rows, ms / 1000)


def test_a_slow_spell_scales_every_size_and_a_quiet_one_brings_them_back():
    m = model()
    feed(m, 1, 20.0, 20)  # the machine runs at half speed: one-row decodes take twice as long
    assert m.verify_ms(1) == pytest.approx(20.0, rel=0.05)
    assert m.verify_ms(2) == pytest.approx(32.0, rel=0.1) and m.verify_ms(8) == pytest.approx(80.0, rel=0.1)
    feed(m, 1, 10.0, 20)
    assert m.verify_ms(8) == pytest.approx(40.0, rel=0.1)


def test_a_size_timed_in_a_slow_spell_is_not_overpriced_after_it():
    """The ratio t(k) / t(1) is what a plan depends on: a size timed only while the machine was
    slow keeps its true ratio once the machine is quick again."""
    m = model()
    feed(m, 1, 20.0, 10)
    feed(m, 2, 32.0, 10)  # the same 1.6 ratio, at half speed
    feed(m, 1, 10.0, 30)
    assert m.verify_ms(2) == pytest.approx(16.0, rel=0.1)
    assert m.verify_ms(2) / m.verify_ms(1) == pytest.approx(1.6, rel=0.1)


def test_one_outlier_moves_the_ratios_little():
    m = model()
    feed(m, 2, 130.0)  # a page fault, a neighbour's burst: eight times the usual
    assert m.verify_ms(2) / m.verify_ms(1) < 1.6 * 1.08
    feed(m, 1, 10.0, 10)
    assert m.verify_ms(2) == pytest.approx(16.0, rel=0.1)


def test_a_size_not_timed_for_a_while_is_priced_lower_until_it_is_timed_again():
    """A cached t(2) timed under load (2.8 x t(1)) would keep every two-row round out, and so never
    be timed again: once no decode has timed it for STALE_AFTER_DECODES decodes, it is priced a
    quarter lower, no further (a trial is then never far dearer than expected), and the next
    timing replaces it."""
    m = model({1: 10.0, 2: 28.0, 4: 25.0})
    assert m.verify_ms(2) == pytest.approx(28.0)
    feed(m, 1, 10.0, STALE_AFTER_DECODES)
    assert m.verify_ms(2) == pytest.approx(28.0 * 0.75)
    feed(m, 1, 10.0, 3 * STALE_AFTER_DECODES)
    assert m.verify_ms(2) == pytest.approx(28.0 * 0.75)
    feed(m, 2, 16.0)
    assert m.verify_ms(2) == pytest.approx(16.0, rel=0.05)


def test_ratios_beyond_what_a_machine_shows_are_capped():
    m = model({1: 10.0, 2: 64.0, 4: 8.0})  # timed under load, or in a quick spell
    assert m.verify_ms(2) == pytest.approx(30.0) and m.verify_ms(4) == pytest.approx(10.0)


def test_the_saved_table_is_at_the_current_speed():
    m = model()
    feed(m, 1, 12.0, 30)
    assert m.table[1] == pytest.approx(12.0, rel=0.02) and m.table[4] == pytest.approx(30.0, rel=0.05)
