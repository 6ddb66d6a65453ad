"""The schedule measures the benchmarks compare Shepard with (``benchmarks/_common.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common as common


def test_ideal_is_list_scheduling_and_batches_wait_for_their_slowest() -> None:
    times = [4.0, 1.0, 1.0, 1.0, 1.0]
    assert common.ideal_makespan(times, 2) == 4.0
    assert common.batch_makespan(times, 2) == 4.0 + 1.0 + 1.0
    assert common.ideal_makespan(times, 1) == 8.0 == common.batch_makespan(times, 1)


def test_percentile_is_nearest_rank() -> None:
    assert common.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert common.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert common.percentile([], 99) == 0.0
