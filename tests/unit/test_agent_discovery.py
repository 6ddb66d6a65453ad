"""Which allocations the agent manages: only running ones, even when a directory is there before."""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Mapping
from pathlib import Path

import pytest

from shepard_lib.agent.discovery import Discovery, ManagedAlloc, managed_tasks
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.errors import Cancelled
from shepard_lib.model import Allocation, TaskState

CLOCK = Clock(20.0)
ANSWER = 30.0  # real seconds a test waits for the discovery thread


def allocation(client_status: str, desired_status: str = "run") -> Allocation:
    return Allocation(
        id="a1",
        name="web.app[0]",
        namespace="default",
        node_id="node-1",
        node_name="n1",
        job_id="web",
        task_group="app",
        client_status=client_status,
        desired_status=desired_status,
        index=0,
        task_states={"server": TaskState(state="pending"), "sidecar": TaskState(state="pending")},
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A client data dir where the allocation's directories, and server's ``shepard.tpl``, exist."""
    (tmp_path / "alloc" / "a1" / "server" / "local").mkdir(parents=True)
    (tmp_path / "alloc" / "a1" / "server" / "local" / "shepard.tpl").write_text("t1")
    (tmp_path / "alloc" / "a1" / "sidecar" / "local").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(
    ("client_status", "desired_status", "tasks"),
    [
        ("pending", "run", ()),
        ("running", "run", ("server",)),
        ("running", "stop", ()),
        ("complete", "run", ()),
    ],
)
def test_only_a_running_allocation_has_managed_tasks(
    data_dir: Path, client_status: str, desired_status: str, tasks: tuple[str, ...]
) -> None:
    assert managed_tasks(allocation(client_status, desired_status), data_dir) == tasks


class ScriptedNomad:
    """``watch_node_allocations`` answers, in order, what the test puts in ``answers``."""

    def __init__(self) -> None:
        self.answers: queue.Queue[list[Allocation]] = queue.Queue()
        self.index = 0

    def watch_node_allocations(
        self, node_id: str, index: int, wait: float, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[Allocation]]:
        while cancel is None or not cancel.is_set():
            try:
                allocs = self.answers.get(timeout=0.05)
            except queue.Empty:
                continue
            self.index += 1
            return self.index, allocs
        raise Cancelled("stopped")


def test_a_pending_allocation_is_taken_once_nomad_reports_it_running(data_dir: Path) -> None:
    nomad = ScriptedNomad()
    updates: queue.Queue[dict[str, ManagedAlloc]] = queue.Queue()

    def on_update(managed: Mapping[str, ManagedAlloc]) -> None:
        updates.put(dict(managed))

    stop = CancelEvent()
    discovery = Discovery(nomad, "node-1", data_dir, on_update, clock=CLOCK, stop=stop)
    pending = allocation("pending")
    nomad.answers.put([pending])
    discovery.start()
    try:
        assert updates.empty(), "a pending allocation is not managed, though its shepard.tpl exists"
        nomad.answers.put([dataclasses.replace(pending, modify_index=2)])
        running = dataclasses.replace(pending, client_status="running", modify_index=3)
        nomad.answers.put([running])
        assert updates.get(timeout=ANSWER) == {"a1": ManagedAlloc(running, ("server",))}
        # Pending again (a task restarts): still followed, not dropped and taken again.
        again = dataclasses.replace(pending, modify_index=4)
        nomad.answers.put([again])
        assert updates.get(timeout=ANSWER) == {"a1": ManagedAlloc(again, ("server",))}
        nomad.answers.put([])  # stopped and gone from the node
        assert updates.get(timeout=ANSWER) == {}
    finally:
        stop.set()
        discovery.thread.join(ANSWER)
