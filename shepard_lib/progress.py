"""Showing a rollout as it happens: a live display on a terminal, plain lines elsewhere.

The library stays UI-free: a rollout reports :class:`~shepard_lib.coordinator.RolloutEvent` objects
to an observer; the classes here are observers. :func:`progress_for` picks one for a stream:
:class:`LiveProgress` (``rich``: one bar per task scope, plus the allocations in flight) when the
stream is a terminal, :class:`PlainProgress` (one line per event, like a log) otherwise.

Both are context managers and thread-safe (a rollout reports from its worker threads).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from shepard_lib.coordinator import EventKind, RolloutEvent
from shepard_lib.keyspace import TaskScope

__all__ = ["LiveProgress", "PlainProgress", "ProgressDisplay", "progress_for"]

_FINAL = (EventKind.RESTARTED, EventKind.FAILED, EventKind.SKIPPED)


def _label(scope: TaskScope) -> str:
    base = f"{scope.job}/{scope.group}/{scope.task}"
    return f"{base}@{scope.node}" if scope.node else base


class ProgressDisplay:
    """Base of the displays: an observer and a context manager (start/stop)."""

    def __call__(self, event: RolloutEvent) -> None:
        """Show one event."""
        raise NotImplementedError

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class PlainProgress(ProgressDisplay):
    """One line per event, for logs and pipes: ``HH:MM:SS job/group/task node[i] alloc restarting``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: RolloutEvent) -> None:
        """Write the event as one line."""
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        where = _label(event.scope)
        if event.kind == EventKind.PLANNED:
            line = f"{stamp} {where}: {event.count} allocation(s) registered, plan {event.detail}"
        else:
            who = f"{event.ref.node}[{event.ref.alloc_index}] " if event.ref else ""
            detail = f": {event.detail}" if event.detail else ""
            line = f"{stamp} {where} {who}alloc {event.alloc_id[:8]} {event.kind.value}{detail}"
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class LiveProgress(ProgressDisplay):
    """A ``rich`` live display: a bar per task scope and a table of the allocations in flight."""

    def __init__(self, stream: TextIO) -> None:
        self._console = Console(file=stream)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=self._console,
        )
        self._bars: dict[TaskScope, TaskID] = {}
        self._inflight: dict[str, tuple[RolloutEvent, float]] = {}  # with when it arrived
        self._lock = threading.Lock()
        self._live = Live(self._render(), console=self._console, refresh_per_second=8, transient=False)

    def __enter__(self) -> LiveProgress:
        self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._live.update(self._render())
        self._live.stop()

    def __call__(self, event: RolloutEvent) -> None:
        """Update the bars and the in-flight table."""
        with self._lock:
            bar = self._bars.get(event.scope)
            if bar is None:
                bar = self._progress.add_task(_label(event.scope), total=None, failed=0)
                self._bars[event.scope] = bar
            if event.kind == EventKind.PLANNED:
                task = self._progress.tasks[bar]
                self._progress.update(bar, total=(task.total or 0) + event.count)
            elif event.kind == EventKind.RESTARTING:
                self._inflight[event.alloc_id] = (event, time.monotonic())
            elif event.kind in _FINAL:
                self._inflight.pop(event.alloc_id, None)
                failed = self._progress.tasks[bar].fields.get("failed", 0)
                self._progress.update(bar, advance=1, failed=failed + (event.kind != EventKind.RESTARTED))
            self._live.update(self._render())

    def _render(self) -> Group:
        table = Table(title="in flight", show_edge=False, expand=False)
        for column in ("task", "node", "index", "allocation", "since"):
            table.add_column(column)
        now = time.monotonic()
        for event, since in sorted(self._inflight.values(), key=lambda item: item[1]):
            ref = event.ref
            table.add_row(
                _label(event.scope),
                ref.node if ref else "",
                str(ref.alloc_index) if ref else "",
                event.alloc_id[:8],
                f"{now - since:.0f}s",
            )
        return Group(self._progress, table)


def progress_for(stream: TextIO, *, live: bool | None = None) -> ProgressDisplay:
    """A live display when ``stream`` is a terminal (or ``live`` is True), plain lines otherwise."""
    if live is None:
        live = stream.isatty()
    return LiveProgress(stream) if live else PlainProgress(stream)
