"""The record of every simulated task restart, and the measures tests assert on.

A restart's active interval runs from ``stopped_at`` (the task was killed) to ``ended_at``: the
moment its check passed, it failed for good, it was superseded by another restart of the same task,
or its allocation was stopped. An unhealthy restart never ends on its own, so it stays active:
exactly the restarts a coordinator must count against its concurrency limit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["RestartLog", "RestartRecord", "makespan", "peak_concurrency"]


@dataclass
class RestartRecord:
    """One restart of one task of one allocation; times are cluster Unix seconds or None."""

    alloc_id: str
    alloc_index: int
    node: str
    job: str
    group: str
    task: str
    cause: str  # "template" | "api"
    requested_at: float
    stopped_at: float | None = None
    running_at: float | None = None
    healthy_at: float | None = None
    failed_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None  # "healthy" | "failed" | "superseded" | "stopped"
    down_for: float | None = None
    """The downtime drawn from the scenario's ``timing.restart`` (cluster seconds): ``running_at -
    stopped_at`` is at least this, plus however late a loaded machine ran the timer."""

    def to_json(self) -> dict[str, Any]:
        """The record as the ``/_sim/restarts`` endpoint shows it."""
        return asdict(self)

    def interval(self, now: float) -> tuple[float, float] | None:
        """``[stopped_at, ended_at or now]``, or None when the task was never stopped."""
        if self.stopped_at is None:
            return None
        return (self.stopped_at, self.ended_at if self.ended_at is not None else now)


class RestartLog:
    """Thread-safe, append-only list of :class:`RestartRecord`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RestartRecord] = []

    def add(self, record: RestartRecord) -> RestartRecord:
        """Append ``record`` and return it (the caller updates its fields as the restart proceeds)."""
        with self._lock:
            self._records.append(record)
        return record

    def snapshot(self) -> list[RestartRecord]:
        """Copies of every record, oldest first."""
        with self._lock:
            return [RestartRecord(**asdict(r)) for r in self._records]


def _matching(
    records: Iterable[RestartRecord], job: str | None, group: str | None, task: str | None
) -> list[RestartRecord]:
    return [
        r
        for r in records
        if (job is None or r.job == job)
        and (group is None or r.group == group)
        and (task is None or r.task == task)
    ]


def peak_concurrency(
    records: Iterable[RestartRecord],
    now: float,
    job: str | None = None,
    group: str | None = None,
    task: str | None = None,
) -> int:
    """The most restarts (of the given job/group/task) active at one instant.

    Intervals are closed at the start and open at the end, so a restart that ends exactly when
    another starts does not overlap it.
    """
    edges: list[tuple[float, int]] = []
    for r in _matching(records, job, group, task):
        span = r.interval(now)
        if span is not None:
            edges += [(span[0], 1), (span[1], -1)]
    peak = current = 0
    for _, delta in sorted(edges):  # at equal times -1 sorts before +1
        current += delta
        peak = max(peak, current)
    return peak


def makespan(
    records: Iterable[RestartRecord],
    now: float,
    job: str | None = None,
    group: str | None = None,
    task: str | None = None,
) -> float:
    """Cluster seconds from the first stop to the last end of the matching restarts (0 when none)."""
    spans = [s for r in _matching(records, job, group, task) if (s := r.interval(now)) is not None]
    if not spans:
        return 0.0
    return max(e for _, e in spans) - min(s for s, _ in spans)
