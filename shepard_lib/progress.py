"""Showing a rollout as it happens: a live display on a terminal, log lines elsewhere.

The library stays UI-free: a rollout reports :class:`~shepard_lib.coordinator.RolloutEvent` objects
to an observer; the classes here are observers. :func:`progress_for` picks one for a stream:
:class:`LiveProgress` (``rich``: one bar per task scope, plus the allocations in flight) when the
stream is a terminal, :class:`PlainProgress` (one log record per event, so ``--log-format json``
gives JSON lines and every line carries the wall-clock time) otherwise. While the live display
runs, Shepard's log lines are printed through its console, above the display, so no stale frame
is left behind.

Both are context managers and thread-safe (a rollout reports from its worker threads).
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import TextIO, cast

from rich.console import Console, Group
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from shepard_lib.coordinator import EventKind, RolloutEvent
from shepard_lib.keyspace import TaskScope
from shepard_lib.logsetup import ShepardHandler

__all__ = ["LiveProgress", "PlainProgress", "ProgressDisplay", "progress_for"]

_FINAL = (EventKind.RESTARTED, EventKind.FAILED, EventKind.SKIPPED)

log = logging.getLogger(__name__)


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
    """One log record per event (logger ``shepard_lib.progress``), for logs and pipes:
    ``job/group/task node[i] alloc 1b2c3d4e restarting``; a failure or a skip is a warning."""

    def __call__(self, event: RolloutEvent) -> None:
        """Log the event."""
        where = _label(event.scope)
        if event.kind == EventKind.PLANNED:
            log.info("%s: %d allocation(s) registered, plan %s", where, event.count, event.detail)
            return
        who = f"{event.ref.node}[{event.ref.alloc_index}] " if event.ref else ""
        detail = f": {event.detail}" if event.detail else ""
        level = logging.WARNING if event.kind in (EventKind.FAILED, EventKind.SKIPPED) else logging.INFO
        log.log(level, "%s %salloc %s %s%s", where, who, event.alloc_id[:8], event.kind.value, detail)


class LiveProgress(ProgressDisplay):
    """A ``rich`` live display: a bar per task scope and a table of the allocations in flight."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._console = Console(file=stream)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(complete_style="green", finished_style="green"),  # red only says "failed"
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed_text]}"),
            TimeElapsedColumn(),
            console=self._console,
        )
        self._log_streams: dict[ShepardHandler, TextIO] = {}
        self._bars: dict[TaskScope, TaskID] = {}
        self._inflight: dict[str, tuple[RolloutEvent, float]] = {}  # with when it arrived
        self._lock = threading.Lock()
        self._live = Live(self._render(), console=self._console, refresh_per_second=8, transient=False)

    def __enter__(self) -> LiveProgress:
        self._live.start()
        proxy = cast(TextIO, FileProxy(self._console, self._stream))
        for handler in logging.getLogger().handlers:  # log lines go above the display, not into it
            if isinstance(handler, ShepardHandler) and handler.stream is self._stream:
                self._log_streams[handler] = handler.setStream(proxy) or self._stream
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._live.update(self._render())
        for handler, stream in self._log_streams.items():
            handler.setStream(stream)
        self._log_streams.clear()
        self._live.stop()

    def __call__(self, event: RolloutEvent) -> None:
        """Update the bars and the in-flight table."""
        with self._lock:
            bar = self._bars.get(event.scope)
            if bar is None:
                bar = self._progress.add_task(
                    _label(event.scope), total=None, failed=0, failed_text="0 failed"
                )
                self._bars[event.scope] = bar
            if event.kind == EventKind.PLANNED:
                task = self._progress.tasks[bar]
                self._progress.update(bar, total=(task.total or 0) + event.count)
            elif event.kind == EventKind.RESTARTING:
                self._inflight[event.alloc_id] = (event, time.monotonic())
            elif event.kind in _FINAL:
                self._inflight.pop(event.alloc_id, None)
                failed = self._progress.tasks[bar].fields.get("failed", 0) + (
                    event.kind != EventKind.RESTARTED
                )
                text = f"[red]{failed} failed[/red]" if failed else "0 failed"
                self._progress.update(bar, advance=1, failed=failed, failed_text=text)
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
    """A live display on ``stream`` when it is a terminal (or ``live`` is True), log records otherwise."""
    if live is None:
        live = stream.isatty()
    return LiveProgress(stream) if live else PlainProgress()
