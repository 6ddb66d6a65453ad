"""The health gate: wait until a restarted task has really restarted and is healthy, and stays so.

The gate watches with blocking queries only, through watch hubs (:mod:`shepard_lib.watchhub`)
shared by every gate on the same backends in the process: one loop follows each allocation in
Nomad (``watch_allocation``) and, when Consul checks count, one loop per service follows
``/v1/health/checks/<service>``, so c restarts of a service in flight cost one Consul request per
change, not c. A gate asks for Consul's answers once Nomad reports the restarted task running
(before that no check can make it healthy). Each subscription starts with an answer read after it
began, then every answer is judged as it arrives, so a check that flaps back to critical restarts
the stable timer even if it passes again before the caller looks.

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

Node watches (``watch_nodes``): the gates of one process share a service's watch, but gates in
different processes (the lanes of an agent-driven rollout) do not, and every check change of the
service wakes each of them. With ``watch_nodes`` a gate follows the Consul node of the allocation
instead (``/v1/health/node/<node>``), woken only by that node's checks. Which Consul node
registers a Nomad node's services is learned from Consul's own answers, never configured: until
an answer of a service's checks has named the ``Node`` of the checks of an allocation on that
Nomad node, a gate takes the Nomad node's name (Nomad and Consul both name a node after its host
unless told otherwise). Where Consul knows no node of that name (its answer lists no check at
all, not even ``serfHealth``), or the node shows no check of the allocation for a service
``NODE_GRACE`` after the node's watch began (a wrong guess, or a renamed Consul agent), the gate
also follows that service's checks, and learns from them for later waits.

Limitation: a Consul service without checks cannot be observed here (Consul's checks endpoint lists
checks only); pass only services that have checks.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import HealthSource
from shepard_lib.errors import HealthTimeout, LockLost, NotFound, TaskFailed
from shepard_lib.model import Allocation, AllocClientStatus, CheckStatus, HealthCheck, TaskState
from shepard_lib.watchhub import Query, Subscriber, WatchHub

log = logging.getLogger(__name__)

MAX_WAIT = 15.0
"""Cluster seconds one blocking query waits at most; also how long a watcher may outlive its gate
(unless its backends' owner closes the watches: :func:`close_watches`)."""
CANCEL_CHECK = 1.0
"""Cluster seconds between looks at ``cancel`` while nothing else happens (no request is made)."""
ERROR_BACKOFF = 2.0
"""Cluster seconds a watcher waits after a failed query before it asks again."""
NODE_GRACE = 10.0
"""Cluster seconds a node watch may show no check of the allocation for a service (Nomad registers
the services as the task starts) before the gate also follows that service's checks."""

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

    Durations are cluster seconds of ``clock``. ``watch_nodes``: follow the checks of each
    allocation's Consul node instead of its services' (module docs, *Node watches*).
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
        watch_nodes: bool = False,
    ) -> None:
        self._consul = consul
        self._nomad = nomad
        self.source = HealthSource(source)
        self.min_healthy_time = min_healthy_time
        self.healthy_deadline = healthy_deadline
        self.watch_nodes = watch_nodes
        self._clock = clock
        self._fallback_logged: set[tuple[str, str, str]] = set()
        self._fallback_lock = threading.Lock()
        self._hubs = _hubs_for(consul, nomad, clock)

    def __repr__(self) -> str:
        return (
            f"HealthGate(source={self.source.value!r}, min_healthy_time={self.min_healthy_time:g}, "
            f"healthy_deadline={self.healthy_deadline:g}, watch_nodes={self.watch_nodes})"
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
            self._hubs,
            self._clock,
            alloc_id,
            task,
            before,
            services=tuple(dict.fromkeys(services)) if use_checks else (),
            strict=self.source is HealthSource.BOTH,
            min_healthy_time=self.min_healthy_time,
            healthy_deadline=self.healthy_deadline,
            watch_nodes=use_checks and self.watch_nodes,
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
    """One wait of the gate: its subscriptions to the watch hubs, the latest answers and the stable timer."""

    def __init__(
        self,
        hubs: _Hubs,
        clock: Clock,
        alloc_id: str,
        task: str,
        before: TaskState,
        *,
        services: tuple[str, ...],
        strict: bool,
        min_healthy_time: float,
        healthy_deadline: float,
        watch_nodes: bool,
        on_first_alloc: Callable[[Allocation, str], None] | None,
    ) -> None:
        self.hubs = hubs
        self.clock = clock
        self.min_healthy_time = min_healthy_time
        self.healthy_deadline = healthy_deadline
        self.alloc_id = alloc_id
        self.task = task
        self.before = before
        self.strict = strict
        self.on_first_alloc = on_first_alloc
        self.cond = threading.Condition()
        self.alloc: Allocation | None = None
        self.checks: dict[str, list[HealthCheck] | None] = {s: None for s in services}
        self.watch_nodes = watch_nodes
        self.node: str | None = None  # the Consul node followed for this wait (watch_nodes, once known)
        self.node_since = 0.0  # clock.monotonic() when the node watch was subscribed
        self.by_service: set[str] = set()  # services whose checks come from their own watch
        self.node_known = True  # the node's last answer listed checks (Consul knows such a node)
        self.failure: str | None = None
        self.healthy_since: float | None = None
        self.why_not = "no answer from Nomad yet"
        self.answers = 0  # how many answers were judged: what run() waits on
        self.deadline = self.clock.monotonic() + healthy_deadline
        self.unsubscribe: dict[str, Callable[[], None]] = {}  # "nomad", "consul:<service>" or "node:<node>"
        self.retry_at = 0.0  # clock.monotonic() before which no failed subscription is tried again

    def name(self) -> str:
        return f"task {self.task} of allocation {self.alloc_id}"

    def run(self, cancel: threading.Event | None) -> HealthReport:
        while True:
            self._subscribe_due()
            with self.cond:
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
                due = self._due(now)
                if due is not None and due <= now:
                    continue
                wake = self.deadline
                if self.healthy_since is not None:
                    wake = min(wake, self.healthy_since + self.min_healthy_time)
                if cancel is not None:
                    wake = min(wake, now + CANCEL_CHECK)
                if due is not None:
                    wake = min(wake, due)
                seen = self.answers
                self.clock.wait_for(self.cond, lambda seen=seen: self.answers != seen, wake - now)

    def stop(self) -> None:
        for unsubscribe in self.unsubscribe.values():
            unsubscribe()

    def _report(self) -> HealthReport:
        state = self.alloc.task_states.get(self.task) if self.alloc else None
        return HealthReport(
            alloc_id=self.alloc_id,
            task=self.task,
            restarted_at=state.last_restart if state else None,
            running_at=state.started_at if state else None,
            healthy_at=self.clock.time(),
        )

    # --- subscriptions (run() only, without self.cond) -----------------------------------------

    def _wanted(self, now: float) -> tuple[list[str], float | None]:
        """Subscriptions to make now, and when one more will be wanted (None: none is in sight).

        Nomad first; Consul once the restarted task runs (before that no check can make it healthy):
        each service's checks, or with ``watch_nodes`` the checks of the allocation's Consul node
        (learned, else the Nomad node's name), and a service's own checks as well where that node
        showed none of the allocation's for ``NODE_GRACE``, or at once when Consul has no such node.
        Called with self.cond held.
        """
        if "nomad" not in self.unsubscribe:
            return ["nomad"], None
        alloc = self.alloc
        state = alloc.task_states.get(self.task) if alloc else None
        if alloc is None or state is None or state.state != "running" or not restarted(self.before, state):
            return [], None
        if self.watch_nodes and self.node is None:  # chosen once per wait
            self.node = self.hubs.consul_node(alloc.node_name) or alloc.node_name or None
        if self.node is None:
            return [f"consul:{s}" for s in self.checks if s not in self.by_service], None
        wanted = [] if f"node:{self.node}" in self.unsubscribe else [f"node:{self.node}"]
        unseen = [s for s in self.checks if s not in self.by_service and not self._mine(self.checks[s])]
        if wanted or not unseen:
            return wanted, None
        if self.node_known and now < self.node_since + NODE_GRACE:
            return [], self.node_since + NODE_GRACE
        return [f"consul:{s}" for s in unseen], None

    def _due(self, now: float) -> float | None:
        """When the next subscription is to be tried (None: none is wanted). Called with self.cond held."""
        wanted, later = self._wanted(now)
        if wanted:
            return self.retry_at
        return None if later is None else max(later, self.retry_at)

    def _subscribe_due(self) -> None:
        now = self.clock.monotonic()
        if now < self.retry_at:
            return
        with self.cond:
            wanted, _ = self._wanted(now)
            for what in wanted:
                kind, _, name = what.partition(":")
                if kind == "consul":
                    self.by_service.add(name)  # from now on its own watch's answers count for it
                elif kind == "node":
                    self.node_since = now
        for what in wanted:
            kind, _, name = what.partition(":")
            source = (
                "Nomad" if kind == "nomad" else f"Consul ({'node' if kind == 'node' else 'service'} {name})"
            )
            retry = functools.partial(self._on_retry, source)
            try:
                if kind == "nomad":
                    self.unsubscribe[what] = self.hubs.nomad.subscribe(
                        self.alloc_id, Subscriber(self._on_alloc, self._on_alloc_error, retry)
                    )
                elif kind == "node":
                    self.unsubscribe[what] = self.hubs.node_checks.subscribe(
                        name, Subscriber(self._on_node_checks, lambda exc: None, retry)
                    )
                else:
                    self.unsubscribe[what] = self.hubs.checks.subscribe(
                        name, Subscriber(functools.partial(self._on_checks, name), lambda exc: None, retry)
                    )
            except NotFound as exc:
                self._on_alloc_error(exc)
                return
            except Exception as exc:  # the gate must survive anything the backend raises
                self._on_retry(source, exc)
                self.retry_at = self.clock.monotonic() + ERROR_BACKOFF
                unsubscribed = [w for w in wanted if w.startswith("consul:") and w not in self.unsubscribe]
                with self.cond:
                    self.by_service.difference_update(w.partition(":")[2] for w in unsubscribed)
                return

    def _on_retry(self, source: str, exc: Exception) -> None:
        log.warning("health of %s: query to %s failed, retrying: %s", self.name(), source, exc)

    # --- answers (from the hubs) ---------------------------------------------------------------

    def _on_alloc(self, alloc: Allocation) -> None:
        with self.cond:
            first = self.alloc is None
            self.alloc = alloc
            self._judge()
        if first and self.on_first_alloc is not None:
            self.on_first_alloc(alloc, self.task)

    def _on_alloc_error(self, exc: Exception) -> None:
        with self.cond:
            self.failure = self.failure or "Nomad no longer knows the allocation"
            self.answers += 1
            self.cond.notify_all()

    def _on_checks(self, service: str, checks: list[HealthCheck]) -> None:
        with self.cond:
            self.checks[service] = checks
            mine = self._mine(checks)
            if self.watch_nodes and mine and self.alloc is not None:
                self.hubs.learn_consul_node(self.alloc.node_name, mine[0].node)
            self._judge()

    def _on_node_checks(self, checks: list[HealthCheck]) -> None:
        with self.cond:
            self.node_known = bool(checks)  # Consul lists no check, not even serfHealth, of a node it lacks
            for service in self.checks:
                if service not in self.by_service:
                    self.checks[service] = [c for c in checks if c.service_name == service]
            self._judge()

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
            mine = self._mine(checks)
            if not mine:
                where = f" on Consul node {self.node}" if self.node and service not in self.by_service else ""
                return False, f"service {service} has no checks registered for this allocation{where}"
            bad = [c for c in mine if c.status is not CheckStatus.PASSING]
            if bad:
                return False, "; ".join(
                    f"service {service}: check {c.name or c.check_id} is {c.status}" for c in bad
                )
        return True, "healthy"

    def _mine(self, checks: list[HealthCheck] | None) -> list[HealthCheck]:
        """The checks of this allocation among ``checks`` (its service IDs contain the allocation ID)."""
        return [c for c in checks or () if self.alloc_id in c.service_id]


@dataclass(frozen=True)
class _Hubs:
    """The watch hubs of one pair of backends: one loop per allocation, per service and per Consul node;
    and the Consul node learned for each Nomad node (see the module docs)."""

    nomad: WatchHub[Allocation]
    checks: WatchHub[list[HealthCheck]]
    node_checks: WatchHub[list[HealthCheck]]
    consul_nodes: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def consul_node(self, nomad_node: str) -> str | None:
        """The Consul node whose checks were last seen for an allocation on ``nomad_node``, if any."""
        with self.lock:
            return self.consul_nodes.get(nomad_node)

    def learn_consul_node(self, nomad_node: str, consul_node: str) -> None:
        """Record that ``nomad_node``'s allocations have their checks on ``consul_node``."""
        if nomad_node and consul_node:
            with self.lock:
                self.consul_nodes[nomad_node] = consul_node


_ByNomad = weakref.WeakKeyDictionary[object, _Hubs]
_HUBS: weakref.WeakKeyDictionary[object, _ByNomad] = weakref.WeakKeyDictionary()
_HUBS_LOCK = threading.Lock()


def close_watches(consul: ConsulAPI, nomad: NomadAPI) -> None:
    """End the health watches on these backends now (their blocking queries are cancelled) and
    wait for their threads: for an owner of the backends that stops (the agent). A gate made later
    starts new ones."""
    with _HUBS_LOCK:
        by_nomad = _HUBS.get(consul)
        hubs = by_nomad.pop(nomad, None) if by_nomad is not None else None
    if hubs is not None:
        hubs.nomad.close()
        hubs.checks.close()
        hubs.node_checks.close()


def _hubs_for(consul: ConsulAPI, nomad: NomadAPI, clock: Clock) -> _Hubs:
    """The hubs shared by every gate on these backends in this process (made on first use).

    The hubs hold the backends weakly (a gate holds them while it waits), so backends that are
    dropped go away with their hubs.
    """
    consul_ref, nomad_ref = weakref.ref(consul), weakref.ref(nomad)

    def watch_allocation(
        alloc_id: str, index: int, wait: float, cancel: CancelEvent
    ) -> tuple[int, Allocation]:
        backend = nomad_ref()
        if backend is None:
            raise NotFound("nomad.watch_allocation", "the Nomad backend is gone")
        return backend.watch_allocation(alloc_id, index, wait, cancel=cancel)

    def consul_checks(
        read: Callable[[ConsulAPI], Callable[..., tuple[int, list[HealthCheck]]]],
    ) -> Query[list[HealthCheck]]:
        """A hub query for one of Consul's check endpoints (a service's or a node's), by key."""

        def query(key: str, index: int, wait: float, cancel: CancelEvent) -> tuple[int, list[HealthCheck]]:
            backend = consul_ref()
            if backend is None:
                raise LockLost("the Consul backend is gone")
            return read(backend)(key, index, wait if index else None, cancel=cancel)

        return query

    def checks_hub(name: str, query: Query[list[HealthCheck]]) -> WatchHub[list[HealthCheck]]:
        return WatchHub(
            name,
            query,
            clock,
            max_wait=MAX_WAIT,
            backoff=ERROR_BACKOFF,
            final=lambda exc: isinstance(exc, LockLost),
        )

    with _HUBS_LOCK:
        by_nomad = _HUBS.setdefault(consul, weakref.WeakKeyDictionary())
        hubs = by_nomad.get(nomad)
        if hubs is None or hubs.nomad.clock is not clock:
            hubs = by_nomad[nomad] = _Hubs(
                nomad=WatchHub(
                    "nomad-allocation",
                    watch_allocation,
                    clock,
                    max_wait=MAX_WAIT,
                    backoff=ERROR_BACKOFF,
                    final=lambda exc: isinstance(exc, NotFound),
                ),
                checks=checks_hub("consul-checks", consul_checks(lambda backend: backend.service_checks)),
                node_checks=checks_hub("consul-node", consul_checks(lambda backend: backend.node_checks)),
            )
        return hubs
