"""The simulated Nomad client agent of one node: task runners, template rendering, restarts.

Each :class:`SimClient` owns its node's allocation directories (``<node data dir>/alloc/...``).
A :class:`KVWatcher` thread blocks on Consul's KV index (like consul-template's blocking queries)
and has each client re-render the templates whose keys changed. A :class:`TaskRunner` per
allocation task follows Nomad's task runner:

* templates render before the task starts; a ``key`` that does not exist yet blocks the start;
* a re-render writes the file only when its content changed (atomic rename) and then applies the
  template's ``change_mode`` after a random ``splay``: ``restart`` restarts the task, ``signal``
  records the signal, ``noop`` does nothing;
* a restart (template or ``POST /v1/client/allocation/<id>/restart``) emits ``Restart Signaled``,
  ``Terminated``, ``Restarting``, leaves the task ``pending`` for the sampled restart time, then
  ``Started``; its Consul check is critical until ``healthy_after`` later (never, when the
  scenario's ``unhealthy_if`` holds), and a ``crash_if`` task crash-loops until the group's restart
  policy gives up and the task is dead and failed.

All state changes happen under :attr:`NomadState.lock` and bump the allocation's ModifyIndex.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shepard_lib.gotemplate import MissingKey, TemplateError, render
from shepard_lib.keyspace import TEMPLATE_DESTINATION, shepard_template
from shepard_lib.model import CheckStatus
from shepard_lib.sim.consul.state import ConsulState, watch_index
from shepard_lib.sim.nomad.allocdir import AllocDir, write_if_changed
from shepard_lib.sim.nomad.logs import TaskLogs
from shepard_lib.sim.nomad.restarts import RestartLog, RestartRecord
from shepard_lib.sim.nomad.scheduler import Scheduler
from shepard_lib.sim.nomad.state import NomadState, SimAlloc, SimNode, SimTaskState
from shepard_lib.sim.nomad.wire import PORT_LABEL, node_attributes, rfc3339
from shepard_lib.sim.scenario import Condition, Scenario, TaskSpec, TemplateSpec

__all__ = [
    "ClientError",
    "KVWatcher",
    "Phase",
    "SignalRecord",
    "SimClient",
    "TaskRunner",
    "check_id",
    "service_id",
    "task_templates",
]

log = logging.getLogger(__name__)

_WATCH_WAIT_REAL = 5.0  # real seconds per blocking read of the KV index (stop() wakes it early)


class Phase(enum.StrEnum):
    """Where a task runner is: waiting for its templates, running, down for a restart, or dead."""

    WAITING = "waiting"
    RUNNING = "running"
    RESTARTING = "restarting"
    DEAD = "dead"


class ClientError(Exception):
    """A client request failed; ``status`` is the HTTP status Nomad answers with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class SignalRecord:
    """A signal a ``change_mode = "signal"`` template sent to a task."""

    alloc_id: str
    task: str
    signal: str
    at: float


def task_templates(task: TaskSpec, key_prefix: str) -> tuple[TemplateSpec, ...]:
    """The task's templates as its job declares them: shepard.tpl first when ``shepard`` is set."""
    trigger = TemplateSpec(TEMPLATE_DESTINATION, shepard_template(key_prefix), change_mode="restart")
    return ((trigger,) if task.shepard else ()) + task.templates


def service_id(alloc_id: str, task: str, service: str) -> str:
    """Nomad's Consul service ID: ``_nomad-task-<alloc_id>-<task>-<service>-<port label>``."""
    return f"_nomad-task-{alloc_id}-{task}-{service}-{PORT_LABEL}"


def check_id(service_id_: str, check_name: str) -> str:
    """Nomad's check ID: ``_nomad-check-`` and a hash of the service ID and check definition."""
    return "_nomad-check-" + hashlib.sha1(f"{service_id_}\x00{check_name}".encode()).hexdigest()


class TaskRunner:
    """One task of one allocation on the simulated client."""

    def __init__(self, client: SimClient, alloc: SimAlloc, task: TaskSpec) -> None:
        self.client = client
        self.alloc = alloc
        self.spec = task
        self.templates = alloc.job.templates[(alloc.group, task.name)]
        self.dir = AllocDir(client.data_dir, alloc.id)
        logs = client.scenario.logs
        self.logs = TaskLogs(self.dir.logs_dir, task.name, logs.max_file_size, logs.max_files)
        self.phase = Phase.WAITING
        self.generation = 0
        self.crashes = 0
        self.restart_due = False
        self.rendered: dict[str, bool] = {}
        self.deps: dict[str, int | None] = {}
        self.record: RestartRecord | None = None
        self.registered = False  # the service and its check are in Consul
        self.check: tuple[CheckStatus, str] = (CheckStatus.CRITICAL, "")  # shown once registered
        self.service_id = service_id(alloc.id, task.name, task.service) if task.service else None
        self.check_id = (
            check_id(self.service_id, f'service: "{task.service}" check') if self.service_id else None
        )

    @property
    def state(self) -> NomadState:
        """The cluster state."""
        return self.client.state

    @property
    def task_state(self) -> SimTaskState:
        """This task's entry in the allocation's ``TaskStates``."""
        return self.alloc.task_states[self.spec.name]

    def now(self) -> float:
        """Cluster time."""
        return self.state.clock.time()

    # --- environment ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """What ``env`` sees in this task's templates: Nomad's task environment plus node attributes."""
        alloc, node, job = self.alloc, self.alloc.node, self.alloc.job
        if self.spec.driver == "raw_exec":
            alloc_dir = str(self.dir.shared_dir)
            task_dir = str(self.dir.task_dir(self.spec.name) / "local")
            secrets_dir = str(self.dir.task_dir(self.spec.name) / "secrets")
        else:
            alloc_dir, task_dir, secrets_dir = "/alloc", "/local", "/secrets"
        env = {
            "NOMAD_ALLOC_ID": alloc.id,
            "NOMAD_SHORT_ALLOC_ID": alloc.id[:8],
            "NOMAD_ALLOC_INDEX": str(alloc.index),
            "NOMAD_ALLOC_NAME": alloc.name,
            "NOMAD_JOB_NAME": job.spec.name,
            "NOMAD_JOB_ID": job.id,
            "NOMAD_GROUP_NAME": alloc.group,
            "NOMAD_TASK_NAME": self.spec.name,
            "NOMAD_NAMESPACE": job.namespace,
            "NOMAD_DC": node.spec.datacenter,
            "NOMAD_REGION": self.state.region,
            "NOMAD_ALLOC_DIR": alloc_dir,
            "NOMAD_TASK_DIR": task_dir,
            "NOMAD_SECRETS_DIR": secrets_dir,
            "NOMAD_CPU_LIMIT": "100",
            "NOMAD_MEMORY_LIMIT": "128",
            f"NOMAD_PORT_{PORT_LABEL}": str(alloc.port),
            f"NOMAD_HOST_PORT_{PORT_LABEL}": str(alloc.port),
            f"NOMAD_IP_{PORT_LABEL}": "127.0.0.1",
            f"NOMAD_ADDR_{PORT_LABEL}": f"127.0.0.1:{alloc.port}",
            "node.unique.name": node.name,
            "node.unique.id": node.id,
            "node.datacenter": node.spec.datacenter,
            "node.class": node.spec.node_class,
        }
        if job.spec.parent_id:  # Nomad's taskenv sets it only for a job with a parent
            env["NOMAD_JOB_PARENT_ID"] = job.spec.parent_id
        meta = {**job.spec.meta, **job.group(alloc.group).meta, **self.spec.meta}
        env.update({f"NOMAD_META_{k}": v for k, v in meta.items()})
        env.update({f"attr.{k}": v for k, v in node_attributes(node).items()})
        env.update({f"meta.{k}": v for k, v in node.spec.meta.items()})
        return env

    # --- templates -------------------------------------------------------------------------------

    def _lookup(self, key: str) -> bytes | None:
        entry = self.client.consul.kv_get(key)
        self.deps[key] = None if entry is None else entry.modify_index
        return None if entry is None else (entry.value or b"")

    def deps_changed(self, current: Mapping[str, int | None]) -> bool:
        """Whether any key the templates read has a ModifyIndex other than at the last render."""
        return any(current.get(key) != seen for key, seen in self.deps.items())

    def render(self) -> list[TemplateSpec]:
        """Render every template; returns those whose file content changed (after a first render).

        Raises :class:`TemplateError` for a template outside the supported subset.
        """
        changed: list[TemplateSpec] = []
        self.deps = {}
        env = self.env()
        for tpl in self.templates:
            try:
                text = render(tpl.data, env, self._lookup).text
            except MissingKey:
                continue  # consul-template blocks: the old file (if any) stays
            path = self.dir.resolve(self.spec.name, tpl.destination)
            written = write_if_changed(path, text.encode("utf-8"))
            if written and self.rendered.get(tpl.destination):
                changed.append(tpl)
            self.rendered[tpl.destination] = True
        return changed

    def all_rendered(self) -> bool:
        """Whether every template has rendered at least once (the task may start)."""
        return all(self.rendered.get(t.destination) for t in self.templates)

    def on_kv_change(self, current: Mapping[str, int | None]) -> None:
        """Re-render when a key read changed (``current``: ModifyIndex by key) and apply change modes."""
        if self.phase == Phase.DEAD or not self.deps_changed(current):
            return
        try:
            changed = self.render()
        except TemplateError as exc:
            self._template_failed(exc)
            return
        if self.phase == Phase.WAITING:
            if self.all_rendered():
                self.start()
            return
        if self.phase != Phase.RUNNING or not changed:
            return
        restart = [t for t in changed if t.change_mode == "restart"]
        signals = [t for t in changed if t.change_mode == "signal"]
        rng = self.client.rng
        if restart and not self.restart_due:
            self.restart_due = True
            requested = self.now()
            splay = rng.uniform(0, max(t.splay for t in restart))
            self.client.scheduler.call_later(splay, lambda: self._template_restart(requested))
        elif signals:
            splay = rng.uniform(0, max(t.splay for t in signals))
            names = sorted({t.change_signal for t in signals})
            self.client.scheduler.call_later(splay, lambda: self._signal(names))

    def _template_restart(self, requested_at: float) -> None:
        with self.state.lock:
            self.restart_due = False
            if self.phase == Phase.RUNNING:
                self.restart("template", requested_at)

    def _signal(self, names: list[str]) -> None:
        with self.state.lock:
            if self.phase != Phase.RUNNING:
                return
            with self.state.update_alloc(self.alloc):
                for name in names:
                    self.task_state.add_event(
                        "Signaling",
                        self.now(),
                        "Template re-rendered",
                        TaskSignal=name,
                        TaskSignalReason="Template re-rendered",
                    )
                    self.client.signals.append(SignalRecord(self.alloc.id, self.spec.name, name, self.now()))

    # --- lifecycle -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Receive the task and build its directory (events ``Received``, ``Task Setup``)."""
        self.dir.build(self.alloc.task_states)
        with self.state.update_alloc(self.alloc):
            self.task_state.add_event("Received", self.now(), "Task received by client")
            self.task_state.add_event(
                "Task Setup", self.now(), "Building Task Directory", Message="Building Task Directory"
            )
        try:
            self.render()
        except TemplateError as exc:
            self._template_failed(exc)
            return
        if self.all_rendered():
            self.start()

    def _template_failed(self, exc: TemplateError) -> None:
        """Like Nomad: a template that cannot render fails the task."""
        now = self.now()
        log.warning("alloc %s task %s: template failed: %s", self.alloc.id, self.spec.name, exc)
        with self.state.update_alloc(self.alloc):
            self.task_state.add_event("Template", now, f"Template failed: {exc}", FailsTask=True)
        self.die(failed=True)
        if self.record is not None:
            self.record.failed_at = now
            self._end_record("failed", now)

    def start(self) -> None:
        """The task process starts: ``Started``, logs, health timers; the service registers later.

        As in Nomad, the task is ``running`` first: its service hook registers the service and
        checks after the start (poststart), and Consul has them ``register_after`` later.
        """
        now = self.now()
        self.phase = Phase.RUNNING
        gen = self.generation
        with self.state.update_alloc(self.alloc):
            ts = self.task_state
            ts.state = "running"
            ts.started_at = now
            ts.finished_at = None
            ts.add_event("Started", now, "Task started by client")
        self._log_start(ts.restarts)
        self.check = (CheckStatus.CRITICAL, "")  # Nomad registers checks critical until they run
        if self.record is not None and self.record.running_at is None:
            self.record.running_at = now
        timing = self.client.scenario.timing
        register_after = timing.register_after.sample(self.client.rng)
        self.client.scheduler.call_later(register_after, lambda: self._register(gen))
        if self._holds(self.spec.crash_if):
            self.client.scheduler.call_later(
                timing.crash_after.sample(self.client.rng), lambda: self._crash(gen)
            )
        elif self._holds(self.spec.unhealthy_if):
            self._set_check(
                CheckStatus.CRITICAL, f"HTTP GET /health: 503 Service Unavailable ({self.spec.name})"
            )
        else:
            self.client.scheduler.call_later(
                timing.healthy_after.sample(self.client.rng), lambda: self._healthy(gen)
            )

    def _holds(self, cond: Condition | None) -> bool:
        if cond is None:
            return False
        entry = self.client.consul.kv_get(cond.key)
        return entry is not None and (entry.value or b"").decode("utf-8", "replace") == cond.equals

    def _register(self, gen: int) -> None:
        with self.state.lock:
            if gen != self.generation or self.phase != Phase.RUNNING:
                return
            self._register_service()
            self._record_health()

    def _healthy(self, gen: int) -> None:
        with self.state.lock:
            if gen != self.generation or self.phase != Phase.RUNNING:
                return
            self.crashes = 0
            self._set_check(CheckStatus.PASSING, "HTTP GET /health: 200 OK")
            self._record_health()

    def _record_health(self) -> None:
        """End the restart record once Consul shows the task healthy (its check passing, or no service)."""
        healthy = self.check[0] is CheckStatus.PASSING and (self.registered or self.service_id is None)
        if healthy and self.record is not None:
            now = self.now()
            self.record.healthy_at = now
            self._end_record("healthy", now)

    def restart(self, cause: str, requested_at: float | None = None) -> None:
        """Restart the running task now (``cause``: ``template`` or ``api``)."""
        now = self.now()
        if self.record is not None:
            self._end_record("superseded", now)
        self.record = self.client.restarts.add(
            RestartRecord(
                alloc_id=self.alloc.id,
                alloc_index=self.alloc.index,
                node=self.alloc.node.name,
                job=self.alloc.job.id,
                group=self.alloc.group,
                task=self.spec.name,
                cause=cause,
                requested_at=now if requested_at is None else requested_at,
                stopped_at=now,
            )
        )
        message = (
            "Template with change_mode restart re-rendered"
            if cause == "template"
            else ("User requested task to restart")
        )
        self._deregister_service()  # Nomad's service hook deregisters before it kills the task
        with self.state.update_alloc(self.alloc):
            ts = self.task_state
            ts.add_event("Restart Signaled", now, message, RestartReason=message)
            ts.add_event("Terminated", now, "Exit Code: 0", ExitCode=0)
            ts.add_event(
                "Restarting", now, "Task restarting in 0s", RestartReason="Restart signaled", StartDelay=0
            )
            ts.state = "pending"
            ts.restarts += 1
            ts.last_restart = now
        self.logs.write("stdout", f"{_stamp(now)} INFO received SIGTERM, shutting down\n")
        self.record.down_for = self.client.scenario.timing.restart.sample(self.client.rng)
        self._pause(self.record.down_for)

    def _pause(self, delay: float) -> None:
        """Task is down for ``delay`` cluster seconds, then starts again."""
        self.phase = Phase.RESTARTING
        self.generation += 1
        gen = self.generation
        self._set_check(CheckStatus.CRITICAL, "task is restarting")
        self.client.scheduler.call_later(delay, lambda: self._restarted(gen))

    def _restarted(self, gen: int) -> None:
        with self.state.lock:
            if gen == self.generation and self.phase == Phase.RESTARTING:
                self.start()

    def _crash(self, gen: int) -> None:
        with self.state.lock:
            if gen != self.generation or self.phase != Phase.RUNNING:
                return
            now = self.now()
            policy = self.client.scenario.restart_policy
            self.crashes += 1
            self.logs.write("stderr", f"{_stamp(now)} FATAL configuration rejected, exiting\n")
            self._deregister_service()  # the task exited: Nomad's service hook deregisters it
            if self.crashes <= policy.attempts:
                with self.state.update_alloc(self.alloc):
                    ts = self.task_state
                    ts.add_event("Terminated", now, "Exit Code: 1", ExitCode=1)
                    ts.add_event(
                        "Restarting",
                        now,
                        f"Task restarting in {policy.delay:g}s",
                        RestartReason="Restart within policy",
                        StartDelay=int(policy.delay * 1e9),
                    )
                    ts.state = "pending"
                    ts.restarts += 1
                    ts.last_restart = now
                self._pause(policy.delay)
                return
            with self.state.update_alloc(self.alloc):
                ts = self.task_state
                ts.add_event("Terminated", now, "Exit Code: 1", ExitCode=1)
                ts.add_event(
                    "Not Restarting",
                    now,
                    f"Exceeded allowed attempts {policy.attempts} in interval {policy.interval:g}s"
                    ' and mode is "fail"',
                    RestartReason=f"Exceeded allowed attempts {policy.attempts}",
                    FailsTask=True,
                )
            self.die(failed=True)
            if self.record is not None:
                self.record.failed_at = now
                self._end_record("failed", now)
            for sibling in self.client.siblings(self):
                sibling.kill("Sibling Task Failed", f"Task's sibling {self.spec.name!r} failed")

    def kill(self, event: str, message: str, failed: bool = False) -> None:
        """Stop the task for good (job stopped, allocation killed, sibling failed)."""
        if self.phase == Phase.DEAD:
            return
        now = self.now()
        with self.state.update_alloc(self.alloc):
            self.task_state.add_event(event, now, message, FailsTask=failed)
            self.task_state.add_event("Killed", now, "Task successfully killed")
        self.die(failed)
        if self.record is not None:
            self._end_record("stopped", now)

    def lose(self) -> None:
        """The node went down: the runner stops acting (Nomad no longer hears of it), services vanish."""
        self.phase = Phase.DEAD
        self.generation += 1
        if self.record is not None:
            self._end_record("stopped", self.now())
        self._deregister_service()

    def die(self, failed: bool) -> None:
        """The task is dead (``Failed`` when it failed); its service is deregistered."""
        self.phase = Phase.DEAD
        self.generation += 1
        with self.state.update_alloc(self.alloc):
            ts = self.task_state
            ts.state = "dead"
            ts.failed = failed
            ts.finished_at = self.now()
        self._deregister_service()

    def _end_record(self, outcome: str, at: float) -> None:
        record = self.record
        if record is not None and record.ended_at is None:
            record.ended_at = at
            record.outcome = outcome
        self.record = None

    # --- helpers ---------------------------------------------------------------------------------

    def _register_service(self) -> None:
        if self.service_id is None or self.check_id is None or self.spec.service is None:
            return
        self.client.consul.register_service(
            self.alloc.node.name,
            self.service_id,
            self.spec.service,
            self.alloc.port,
            tags=(),
            check_id=self.check_id,
            check_name=f'service: "{self.spec.service}" check',
            status=self.check[0],
        )
        self.registered = True
        if self.check[1]:
            self.client.consul.set_check_status(self.check_id, *self.check, node=self.alloc.node.name)

    def _deregister_service(self) -> None:
        if self.registered and self.service_id is not None:
            self.client.consul.deregister_service(self.service_id)
        self.registered = False

    def _set_check(self, status: CheckStatus, output: str) -> None:
        """Set what the task's check says; Consul shows it while the service is registered."""
        self.check = (status, output)
        if self.registered and self.check_id is not None:
            self.client.consul.set_check_status(self.check_id, status, output, node=self.alloc.node.name)

    def _log_start(self, restarts: int) -> None:
        now = _stamp(self.now())
        count = self.client.scenario.logs.lines_per_start
        lines = [
            f"{now} INFO {self.spec.name} starting (alloc {self.alloc.name}, restarts {restarts})",
            f"{now} INFO listening on 127.0.0.1:{self.alloc.port}",
        ] + [f"{now} INFO worker {i} ready" for i in range(max(0, count - 2))]
        self.logs.write("stdout", "".join(line + "\n" for line in lines[:count]))
        self.logs.write("stderr", f"{now} WARN running with simulated config\n")


def _stamp(seconds: float) -> str:
    return rfc3339(seconds) or ""


class SimClient:
    """The client agent of one simulated node."""

    def __init__(
        self,
        node: SimNode,
        state: NomadState,
        consul: ConsulState,
        scenario: Scenario,
        data_dir: Path,
        scheduler: Scheduler,
        restarts: RestartLog,
    ) -> None:
        self.node = node
        self.state = state
        self.consul = consul
        self.scenario = scenario
        self.data_dir = data_dir
        self.scheduler = scheduler
        self.restarts = restarts
        self.rng = random.Random(f"{scenario.seed}/{node.name}")
        self.signals: list[SignalRecord] = []
        self.runners: dict[tuple[str, str], TaskRunner] = {}

    def run_alloc(self, alloc: SimAlloc) -> None:
        """Set up and start every task of a newly placed allocation."""
        with self.state.lock:
            group = alloc.job.group(alloc.group)
            runners = [TaskRunner(self, alloc, t) for t in group.tasks]
            for runner in runners:
                self.runners[(alloc.id, runner.spec.name)] = runner
            for runner in runners:
                runner.setup()

    def siblings(self, runner: TaskRunner) -> list[TaskRunner]:
        """The other tasks of ``runner``'s allocation."""
        return [r for (a, _), r in self.runners.items() if a == runner.alloc.id and r is not runner]

    def restart(self, alloc: SimAlloc, task: str | None) -> None:
        """``POST /v1/client/allocation/<id>/restart``: restart one task, or every running task."""
        with self.state.lock:
            if alloc.lost or self.node.status != "ready":
                raise ClientError(500, f"Unknown node {self.node.id}")
            mine = [r for (a, _), r in self.runners.items() if a == alloc.id]
            if task:
                runner = self.runners.get((alloc.id, task))
                if runner is None:
                    raise ClientError(500, f"Could not find task runner for task: {task}")
                if runner.phase != Phase.RUNNING:
                    raise ClientError(500, "Task not running")
                runner.restart("api")
                return
            running = [r for r in mine if r.phase == Phase.RUNNING]
            if not running:
                raise ClientError(500, "Task not running")
            for runner in running:
                runner.restart("api")

    def stop_alloc(self, alloc: SimAlloc, description: str) -> None:
        """The servers want ``alloc`` stopped: kill its tasks (the allocation completes)."""
        with self.state.lock:
            with self.state.update_alloc(alloc):
                alloc.desired_status = "stop"
                alloc.desired_description = description
            for runner in self._runners_of(alloc):
                runner.kill("Killing", "Sent interrupt. Waiting 5s before force killing")

    def kill_alloc(self, alloc: SimAlloc) -> None:
        """Fault: the allocation's tasks are killed out from under Nomad (they fail)."""
        with self.state.lock:
            for runner in self._runners_of(alloc):
                runner.kill("Killing", "Task killed by the simulator (fault injection)", failed=True)

    def go_down(self) -> None:
        """The node went down: its allocations are lost and its services vanish."""
        with self.state.lock:
            for alloc in {r.alloc.id: r.alloc for r in self.runners.values()}.values():
                with self.state.update_alloc(alloc):
                    alloc.lost = True
                    alloc.desired_status = "stop"
                    alloc.desired_description = "alloc is lost since its node is down"
                for runner in self._runners_of(alloc):
                    runner.lose()

    def _runners_of(self, alloc: SimAlloc) -> list[TaskRunner]:
        return [r for (a, _), r in self.runners.items() if a == alloc.id]

    def on_kv_change(self) -> None:
        """Consul KV changed: let every task runner re-render what it depends on."""
        with self.state.lock:
            if self.node.status != "ready":
                return
            runners = list(self.runners.values())
            keys = {k for r in runners for k in r.deps}
            current = self.consul.read(functools.partial(_modify_indexes, self.consul, keys))
            for runner in runners:
                try:
                    runner.on_kv_change(current)
                except Exception:
                    log.exception("alloc %s task %s: re-render failed", runner.alloc.id, runner.spec.name)


class KVWatcher:
    """One thread that follows Consul's KV index for every simulated client.

    Like the clients' consul-template runners it blocks on Consul; on a KV change it calls each
    client's :meth:`SimClient.on_kv_change`. One thread instead of one per node keeps a 100-node
    fleet from waking 100 threads on every Consul write.
    """

    def __init__(self, consul: ConsulState, clients: Callable[[], Iterable[SimClient]]) -> None:
        self.consul = consul
        self.clients = clients
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handled = threading.Condition()
        self._handled_index = 0  # every client has seen the KV up to this index

    def start(self) -> None:
        """Start watching from the current KV index (call before any allocation renders)."""
        kv_index = self.consul.read(lambda: self.consul.kv.table_index)
        self._handled_index = kv_index
        self._thread = threading.Thread(
            target=self._run, args=(kv_index,), name="sim-nomad-kv-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waking it from its blocking read)."""
        self._stop.set()
        self.consul.wake_waiters()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, kv_index: int) -> None:
        while not self._stop.is_set():
            # Any KV write wakes it: what it watches is the KV table's index itself.
            new, _ = self.consul.blocking_read(
                lambda: (self.consul.kv.table_index, None),
                kv_index,
                _WATCH_WAIT_REAL,
                abort=self._stop,
                watch=watch_index,
            )
            if new == kv_index:
                continue
            kv_index = new
            for client in self.clients():
                client.on_kv_change()
            with self._handled:
                self._handled_index = kv_index
                self._handled.notify_all()

    def wait_handled(self, timeout: float) -> bool:
        """Block until every client has handled the KV as it is now (``timeout`` real seconds)."""
        index = self.consul.read(lambda: self.consul.kv.table_index)
        with self._handled:
            return self._handled.wait_for(
                lambda: self._handled_index >= index or self._stop.is_set(), timeout
            )


def _modify_indexes(consul: ConsulState, keys: set[str]) -> dict[str, int | None]:
    """ModifyIndex of each key (None when absent); runs under Consul's lock via ``ConsulState.read``."""
    out: dict[str, int | None] = {}
    for key in keys:
        entry = consul.kv.get(key)
        out[key] = None if entry is None else entry.modify_index
    return out
