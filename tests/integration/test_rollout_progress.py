"""The rollout displays (shepard_lib.progress) fed with rollout events; no cluster needed."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from shepard_lib.coordinator import EventKind, RolloutEvent
from shepard_lib.keyspace import TaskRef, TaskScope
from shepard_lib.logsetup import ShepardHandler, setup_logging
from shepard_lib.progress import LiveProgress, PlainProgress, progress_for

SCOPE = TaskScope("web", "app", "server")


def events() -> list[RolloutEvent]:
    refs = [TaskRef(f"node-{i}", "web", "app", "server", i) for i in range(3)]
    out = [RolloutEvent(EventKind.PLANNED, SCOPE, "", 0.0, detail="planned", count=3)]
    for i, ref in enumerate(refs):
        alloc = f"{i}aaaaaaa-0000-0000-0000-000000000000"
        out.append(RolloutEvent(EventKind.RESTARTING, SCOPE, alloc, 1.0 + i, ref=ref))
        kind = EventKind.FAILED if i == 2 else EventKind.RESTARTED
        out.append(
            RolloutEvent(kind, SCOPE, alloc, 2.0 + i, ref=ref, detail="check critical" if i == 2 else "")
        )
    return out


def test_plain_progress_logs_one_record_per_event_naming_task_and_allocation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="shepard_lib.progress"), PlainProgress() as display:
        for event in events():
            display(event)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7
    assert lines[0] == "web/app/server: 3 allocation(s) registered, plan planned"
    assert lines[1] == "web/app/server node-0[0] alloc 0aaaaaaa restarting"
    assert lines[-1] == "web/app/server node-2[2] alloc 2aaaaaaa failed: check critical"
    assert caplog.records[-1].levelno == logging.WARNING


def test_live_progress_counts_finished_and_failed_allocations() -> None:
    stream = io.StringIO()
    display = LiveProgress(stream)
    with display:
        for event in events():
            display(event)
    task = display._progress.tasks[0]
    assert (task.completed, task.total, task.fields["failed"]) == (3, 3, 1)
    assert "web/app/server" in stream.getvalue()


def test_progress_for_picks_plain_lines_when_not_a_terminal() -> None:
    assert isinstance(progress_for(io.StringIO()), PlainProgress)
    assert isinstance(progress_for(io.StringIO(), live=True), LiveProgress)


@pytest.fixture
def shepard_logging(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    setup_logging("INFO", "text", stream=stream)
    return stream


def test_log_lines_go_through_the_live_display_while_it_runs(shepard_logging: io.StringIO) -> None:
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, ShepardHandler)]
    with LiveProgress(shepard_logging) as display:
        assert handler.stream is not shepard_logging, "logging still writes past the live display"
        display(events()[0])
        logging.getLogger("shepard_lib.rollout").warning("a line logged mid-display")
    assert handler.stream is shepard_logging, "the log stream is restored after the display"
    assert "a line logged mid-display" in shepard_logging.getvalue()


def _colours(display: LiveProgress) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=120)
    console.print(display._progress)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_the_bar_is_red_only_when_something_failed() -> None:
    display = LiveProgress(io.StringIO())
    with display:
        for event in events()[:5]:  # two restarted, none failed
            display(event)
        clean = _colours(display)
        for event in events()[5:]:
            display(event)
        failed = _colours(display)
    red = ("38;2;249;38;114", "\x1b[31m")  # rich's default bar colour, and red
    assert not any(code in clean for code in red), "red with 0 failed"
    assert "\x1b[31m" in failed and "1 failed" in failed
