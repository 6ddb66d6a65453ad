"""The simulated Nomad cluster state: nodes, jobs, allocations and their task states.

One lock guards everything; every change bumps a raft-like ``index``, stamps the changed object's
``ModifyIndex`` and the index of its table (``nodes``, ``jobs``, ``allocs``), and wakes blocking
queries waiting on :attr:`NomadState.changed`. Objects here are plain mutable records; their wire
JSON lives in :mod:`shepard_lib.sim.nomad.wire`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from shepard_lib.clock import Clock
from shepard_lib.sim.scenario import GroupSpec, JobSpec, NodeSpec, TaskSpec, TemplateSpec

__all__ = ["MAX_TASK_EVENTS", "NomadState", "SimAlloc", "SimJob", "SimNode", "SimTaskState", "TaskEvent"]

MAX_TASK_EVENTS = 10
"""Nomad keeps the latest 10 events per task."""


@dataclass
class TaskEvent:
    """A task event; ``fields`` holds the typed extras (``ExitCode``, ``TaskSignal``, ...)."""

    type: str
    time: float
    display_message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimTaskState:
    """``TaskStates[<task>]``: times are cluster Unix seconds."""

    state: str = "pending"
    failed: bool = False
    restarts: int = 0
    last_restart: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    events: list[TaskEvent] = field(default_factory=list)

    def add_event(self, type_: str, at: float, message: str, **fields: Any) -> None:
        """Append an event, keeping only the newest :data:`MAX_TASK_EVENTS`."""
        self.events.append(TaskEvent(type_, at, message, fields))
        del self.events[:-MAX_TASK_EVENTS]


@dataclass
class SimNode:
    """A client node."""

    id: str
    spec: NodeSpec
    http_addr: str
    create_index: int
    modify_index: int
    status_updated_at: float
    status: str = "ready"
    eligibility: str = "eligible"
    drain_deadline: float | None = None  # DrainStrategy.Deadline (cluster seconds) while draining
    last_drain: float | None = None  # when the last drain completed (cluster Unix time)

    @property
    def name(self) -> str:
        """The node name (``node.unique.name``)."""
        return self.spec.name


@dataclass
class SimJob:
    """A registered job; ``templates`` maps ``(group, task)`` to the task's effective templates."""

    spec: JobSpec
    templates: dict[tuple[str, str], tuple[TemplateSpec, ...]]
    create_index: int
    modify_index: int
    submit_time: float
    status: str = "running"
    stop: bool = False
    version: int = 0
    dispatch_token: str = ""  # the idempotency token it was dispatched with

    @property
    def id(self) -> str:
        """Job ID (the spec's ``id``, else its name)."""
        return self.spec.job_id

    @property
    def namespace(self) -> str:
        """The job's namespace."""
        return self.spec.namespace

    def group(self, name: str) -> GroupSpec:
        """The task group called ``name``."""
        return next(g for g in self.spec.groups if g.name == name)


@dataclass
class SimAlloc:
    """An allocation of one task group of a job on one node."""

    id: str
    eval_id: str
    job: SimJob
    group: str
    index: int
    node: SimNode
    create_index: int
    modify_index: int
    create_time: float
    modify_time: float
    task_states: dict[str, SimTaskState]
    port: int = 0
    desired_status: str = "run"
    desired_description: str = ""
    client_status: str = "pending"
    client_description: str = "No tasks have started"
    lost: bool = False
    previous_allocation: str = ""
    next_allocation: str = ""
    job_version: int = 0
    migrate: bool = False  # DesiredTransition.Migrate: stopped to be placed elsewhere

    @property
    def name(self) -> str:
        """``job.group[index]``, the allocation name Nomad derives ``NOMAD_ALLOC_INDEX`` from."""
        return f"{self.job.id}.{self.group}[{self.index}]"

    def task_spec(self, task: str) -> TaskSpec:
        """The scenario spec of ``task``."""
        return next(t for t in self.job.group(self.group).tasks if t.name == task)


def _client_status(alloc: SimAlloc) -> tuple[str, str]:
    """Nomad's allocrunner ``getClientStatus``: failed > running > pending > complete."""
    if alloc.lost:
        return "lost", "alloc is lost since its node is down"
    states = alloc.task_states.values()
    if any(s.state == "dead" and s.failed for s in states):
        return "failed", "Failed tasks"
    if any(s.state == "running" for s in states):
        return "running", "Tasks are running"
    if any(s.state == "pending" for s in states):
        return "pending", "No tasks have started"
    return "complete", "All tasks have completed"


class NomadState:
    """Thread-safe state of the simulated Nomad servers."""

    def __init__(self, clock: Clock, region: str = "global") -> None:
        self.clock = clock
        self.region = region
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.index = 1
        self.table_index = {"nodes": 1, "jobs": 1, "allocs": 1}
        self.nodes: dict[str, SimNode] = {}
        self.jobs: dict[tuple[str, str], SimJob] = {}
        self.allocs: dict[str, SimAlloc] = {}
        self.closed = False

    # --- changes --------------------------------------------------------------------------------

    def _bump(self, table: str) -> int:
        self.index += 1
        self.table_index[table] = self.index
        self.changed.notify_all()
        return self.index

    @contextmanager
    def update_alloc(self, alloc: SimAlloc) -> Iterator[SimAlloc]:
        """Change ``alloc`` under the lock; on exit its status, ModifyIndex and ModifyTime are updated."""
        with self.lock:
            yield alloc
            alloc.client_status, alloc.client_description = _client_status(alloc)
            alloc.modify_index = self._bump("allocs")
            alloc.modify_time = self.clock.time()

    def add_node(self, spec: NodeSpec, http_addr: str) -> SimNode:
        """Register a ready client node."""
        with self.lock:
            index = self._bump("nodes")
            node = SimNode(str(uuid.uuid4()), spec, http_addr, index, index, self.clock.time())
            self.nodes[node.id] = node
            return node

    def update_node(self, node: SimNode) -> None:
        """Record a change made to ``node`` under the lock (eligibility, drain)."""
        with self.lock:
            node.modify_index = self._bump("nodes")

    def update_job(self, job: SimJob) -> None:
        """Record a new version of ``job`` (a destructive update)."""
        with self.lock:
            job.version += 1
            job.modify_index = self._bump("jobs")

    def new_eval_id(self) -> str:
        """A fresh evaluation ID (the simulator runs the evaluation at once)."""
        return str(uuid.uuid4())

    def set_node_status(self, node: SimNode, status: str) -> None:
        """Change a node's ``Status`` (``ready``/``down``) and ``StatusUpdatedAt``."""
        with self.lock:
            node.status = status
            node.status_updated_at = self.clock.time()
            node.modify_index = self._bump("nodes")

    def add_job(self, spec: JobSpec, templates: Callable[[TaskSpec], tuple[TemplateSpec, ...]]) -> SimJob:
        """Register a job; ``templates`` gives each task's effective template list."""
        with self.lock:
            index = self._bump("jobs")
            effective = {(g.name, t.name): templates(t) for g in spec.groups for t in g.tasks}
            job = SimJob(spec, effective, index, index, self.clock.time())
            self.jobs[(spec.namespace, spec.job_id)] = job
            return job

    def set_job_stopped(self, job: SimJob) -> None:
        """Mark a job stopped (``Stop: true``, ``Status: dead``)."""
        with self.lock:
            job.stop = True
            job.status = "dead"
            job.modify_index = self._bump("jobs")

    def remove_job(self, job: SimJob) -> None:
        """Deregister a job for good (a purge): it is no longer listed or readable."""
        with self.lock:
            self.jobs.pop((job.namespace, job.id), None)
            self._bump("jobs")

    def add_alloc(
        self, job: SimJob, group: GroupSpec, index: int, node: SimNode, port: int, previous: str = ""
    ) -> SimAlloc:
        """Place allocation ``index`` of ``group`` on ``node`` with dynamic port ``port`` (tasks pending).

        ``previous`` is the allocation this one replaces (its ``PreviousAllocation``).
        """
        with self.lock:
            now = self.clock.time()
            create = self._bump("allocs")
            alloc = SimAlloc(
                id=str(uuid.uuid4()),
                eval_id=str(uuid.uuid4()),
                job=job,
                group=group.name,
                index=index,
                node=node,
                create_index=create,
                modify_index=create,
                create_time=now,
                modify_time=now,
                task_states={t.name: SimTaskState() for t in group.tasks},
                port=port,
                previous_allocation=previous,
                job_version=job.version,
            )
            self.allocs[alloc.id] = alloc
            return alloc

    # --- queries (hold ``lock`` while using the results) ------------------------------------------

    def node_by_name(self, name: str) -> SimNode:
        """The node called ``name``; KeyError when there is none."""
        with self.lock:
            for node in self.nodes.values():
                if node.name == name:
                    return node
        raise KeyError(f"no simulated node named {name!r}")

    def children_of(self, job: SimJob) -> list[SimJob]:
        """The jobs dispatched from ``job`` (``ParentID``), oldest first."""
        with self.lock:
            return [
                j for j in self.jobs.values() if j.spec.parent_id == job.id and j.namespace == job.namespace
            ]

    def job(self, namespace: str, job_id: str) -> SimJob | None:
        """The job, or None."""
        with self.lock:
            return self.jobs.get((namespace, job_id))

    def allocs_of(self, job: SimJob | None = None, node: SimNode | None = None) -> list[SimAlloc]:
        """Allocations of a job and/or node, in creation order."""
        with self.lock:
            return [
                a
                for a in self.allocs.values()
                if (job is None or a.job is job) and (node is None or a.node is node)
            ]

    def wait_past(self, current: Callable[[], int], index: int, timeout_real: float) -> None:
        """Block until ``current()`` exceeds ``index``, the state closes, or ``timeout_real`` passes."""
        with self.changed:
            self.changed.wait_for(lambda: self.closed or current() > index, timeout_real)

    def close(self) -> None:
        """Wake every blocking query for shutdown."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
