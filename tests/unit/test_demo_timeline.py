"""The demo's measures from a restart record (shepard_lib.demo.timeline), on hand-made records."""

from __future__ import annotations

import pytest

from shepard_lib.demo.timeline import healthy_series, measure
from shepard_lib.sim import RestartRecord


def record(alloc: int, stopped: float | None, healthy: float | None) -> RestartRecord:
    return RestartRecord(
        alloc_id=f"a{alloc}",
        alloc_index=alloc,
        node="n1",
        job="web",
        group="app",
        task="server",
        cause="template",
        requested_at=100.0,
        stopped_at=stopped,
        running_at=None if stopped is None else stopped + 1,
        healthy_at=healthy,
        ended_at=healthy,
        outcome="healthy" if healthy is not None else None,
    )


def test_one_at_a_time_never_goes_below_n_minus_one() -> None:
    records = [record(0, 101, 104), record(1, 104, 107), record(2, 107, 110)]
    m = measure(records, instances=3, floor=2, start=100, end=112)
    assert (m.peak_concurrent_restarts, m.min_healthy, m.seconds_below_floor) == (1, 2, 0)
    assert m.makespan_s == pytest.approx(10)
    assert (m.restarted, m.failed) == (3, 0)


def test_a_herd_counts_the_time_below_the_floor() -> None:
    records = [record(0, 101, 105), record(1, 101, 106), record(2, 102, 104)]
    m = measure(records, instances=3, floor=2, start=100, end=110)
    assert m.peak_concurrent_restarts == 3 and m.min_healthy == 0
    # below 2 healthy while at least 2 are down: from 101 (two down) to 105 (one left)
    assert m.seconds_below_floor == pytest.approx(4)


def test_a_restart_that_never_becomes_healthy_stays_down_until_the_end() -> None:
    records = [record(0, 101, None), record(1, None, None)]
    m = measure(records, instances=2, floor=1, start=100, end=130)
    assert m.min_healthy == 1 and m.failed == 1 and m.restarted == 0
    assert m.makespan_s == pytest.approx(30)
    assert healthy_series(records, 2, 100, 130) == [(0.0, 2), (1.0, 1), (30.0, 1)]


def test_back_to_back_restarts_do_not_overlap() -> None:
    series = healthy_series([record(0, 101, 103), record(1, 103, 105)], 2, 100, 106)
    assert min(h for _, h in series) == 1
