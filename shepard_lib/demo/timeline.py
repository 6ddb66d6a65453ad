"""What a run did to the service, from the simulator's restart record.

An instance is *down* while one of its restarts is active (``RestartRecord.interval``: from the
moment Nomad killed the task until its check passed, or for good when it never became healthy).
Healthy instances at an instant are the instances minus those down. All times are cluster seconds,
counted from the moment the config changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from shepard_lib.sim.nomad import RestartRecord

__all__ = ["RunMeasures", "healthy_series", "measure"]


@dataclass(frozen=True)
class RunMeasures:
    """The figures of one run (times in cluster seconds from the change)."""

    peak_concurrent_restarts: int
    min_healthy: int
    seconds_below_floor: float
    makespan_s: float
    restarted: int
    failed: int


def _edges(records: Sequence[RestartRecord], start: float, end: float) -> list[tuple[float, int]]:
    edges: list[tuple[float, int]] = []
    for record in records:
        if record.stopped_at is None:
            continue
        edges.append((max(record.stopped_at, start) - start, 1))
        if record.ended_at is not None and record.ended_at <= end:  # else still down when the run ended
            edges.append((max(record.ended_at, start) - start, -1))
    return sorted(edges)  # at equal times -1 sorts before +1: back-to-back restarts do not overlap


def healthy_series(
    records: Sequence[RestartRecord], instances: int, start: float, end: float
) -> list[tuple[float, int]]:
    """Steps ``(t, healthy)`` from ``t = 0`` (the change) to ``end - start``: a point at every change."""
    points = [(0.0, instances)]
    down = 0
    for t, delta in _edges(records, start, end):
        down += delta
        if points[-1][0] == t:
            points[-1] = (t, instances - down)
        else:
            points.append((t, instances - down))
    points.append((end - start, points[-1][1]))
    return points


def measure(
    records: Sequence[RestartRecord], instances: int, floor: int, start: float, end: float
) -> RunMeasures:
    """The figures of a run whose change happened at ``start`` and which was watched until ``end``.

    ``floor`` is the healthy count the operator wants to keep (``instances - concurrency``);
    ``seconds_below_floor`` is how long fewer instances than that were healthy.
    """
    series = healthy_series(records, instances, start, end)
    below = sum(t1 - t0 for (t0, healthy), (t1, _) in itertools.pairwise(series) if healthy < floor)
    stops = [r for r in records if r.stopped_at is not None]
    ends = [span[1] for r in stops if (span := r.interval(end)) is not None]
    return RunMeasures(
        peak_concurrent_restarts=instances - min(h for _, h in series),
        min_healthy=min(h for _, h in series),
        seconds_below_floor=below,
        makespan_s=(max(ends) - start) if ends else 0.0,
        restarted=sum(1 for r in stops if r.healthy_at is not None),
        failed=sum(1 for r in stops if r.healthy_at is None),
    )
