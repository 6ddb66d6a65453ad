"""The health gate: wait until a restarted task has really restarted and is healthy, and stays so.

The gate watches with blocking queries only: one thread follows the allocation in Nomad
(``watch_allocation``) and, when Consul checks count, one thread per service follows
``/v1/health/checks/<service>``. Every answer is judged as it arrives, so a check that flaps back to
critical restarts the stable timer even if it passes again before the caller looks.

What "healthy" means depends on ``source``; every source first requires that the task restarted
since the baseline (its restart count grew or it started later than before) and that Nomad reports
its state ``running``:

========== ======================================================================================
source     also required
========== ======================================================================================
``nomad``  Nomad does not mark the task failed. Consul is not read.
``consul`` every check of the allocation's services (check ``ServiceID`` contains the allocation
           ID) is ``passing``, with at least one check per service; Nomad's ``failed`` flag and
           allocation status are not looked at while the task runs. A task with no services is
           judged as by ``nomad`` (logged once per job/group/task).
``both``   everything ``consul`` requires, and Nomad does not mark the task failed and reports
           the allocation itself running (``ClientStatus`` running, ``DesiredStatus`` run).
           A task with no services is judged as by ``nomad`` plus the allocation status.
========== ======================================================================================

The task must then stay healthy for ``min_healthy_time``; any unhealthy answer in between
restarts that timer. The gate raises :class:`~shepard_lib.errors.TaskFailed` as soon as the task is
dead, the allocation is stopped, lost, complete or failed, or Nomad no longer knows it;
:class:`~shepard_lib.errors.HealthTimeout` at ``healthy_deadline`` (counted from the call), naming
what was still missing; :class:`~shepard_lib.errors.LockLost` when ``cancel`` is set.

Limitation: a Consul service without checks cannot be observed here (Consul's checks endpoint lists
checks only); pass only services that have checks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import HealthSource
from shepard_lib.errors import HealthTimeout, LockLost, NotFound, TaskFailed
from shepard_lib.model import Allocation, AllocClientStatus, CheckStatus, HealthCheck, TaskState

log = logging.getLogger(__name__)

MAX_WAIT = 15.0
"""Cluster seconds one blocking query waits at most; also how long a watcher may outlive its gate."""
CANCEL_CHECK = 1.0
"""Cluster seconds between looks at ``cancel`` while nothing else happens (no request is made)."""
ERROR_BACKOFF = 2.0
"""Cluster seconds a watcher waits after a failed query before it asks again."""

_TERMINAL_CLIENT_STATUS = {AllocClientStatus.COMPLETE, AllocClientStatus.FAILED, AllocClientStatus.LOST}


@dataclass(frozen=True)
class HealthReport:
    """How a restart went: cluster Unix times of the restart, of the new run and of the verdict."""

    alloc_id: str
    task: str
    restarted_at: float | None
    running_at: float | None
    healthy_at: float


def restarted(before: TaskState, now: TaskState) -> bool:
    """Whether ``now`` is a later run of the task than ``before``."""
    if now.restarts > before.restarts:
        return True
    return now.started_at is not None and (before.started_at is None or now.started_at > before.started_at)


class HealthGate:
    """Waits for restarted tasks to be healthy (see the module docs for what that means per source).

    Durations are cluster seconds of ``clock``.
    """

    def __init__(
        self,
        consul: ConsulAPI,
        nomad: NomadAPI,
        *,
        source: HealthSource,
        min_healthy_time: float,
        healthy_deadline: float,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        self._consul = consul
        self._nomad = nomad
        self.source = HealthSource(source)
        self.min_healthy_time = min_healthy_time
        self.healthy_deadline = healthy_deadline
        self._clock = clock
        self._fallback_logged: set[tuple[str, str, str]] = set()
        self._fallback_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"HealthGate(source={self.source.value!r}, min_healthy_time={self.min_healthy_time:g}, "
            f"healthy_deadline={self.healthy_deadline:g})"
        )

    def baseline(self, alloc_id: str, task: str) -> TaskState:
        """The task's state now, to be passed as ``before`` after the restart is triggered.

        A task Nomad has no state for yet counts as pending and never started.
        """
        return self._nomad.allocation(alloc_id).task_states.get(task, TaskState(state="pending"))

    def healthy_now(self, alloc_id: str, task: str, services: Sequence[str] = ()) -> bool:
        """Whether ``task`` of ``alloc_id`` is healthy right now by this gate's source (no restart needed).

        Used to tell when a failed member's task came back (it then stops counting as down).
        """
        try:
            alloc = self._nomad.allocation(alloc_id)
        except NotFound:
            return False
        state = alloc.task_states.get(task)
        if state is None or state.state != "running" or not alloc.running:
            return False
        if self.source is HealthSource.NOMAD or not services:
            return not state.failed
        if self.source is HealthSource.BOTH and state.failed:
            return False
        for service in dict.fromkeys(services):
            _, checks = self._consul.service_checks(service)
            mine = [c for c in checks if alloc_id in c.service_id]
            if not mine or any(c.status is not CheckStatus.PASSING for c in mine):
                return False
        return True

    def wait_healthy(
        self,
        alloc_id: str,
        task: str,
        *,
        before: TaskState,
        services: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> HealthReport:
        """Block until ``task`` of ``alloc_id`` restarted since ``before`` and is healthy.

        ``services`` are the Consul service names of the task (its checks are those whose service ID
        contains ``alloc_id``). Raises TaskFailed, HealthTimeout or LockLost (see the module docs).
        """
        use_checks = self.source is not HealthSource.NOMAD and bool(services)
        watch = _Watch(
            self._consul,
            self._nomad,
            self._clock,
            alloc_id,
            task,
            before,
            services=tuple(dict.fromkeys(services)) if use_checks else (),
            strict=self.source is HealthSource.BOTH,
            min_healthy_time=self.min_healthy_time,
            healthy_deadline=self.healthy_deadline,
            on_first_alloc=None if use_checks or self.source is HealthSource.NOMAD else self._log_fallback,
        )
        try:
            return watch.run(cancel)
        finally:
            watch.stop()

    def _log_fallback(self, alloc: Allocation, task: str) -> None:
        key = (alloc.job_id, alloc.task_group, task)
        with self._fallback_lock:
            if key in self._fallback_logged:
                return
            self._fallback_logged.add(key)
        log.info(
            "%s/%s/%s has no Consul services: its health is judged by its Nomad task state only",
            *key,
        )


class _Watch:
    """One wait of the gate: the watcher threads, the latest answers and the stable timer."""

    def __init__(
        self,
        consul: ConsulAPI,
        nomad: NomadAPI,
        clock: Clock,
        alloc_id: str,
        task: str,
        before: TaskState,
        *,
        services: tuple[str, ...],
        strict: bool,
        min_healthy_time: float,
        healthy_deadline: float,
        on_first_alloc: Callable[[Allocation, str], None] | None,
    ) -> None:
        self.consul = consul
        self.nomad = nomad
        self.clock = clock
        self.min_healthy_time = min_healthy_time
        self.healthy_deadline = healthy_deadline
        self.alloc_id = alloc_id
        self.task = task
        self.before = before
        self.strict = strict
        self.on_first_alloc = on_first_alloc
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self.alloc: Allocation | None = None
        self.checks: dict[str, list[HealthCheck] | None] = {s: None for s in services}
        self.failure: str | None = None
        self.healthy_since: float | None = None
        self.why_not = "no answer from Nomad yet"
        self.answers = 0  # how many answers were judged: what run() waits on
        self.deadline = self.clock.monotonic() + healthy_deadline

    def name(self) -> str:
        return f"task {self.task} of allocation {self.alloc_id}"

    def run(self, cancel: threading.Event | None) -> HealthReport:
        threads = [threading.Thread(target=self._follow_nomad, name=f"shepard-health-nomad[{self.alloc_id}]")]
        threads += [
            threading.Thread(target=self._follow_checks, args=(s,), name=f"shepard-health-consul[{s}]")
            for s in self.checks
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        with self.cond:
            while True:
                if self.failure is not None:
                    raise TaskFailed(f"{self.name()} failed after the restart: {self.failure}")
                if cancel is not None and cancel.is_set():
                    raise LockLost(f"health wait for {self.name()} cancelled (slot lost or shutdown)")
                now = self.clock.monotonic()
                if self.healthy_since is not None and now - self.healthy_since >= self.min_healthy_time:
                    return self._report()
                if now >= self.deadline:
                    raise HealthTimeout(
                        f"{self.name()} not healthy within {self.healthy_deadline:g}s: {self.why_not}"
                    )
                wake = self.deadline
                if self.healthy_since is not None:
                    wake = min(wake, self.healthy_since + self.min_healthy_time)
                if cancel is not None:
                    wake = min(wake, now + CANCEL_CHECK)
                seen = self.answers
                self.clock.wait_for(self.cond, lambda seen=seen: self.answers != seen, wake - now)

    def stop(self) -> None:
        self.stopped.set()

    def _report(self) -> HealthReport:
        state = self.alloc.task_states.get(self.task) if self.alloc else None
        return HealthReport(
            alloc_id=self.alloc_id,
            task=self.task,
            restarted_at=state.last_restart if state else None,
            running_at=state.started_at if state else None,
            healthy_at=self.clock.time(),
        )

    # --- judging answers (called with self.cond held) ------------------------------------------

    def _judge(self) -> None:
        self.failure = self.failure or self._failure()
        healthy, self.why_not = self._healthy()
        if not healthy:
            self.healthy_since = None
        elif self.healthy_since is None:
            self.healthy_since = self.clock.monotonic()
        self.answers += 1
        self.cond.notify_all()

    def _failure(self) -> str | None:
        alloc = self.alloc
        if alloc is None:
            return None
        state = alloc.task_states.get(self.task)
        if state is not None and state.state == "dead":
            return "the task is dead" + (" (failed)" if state.failed else "")
        if alloc.client_status in _TERMINAL_CLIENT_STATUS or alloc.desired_status not in ("run", ""):
            return f"the allocation is {alloc.client_status} (desired status {alloc.desired_status})"
        return None

    def _healthy(self) -> tuple[bool, str]:
        """Whether the latest answers say healthy, and if not, what is missing."""
        alloc = self.alloc
        if alloc is None:
            return False, "no answer from Nomad yet"
        state = alloc.task_states.get(self.task)
        if state is None:
            return False, "Nomad reports no state for the task yet"
        if not restarted(self.before, state):
            return False, f"the task has not restarted yet (restarts {state.restarts}, state {state.state})"
        if state.state != "running":
            return False, f"the task is {state.state}"
        nomad_strict = self.strict or not self.checks
        if nomad_strict and state.failed:
            return False, "Nomad marks the task failed"
        if self.strict and not alloc.running:
            return False, f"the allocation is {alloc.client_status} (desired {alloc.desired_status})"
        for service, checks in self.checks.items():
            if checks is None:
                return False, f"no answer from Consul for service {service} yet"
            mine = [c for c in checks if self.alloc_id in c.service_id]
            if not mine:
                return False, f"service {service} has no checks registered for this allocation"
            bad = [c for c in mine if c.status is not CheckStatus.PASSING]
            if bad:
                return False, "; ".join(
                    f"service {service}: check {c.name or c.check_id} is {c.status}" for c in bad
                )
        return True, "healthy"

    # --- watcher threads -----------------------------------------------------------------------

    def _wait_for_query(self) -> float:
        return max(0.05, min(MAX_WAIT, self.deadline - self.clock.monotonic()))

    def _follow_nomad(self) -> None:
        index = 0
        while not self.stopped.is_set():
            try:
                index, alloc = self.nomad.watch_allocation(self.alloc_id, index, self._wait_for_query())
            except NotFound:
                with self.cond:
                    self.failure = "Nomad no longer knows the allocation"
                    self.answers += 1
                    self.cond.notify_all()
                return
            except Exception as exc:  # a watcher thread must survive anything the backend raises
                if self._backoff("Nomad", exc):
                    return
                continue
            with self.cond:
                first = self.alloc is None
                self.alloc = alloc
                self._judge()
            if first and self.on_first_alloc is not None:
                self.on_first_alloc(alloc, self.task)

    def _follow_checks(self, service: str) -> None:
        index = 0
        while not self.stopped.is_set():
            try:
                index, checks = self.consul.service_checks(
                    service, index, self._wait_for_query() if index else None
                )
            except Exception as exc:  # a watcher thread must survive anything the backend raises
                if self._backoff(f"Consul (service {service})", exc):
                    return
                continue
            with self.cond:
                self.checks[service] = checks
                self._judge()

    def _backoff(self, source: str, exc: Exception) -> bool:
        """Log a failed query and wait a little; True when the gate is done meanwhile."""
        if self.stopped.is_set():
            return True
        log.warning("health of %s: query to %s failed, retrying: %s", self.name(), source, exc)
        return self.clock.wait(self.stopped, ERROR_BACKOFF)
