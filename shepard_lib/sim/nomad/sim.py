"""The simulated Nomad cluster: servers' state plus one client agent per node.

:class:`NomadSim` is what the HTTP layer serves and what tests and :class:`~shepard_lib.sim.SimCluster`
drive directly: it places allocations, runs the clients, injects faults into them (node down, job
stop, killed allocation) and keeps the restart record.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from shepard_lib.clock import Clock
from shepard_lib.errors import HealthTimeout
from shepard_lib.model import CheckStatus
from shepard_lib.sim.consul.state import ConsulState
from shepard_lib.sim.nomad.client import (
    ClientError,
    KVWatcher,
    Phase,
    SignalRecord,
    SimClient,
    task_templates,
)
from shepard_lib.sim.nomad.restarts import RestartLog, RestartRecord, makespan, peak_concurrency
from shepard_lib.sim.nomad.scheduler import Scheduler
from shepard_lib.sim.nomad.state import NomadState, SimAlloc, SimJob, SimNode
from shepard_lib.sim.scenario import JobSpec, Scenario

__all__ = ["NomadSim"]

_FIRST_PORT = 20000


class NomadSim:
    """Simulated Nomad servers and clients for one scenario.

    ``data_dir`` holds one Nomad data dir per node (``<data_dir>/<node name>/``).
    """

    def __init__(self, scenario: Scenario, consul: ConsulState, clock: Clock, data_dir: Path) -> None:
        self.scenario = scenario
        self.consul = consul
        self.clock = clock
        self.data_dir = data_dir
        self.state = NomadState(clock, scenario.region)
        self.scheduler = Scheduler(clock)
        self.restart_log = RestartLog()
        self.clients: dict[str, SimClient] = {}
        self.watcher = KVWatcher(consul, lambda: list(self.clients.values()))
        self.requests: collections.Counter[str] = collections.Counter()
        self._requests_lock = threading.Lock()
        self._next_port = _FIRST_PORT

    # --- setup -----------------------------------------------------------------------------------

    def start(self, http_addr: str = "127.0.0.1:4646") -> None:
        """Register the scenario's nodes (in Nomad and Consul), then place and start its jobs."""
        self.scheduler.start()
        self.watcher.start()
        for spec in self.scenario.nodes:
            node = self.state.add_node(spec, http_addr)
            self.consul.register_node(spec.name)
            client = SimClient(
                node,
                self.state,
                self.consul,
                self.scenario,
                self.node_data_dir(spec.name),
                self.scheduler,
                self.restart_log,
            )
            self.clients[node.id] = client
            client.data_dir.mkdir(parents=True, exist_ok=True)
        for job in self.scenario.jobs:
            self.register_job(job)

    def stop(self) -> None:
        """Stop the clients and the scheduler and wake every blocking query."""
        self.watcher.stop()
        self.scheduler.stop()
        self.state.close()

    def node_data_dir(self, node_name: str) -> Path:
        """The Nomad data dir of the node called ``node_name`` (its allocations are in ``alloc/``)."""
        return self.data_dir / node_name

    def register_job(self, spec: JobSpec) -> SimJob:
        """Register a job and place its allocations round-robin over the ready nodes.

        A parameterized job places nothing: only the children :meth:`dispatch` registers run.
        """
        job = self.state.add_job(spec, lambda t: task_templates(t, self.scenario.key_prefix))
        if spec.parameterized is not None:
            return job
        nodes = [n for n in self.state.nodes.values() if n.status == "ready"]
        if not nodes:
            raise ValueError("no ready node to place allocations on")
        slot = 0
        placed: list[SimAlloc] = []
        for group in spec.groups:
            for index in range(group.count):
                node = nodes[slot % len(nodes)]
                slot += 1
                placed.append(self.state.add_alloc(job, group, index, node, self._port()))
        for alloc in placed:
            self.clients[alloc.node.id].run_alloc(alloc)
        return job

    def dispatch(
        self, job_id: str, namespace: str = "default", meta: Mapping[str, str] | None = None, token: str = ""
    ) -> tuple[SimJob, str]:
        """``Job.Dispatch``: register and place a child of the parameterized job ``job_id``.

        The child's ID is ``<job_id>/dispatch-<unix>-<first 8 of a UUID>`` (``structs.DispatchedID``),
        its name equals its ID, its ``ParentID`` is ``job_id`` and its meta is the parent's merged with
        ``meta``. With an idempotency ``token`` already used by a child that still exists, that child
        is returned and nothing is dispatched. Returns the child and the evaluation ID ("" for such a
        repeat). Raises :class:`DispatchError` with Nomad's message when the request is refused.
        """
        meta = dict(meta or {})
        with self.state.lock:
            parent = self.state.job(namespace, job_id)
            if parent is None:
                raise DispatchError("parameterized job not found")
            params = parent.spec.parameterized
            if params is None:
                raise DispatchError(f"Specified job {_go_quote(job_id)} is not a parameterized job")
            if parent.stop:
                raise DispatchError(f"Specified job {_go_quote(job_id)} is stopped")
            unpermitted = sorted(set(meta) - set(params.meta_required) - set(params.meta_optional))
            if unpermitted:
                raise DispatchError(
                    f"Dispatch request included unpermitted metadata keys: [{' '.join(unpermitted)}]"
                )
            missing = sorted(set(params.meta_required) - set(meta))
            if missing:
                raise DispatchError(f"Dispatch did not provide required meta keys: [{' '.join(missing)}]")
            same = [j for j in self.state.children_of(parent) if token and j.dispatch_token == token]
            if same:
                return same[0], ""
            child_id = f"{parent.id}/dispatch-{int(self.clock.time())}-{uuid.uuid4().hex[:8]}"
            spec = dataclasses.replace(
                parent.spec,
                id=child_id,
                name=child_id,
                parent_id=parent.id,
                parameterized=None,
                meta={**parent.spec.meta, **meta},
            )
            child = self.register_job(spec)
            child.dispatch_token = token
            return child, self.state.new_eval_id()

    def _port(self) -> int:
        with self.state.lock:
            self._next_port += 1
            return self._next_port

    # --- lookups ---------------------------------------------------------------------------------

    def node(self, name: str) -> SimNode:
        """The node called ``name`` (KeyError when unknown)."""
        return self.state.node_by_name(name)

    def job(self, job_id: str, namespace: str = "default") -> SimJob:
        """The job (KeyError when unknown)."""
        job = self.state.job(namespace, job_id)
        if job is None:
            raise KeyError(f"no simulated job {namespace}/{job_id}")
        return job

    def allocations(self, job_id: str | None = None, namespace: str = "default") -> list[SimAlloc]:
        """Allocations, of one job when ``job_id`` is given."""
        return self.state.allocs_of(job=self.job(job_id, namespace) if job_id else None)

    def allocation(self, job_id: str, group: str, index: int, namespace: str = "default") -> SimAlloc:
        """The allocation ``job.group[index]``."""
        for alloc in self.allocations(job_id, namespace):
            if alloc.group == group and alloc.index == index:
                return alloc
        raise KeyError(f"no allocation {job_id}.{group}[{index}]")

    def client_of(self, alloc: SimAlloc) -> SimClient:
        """The client agent running ``alloc``."""
        return self.clients[alloc.node.id]

    # --- actions and faults ------------------------------------------------------------------------

    def restart(self, alloc_id: str, task: str | None = None) -> None:
        """Restart a task (all running tasks when ``task`` is None), as the restart API does.

        Raises :class:`ClientError` with Nomad's status and message on failure.
        """
        alloc = self.state.allocs.get(alloc_id)
        if alloc is None:
            raise ClientError(404, f'Unknown allocation "{alloc_id}"')
        self.client_of(alloc).restart(alloc, task)

    def stop_job(self, job_id: str, namespace: str = "default") -> None:
        """``nomad job stop``: the job is dead and its allocations complete."""
        job = self.job(job_id, namespace)
        self.state.set_job_stopped(job)
        for alloc in self.state.allocs_of(job=job):
            self.client_of(alloc).stop_alloc(alloc, "alloc not needed due to job update")

    def purge_job(self, job_id: str, namespace: str = "default") -> None:
        """``nomad job stop -purge``: the job is stopped, then gone from ``/v1/jobs``.

        Its allocations stay listed (complete) until Nomad's own GC, as on a real cluster.
        """
        self.stop_job(job_id, namespace)
        self.state.remove_job(self.job(job_id, namespace))

    def stop_allocation(self, alloc_id: str) -> str:
        """``POST /v1/allocation/<id>/stop``: "stops and reschedules" it; returns the evaluation ID.

        As Nomad's ``Alloc.Stop`` does, the allocation gets ``DesiredTransition.Migrate`` and the
        evaluation stops it (``DesiredStatus: stop``; its tasks are killed, ``ClientStatus:
        complete``) and places a replacement with the same name, a new ID and its own alloc dir,
        linked both ways (``NextAllocation`` / ``PreviousAllocation``).
        """
        with self.state.lock:
            alloc = self.state.allocs.get(alloc_id)
            if alloc is None:
                raise ClientError(404, "alloc not found")
            with self.state.update_alloc(alloc):
                alloc.migrate = True
            self._migrate(alloc, "alloc is being migrated", prefer=alloc.node)
            return self.state.new_eval_id()

    def drain_node(self, node_id: str, deadline: float) -> list[str]:
        """``POST /v1/node/<id>/drain`` with a ``DrainSpec``: the node becomes ineligible and every
        allocation on it is migrated to other nodes; returns the evaluation IDs.

        The simulator migrates at once, so the drain completes before the answer (``LastDrain``
        says so); the node stays ineligible, as after a real drain.
        """
        with self.state.lock:
            node = next((n for n in self.state.nodes.values() if n.id == node_id), None)
            if node is None:
                raise ClientError(404, "node not found")
            node.eligibility = "ineligible"
            node.drain_deadline = deadline
            self.state.update_node(node)
            evals = []
            for alloc in self.state.allocs_of(node=node):
                if alloc.desired_status == "run":
                    with self.state.update_alloc(alloc):
                        alloc.migrate = True
                    self._migrate(alloc, "alloc is being migrated")
                    evals.append(self.state.new_eval_id())
            node.drain_deadline = None
            node.last_drain = self.clock.time()
            self.state.update_node(node)
            return evals

    def update_job(self, job_id: str, namespace: str = "default") -> str:
        """A destructive job update (``POST /v1/job/<id>`` with a changed task): every allocation is
        replaced by one of the new version; returns the evaluation ID."""
        with self.state.lock:
            job = self.job(job_id, namespace)
            self.state.update_job(job)
            for alloc in self.state.allocs_of(job=job):
                if alloc.desired_status == "run" and not alloc.lost:
                    self._migrate(alloc, "alloc is being updated due to job update", prefer=alloc.node)
            return self.state.new_eval_id()

    def _migrate(self, alloc: SimAlloc, description: str, prefer: SimNode | None = None) -> SimAlloc | None:
        """Stop ``alloc`` and place its replacement (on ``prefer`` if it can take it, else another node)."""
        nodes = [n for n in self.state.nodes.values() if n.status == "ready" and n.eligibility == "eligible"]
        if alloc.desired_status == "run" and not alloc.lost:
            self.client_of(alloc).stop_alloc(alloc, description)
        if not nodes or alloc.next_allocation:
            return None
        others = [n for n in nodes if n is not alloc.node]
        node = prefer if prefer in nodes else (others or nodes)[alloc.index % len(others or nodes)]
        group = alloc.job.group(alloc.group)
        replacement = self.state.add_alloc(
            alloc.job, group, alloc.index, node, self._port(), previous=alloc.id
        )
        with self.state.update_alloc(alloc):
            alloc.next_allocation = replacement.id
        self.clients[node.id].run_alloc(replacement)
        return replacement

    def kill_allocation(self, alloc_id: str) -> None:
        """Fault: the allocation's tasks are killed and fail."""
        alloc = self.state.allocs[alloc_id]
        self.client_of(alloc).kill_alloc(alloc)

    def set_node_down(self, name: str) -> None:
        """Fault: the node stops heartbeating; it is ``down``, its allocations are lost and replaced
        on the other nodes (as the servers reschedule lost allocations)."""
        node = self.node(name)
        self.state.set_node_status(node, "down")
        with self.state.lock:
            lost = [a for a in self.state.allocs_of(node=node) if a.desired_status == "run"]
            self.clients[node.id].go_down()
            for alloc in lost:
                self._migrate(alloc, "alloc is lost since its node is down")
        self.consul.set_node_health(name, CheckStatus.CRITICAL, "Agent not live or unreachable")

    def count_request(self, key: str) -> None:
        """Count one HTTP request (``"GET /v1/allocation/:id"``)."""
        with self._requests_lock:
            self.requests[key] += 1

    def request_counts(self) -> dict[str, int]:
        """Requests served so far, by method and endpoint."""
        with self._requests_lock:
            return dict(self.requests)

    # --- the record --------------------------------------------------------------------------------

    def restarts(self) -> list[RestartRecord]:
        """Every task restart so far (copies), oldest first."""
        with self.state.lock:
            return self.restart_log.snapshot()

    def signals(self) -> list[SignalRecord]:
        """Every signal sent by a ``change_mode = "signal"`` template, oldest first."""
        with self.state.lock:
            return sorted((s for c in self.clients.values() for s in c.signals), key=lambda s: s.at)

    def peak_concurrency(
        self, job: str | None = None, group: str | None = None, task: str | None = None
    ) -> int:
        """Most restarts of the job/group/task active at once (see :mod:`.restarts`)."""
        return peak_concurrency(self.restarts(), self.clock.time(), job, group, task)

    def makespan(self, job: str | None = None, group: str | None = None, task: str | None = None) -> float:
        """Cluster seconds from the first stop to the last end among the matching restarts."""
        return makespan(self.restarts(), self.clock.time(), job, group, task)

    def unsettled(self) -> list[str]:
        """Tasks of running allocations that are not running, or whose check is not passing yet."""
        out: list[str] = []
        with self.state.lock:
            for client in self.clients.values():
                for runner in client.runners.values():
                    if runner.alloc.desired_status != "run" or runner.alloc.lost:
                        continue
                    healthy = (
                        runner.phase == Phase.RUNNING
                        and not runner.restart_due
                        and (
                            runner.check_id is None
                            or self._check_passing(runner.alloc.node.name, runner.check_id)
                        )
                    )
                    if not healthy:
                        out.append(f"{runner.alloc.name}/{runner.spec.name} ({runner.phase})")
        return out

    def _check_passing(self, node: str, check_id: str) -> bool:
        check = self.consul.read(lambda: self.consul.catalog.checks.get((node, check_id)))
        return check is not None and check.status == CheckStatus.PASSING

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Wait until the clients have acted on every KV write so far (``timeout`` cluster seconds).

        Templates are re-rendered and every restart or signal due by then is done: what a test waits
        on before it checks that a write did *not* restart anything.
        """
        real = self.clock.real(timeout)
        if not (self.watcher.wait_handled(real) and self.scheduler.wait_due(real)):
            raise HealthTimeout(f"simulated clients did not catch up with Consul within {timeout:g}s")

    def wait_settled(self, timeout: float = 60.0) -> None:
        """Wait until every task of every running allocation is running and healthy.

        ``timeout`` is in cluster seconds; raises :class:`HealthTimeout` naming the stragglers.
        """
        deadline = time.monotonic() + self.clock.real(timeout)
        while True:
            pending = self.unsettled()
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise HealthTimeout(
                    f"simulated tasks not healthy after {timeout:g}s: {', '.join(pending[:10])}"
                )
            time.sleep(0.005)


class DispatchError(ValueError):
    """Nomad refused a dispatch; the message is Nomad's (its HTTP API answers it with a 500)."""


def _go_quote(text: str) -> str:
    """Go's ``%q`` of ``text``: JSON's quoting agrees with it for printable text (not control bytes)."""
    return json.dumps(text, ensure_ascii=False)
