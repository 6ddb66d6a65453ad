"""The rollout displays (shepard_lib.progress) fed with rollout events; no cluster needed."""

from __future__ import annotations

import io

from shepard_lib.coordinator import EventKind, RolloutEvent
from shepard_lib.keyspace import TaskRef, TaskScope
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


def test_plain_progress_writes_one_line_per_event_naming_task_and_allocation() -> None:
    stream = io.StringIO()
    with PlainProgress(stream) as display:
        for event in events():
            display(event)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 7
    assert lines[0].endswith("web/app/server: 3 allocation(s) registered, plan planned")
    assert lines[1].endswith("web/app/server node-0[0] alloc 0aaaaaaa restarting")
    assert lines[-1].endswith("web/app/server node-2[2] alloc 2aaaaaaa failed: check critical")


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
