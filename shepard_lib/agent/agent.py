"""The per-node agent: discovery, file watcher, rollouts, session, heartbeat, periodic jobs, metrics.

::

    with Agent(cfg, ConsulBackend(cfg.consul, clock), NomadBackend(cfg.nomad, clock), clock=clock) as agent:
        ...                               # restarts this node's tasks when their files change

:meth:`Agent.start` resolves the node (``node_name``, else the local Nomad agent's
``/v1/agent/self``), creates the agent's Consul session (Consul's default node checks:
``serfHealth``), takes the heartbeat key ``<prefix>/nodes/<node>`` with it, and starts following
the node's allocations (:mod:`.discovery`) and their files (:mod:`.watcher`). A settled change is
handed to its task's rollout worker (:mod:`.rollouts`), which goes through
:class:`~shepard_lib.coordinator.Coordinator`. A lost session is replaced (its locks are not acted
on again: the coordinator stops on ``session.lost``); Consul or Nomad unreachable means backoff and
one log line per outage. Nothing here is process-global (no signal handlers, a metrics registry
per agent), so several agents can run in one process; the CLI daemon (:mod:`.daemon`) adds the
signals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from shepard_lib import __version__
from shepard_lib.agent.discovery import Discovery, ManagedAlloc
from shepard_lib.agent.inotify import PyInotifyWatcher
from shepard_lib.agent.metrics import AgentMetrics, MetricsServer, counted
from shepard_lib.agent.outage import Outage
from shepard_lib.agent.periodic import PeriodicJob, PeriodicRunner, default_jobs
from shepard_lib.agent.rollouts import Change, Rollouts
from shepard_lib.agent.watcher import ChangeEvent, FileWatcher, TaskKey
from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.cancel import CancelEvent, wait_any
from shepard_lib.clock import Clock
from shepard_lib.config import ShepardConfig
from shepard_lib.coordinator import (
    Coordinator,
    CoordinatorOptions,
    EventKind,
    MemberOutcome,
    Outcome,
    RolloutEvent,
)
from shepard_lib.errors import Cancelled, ConfigError, ShepardError
from shepard_lib.health import close_watches
from shepard_lib.keyspace import Keyspace
from shepard_lib.model import Allocation
from shepard_lib.recovery import heartbeats_seen
from shepard_lib.session import Session

__all__ = ["RESTART_ONLY", "Agent"]

log = logging.getLogger(__name__)

RESTART_ONLY = (
    "consul",
    "nomad",
    "node_name",
    "nomad_data_dir",
    "key_prefix",
    "lock_scope",
    "session_ttl",
    "lock_delay",
    "watch_secrets",
    "metrics_address",
    "time_scale",
    "log_shipping",
)
"""Settings a reload (SIGHUP) cannot change: the agent keeps the old values until it restarts.
(``log_shipping``: the shipping job, its sinks and their metrics are set up once, at start;
``ship_log_interval`` is read at every round and reloads.)"""

HEARTBEAT_WAIT = 300.0
"""Cluster seconds the heartbeat watch's blocking query lasts at most (Consul's default ``wait``, as
consul-template's watches): it answers at once when a heartbeat is taken or released, so its length
only bounds how long an answer is trusted when no other comes (a stalled connection)."""

SCAN_INTERVAL = 10.0
"""Cluster seconds between digest scans of a task that fell back from inotify."""
REGISTRATION_SPREAD = 2.0
"""Cluster seconds the registrar waits at most (between half of it and all of it, at random) before
writing the changes it has: a node's changes of one burst go into one write, and agents that saw
one Consul key change at the same moment spread their writes (see :mod:`shepard_lib.agent.rollouts`)."""
THREAD_JOIN = 30.0
"""Real seconds :meth:`Agent.stop` waits for each of its threads once they were told to end (they
end at once: their waits and blocking queries end on ``stopping``); a thread still alive then is
logged."""


class Agent:
    """The Shepard agent of one Nomad client node (see the module docs).

    ``clock`` defaults to ``Clock(cfg.time_scale)``; ``jobs`` to :func:`~.periodic.default_jobs`;
    ``dir_watcher`` builds the inotify layer (tests wrap it to inject faults).
    """

    def __init__(
        self,
        cfg: ShepardConfig,
        consul: ConsulAPI,
        nomad: NomadAPI,
        *,
        clock: Clock | None = None,
        jobs: Sequence[PeriodicJob] | None = None,
        dir_watcher: type[PyInotifyWatcher] = PyInotifyWatcher,
    ) -> None:
        self.config = cfg
        self.clock = clock or Clock(cfg.time_scale)
        self.metrics = AgentMetrics()
        self.consul: ConsulAPI = counted(consul, "consul", self.metrics)
        self.nomad: NomadAPI = counted(nomad, "nomad", self.metrics)
        self.keyspace = Keyspace(cfg.key_prefix, cfg.lock_scope)
        self.stopping = CancelEvent()
        """Set by :meth:`stop`; it also cancels the agent's blocking queries in flight."""
        self.node_name = ""
        self.node_id = ""
        self.metrics_address: str | None = None
        """``host:port`` of the metrics endpoint once started (None without ``metrics_address``)."""
        self._jobs = list(jobs) if jobs is not None else default_jobs(cfg)
        self._dir_watcher = dir_watcher
        self._session: Session | None = None
        self._session_cond = threading.Condition()
        self._heartbeat_held = False
        self._heartbeat_refused_logged = False
        self._consul_outage = Outage("Consul", self.clock)
        self._allocs: dict[str, Allocation] = {}
        self._allocs_lock = threading.Lock()
        self._rollouts = Rollouts(self)
        self._inflight: dict[str, tuple[EventKind, float]] = {}
        self._watcher: FileWatcher | None = None
        self._discovery: Discovery | None = None
        self._server: MetricsServer | None = None
        self._threads: list[threading.Thread] = []
        self._periodic: list[threading.Thread] = []  # GC, log shipping: they end (and close) when stopping
        self._started = False

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Agent:
        """Resolve the node, create the session, take the heartbeat and start every part.

        Raises ConfigError (a setting is wrong: no such node, no data dir) or ShepardError (Consul or
        Nomad unreachable), having started nothing.
        """
        cfg = self.config
        data_dir = Path(cfg.nomad_data_dir)
        if not (data_dir / "alloc").is_dir():
            raise ConfigError(
                f"nomad_data_dir: {data_dir / 'alloc'} is not a directory (set the Nomad client's data_dir)"
            )
        self.node_name, self.node_id = self._resolve_node()
        self._started = True
        self._watcher = FileWatcher(
            data_dir,
            self._on_change,
            self._dir_watcher,
            on_gone=self._on_gone,
            clock=self.clock,
            settle_time=cfg.settle_time,
            watch_secrets=cfg.watch_secrets,
            scan_interval=SCAN_INTERVAL,
        )
        self._discovery = Discovery(
            self.nomad, self.node_id, data_dir, self._on_allocations, clock=self.clock, stop=self.stopping
        )
        try:
            self._discovery.start()
            with self._session_cond:
                self._session = self._new_session()
            self._take_heartbeat()
            if cfg.metrics_address:
                self._server = self._serve_metrics(cfg.metrics_address)
                self.metrics_address = self._server.address
        except BaseException:
            self.stop(timeout=0)
            raise
        for target, name in ((self._keep_session, "session"), (self._watch_heartbeats, "heartbeats")):
            thread = threading.Thread(
                target=target, name=f"shepard-agent-{name}[{self.node_name}]", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        for job in self._jobs:
            runner = PeriodicRunner(job, self, lambda name: self.metrics.periodic_failures.labels(name).inc())
            runner.thread.start()
            self._periodic.append(runner.thread)
        log.info(
            "agent of node %s started (data dir %s, session %s%s)",
            self.node_name,
            data_dir,
            self.session_id,
            f", metrics on {self.metrics_address}" if self.metrics_address else "",
        )
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking new work (changes already seen are registered in their plans, not driven),
        let restarts in flight finish for up to ``timeout`` (default ``shutdown_timeout``) cluster
        seconds, then release every slot and the heartbeat and destroy the session. A restart
        still in flight then stays ``restarting`` in its plan for a reclaimer (or is given back if
        it was not triggered yet). Idempotent."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if not self._started:
            return
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        margin = min(5.0, timeout / 4)
        log.info("agent of node %s stopping (restarts in flight get %gs)", self.node_name, timeout - margin)
        if self._watcher is not None:
            self._watcher.close()
        self._rollouts.poke()
        self._join_workers(timeout - margin)
        with self._session_cond:
            session = self._session
            if self._rollouts.busy() and session is not None:
                log.warning("restarts still in flight at shutdown: leaving them to a reclaimer")
                session.invalidate("agent shutting down")
            self._session_cond.notify_all()
        self._join_workers(margin)
        for thread in self._periodic:  # a GC pass or a shipping round in progress finishes first
            thread.join(self.clock.real(margin))
        if session is not None:
            if self._heartbeat_held:
                try:
                    self.consul.release(self.keyspace.node_key(self.node_name), session.id)
                except ShepardError as exc:
                    log.warning("releasing the heartbeat failed (it ends with the session): %s", exc)
            session.destroy()
        if self._server is not None:
            self._server.stop()
        self._join_threads()
        close_watches(self.consul, self.nomad)  # the health watches its restarts left lingering
        log.info("agent of node %s stopped", self.node_name)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def reload(self, cfg: ShepardConfig) -> list[str]:
        """Apply a new configuration; returns the settings it could not change (see RESTART_ONLY)."""
        kept = [name for name in RESTART_ONLY if getattr(cfg, name) != getattr(self.config, name)]
        if kept:
            log.warning("config reloaded, but %s change only when the agent restarts", ", ".join(kept))
            cfg = dataclasses.replace(cfg, **{name: getattr(self.config, name) for name in kept})
        self.config = cfg
        if self._watcher is not None:
            self._watcher.settle_time = cfg.settle_time
        log.info("config reloaded")
        return kept

    # --- state for the endpoints and the workers -----------------------------------------------------

    @property
    def session(self) -> Session | None:
        """The agent's current Consul session (None before start); replaced when it is lost."""
        return self._session

    @property
    def session_id(self) -> str | None:
        """The current session's ID (None before start)."""
        session = self._session
        return session.id if session is not None else None

    def healthy(self) -> bool:
        """Liveness: started, not stopping, and every long-running part still runs."""
        threads = list(self._threads)
        if self._discovery is not None:
            threads.append(self._discovery.thread)
        return self._started and not self.stopping.is_set() and all(t.is_alive() for t in threads)

    def ready(self) -> bool:
        """Readiness: a live session is held and Nomad answers."""
        session = self._session
        reachable = self._discovery is not None and self._discovery.reachable.is_set()
        return self.healthy() and session is not None and not session.lost.is_set() and reachable

    def watched(self) -> set[TaskKey]:
        """The tasks whose files are watched now."""
        return self._watcher.watched() if self._watcher is not None else set()

    def coordinator(self) -> Coordinator | None:
        """A coordinator under the current live session (None while there is none)."""
        session = self._session
        if session is None or session.lost.is_set():
            return None
        return Coordinator(
            self.consul,
            self.nomad,
            self.keyspace,
            session,
            CoordinatorOptions.from_config(self.config, watch_nodes=True),
            clock=self.clock,
            name=self.node_name,
            observer=self._observe,
        )

    def wait_for_session(self) -> bool:
        """Block until a live session is held (True) or the agent stops (False)."""
        with self._session_cond:
            while not self.stopping.is_set():
                session = self._session
                if session is not None and not session.lost.is_set():
                    return True
                self._session_cond.wait(1.0)
        return False

    def recheck_interval(self) -> float:
        """Cluster seconds an idle rollout worker waits at most before looking at its plan again."""
        return self.config.session_ttl

    def registration_spread(self) -> float:
        """Cluster seconds the registrar waits at most (a random part of it) before writing changes."""
        return REGISTRATION_SPREAD

    def record(self, outcome: MemberOutcome) -> None:
        """Count an outcome of this agent's own restart."""
        if outcome.by != self.node_name or outcome.duration is None:
            return
        ref = outcome.target.ref
        labels = (ref.job, ref.group, ref.task)
        if outcome.outcome is Outcome.RESTARTED:
            self.metrics.restarts_succeeded.labels(*labels).inc()
        elif outcome.outcome is Outcome.FAILED:
            self.metrics.restarts_failed.labels(*labels).inc()

    # --- parts -----------------------------------------------------------------------------------------

    def _serve_metrics(self, address: str) -> MetricsServer:
        try:
            server = MetricsServer(address, self.metrics, self.healthy, self.ready)
        except OSError as exc:
            raise ConfigError(f"metrics_address: cannot listen on {address}: {exc.strerror}") from None
        server.start()
        return server

    def _resolve_node(self) -> tuple[str, str]:
        name = self.config.node_name
        if name is None:
            info = self.nomad.agent_self()
            if not info.node_name or not info.node_id:
                raise ConfigError("node_name: the local Nomad agent is not a client (no node); set node_name")
            return info.node_name, info.node_id
        for node in self.nomad.nodes():
            if node.name == name:
                return name, node.id
        raise ConfigError(f"node_name: Nomad has no client node named {name!r}")

    def _new_session(self) -> Session:
        cfg = self.config
        session = Session(
            self.consul,
            f"shepard-agent {self.node_name}",
            ttl=cfg.session_ttl,
            lock_delay=cfg.lock_delay,
            clock=self.clock,
        )
        session.create()
        self._heartbeat_held = False
        return session

    def _take_heartbeat(self) -> None:
        session = self._session
        if session is None or self._heartbeat_held:
            return
        value = json.dumps(
            {
                "node": self.node_name,
                "session": session.id,
                "version": __version__,
                "started_at": self.clock.time(),
            }
        )
        self._heartbeat_held = self.consul.acquire(self.keyspace.node_key(self.node_name), value, session.id)
        self._consul_outage.recovered()
        if self._heartbeat_held:
            log.info("heartbeat %s held by session %s", self.keyspace.node_key(self.node_name), session.id)
            self._heartbeat_refused_logged = False
        elif not self._heartbeat_refused_logged:
            self._heartbeat_refused_logged = True
            log.warning(
                "heartbeat %s is held by another session (an earlier agent whose session has not "
                "expired yet?); retrying",
                self.keyspace.node_key(self.node_name),
            )

    def _keep_session(self) -> None:
        """Replace a lost session (with backoff while Consul is down) and keep the heartbeat held."""
        while not self.stopping.is_set():
            session = self._session
            if session is None or session.lost.is_set():
                if session is not None:
                    self.metrics.sessions_lost.inc()
                    log.warning(
                        "session lost (%s): no action on its locks; creating a new one", session.lost_reason
                    )
                    session.destroy()  # if Consul still has it, its locks go now rather than at its TTL
                with self._session_cond:
                    if self.stopping.is_set():
                        return
                    self._session = None
                    try:
                        self._session = self._new_session()
                    except ShepardError as exc:
                        delay = self._consul_outage.failed("session.create", exc)
                    else:
                        delay = 0.0
                        self._consul_outage.recovered()
                        log.info("new session %s", self._session.id)
                    self._session_cond.notify_all()
                if delay:
                    self.clock.wait(self.stopping, delay)
                    continue
            try:
                self._take_heartbeat()
            except ShepardError as exc:
                self.clock.wait(self.stopping, self._consul_outage.failed("heartbeat", exc))
                continue
            session = self._session
            if session is not None:
                wait_any(self.clock, (self.stopping, session.lost), session.ttl / 2)

    def _watch_heartbeats(self) -> None:
        """Wake the rollout workers whenever an agent's heartbeat changes (an agent may have died)."""
        prefix = self.keyspace.nodes_prefix()
        index = 0
        wait = max(HEARTBEAT_WAIT, self.recheck_interval())
        while not self.stopping.is_set():
            try:
                new_index, entries = self.consul.watch(
                    prefix, index, wait, recurse=True, cancel=self.stopping
                )
            except Cancelled:
                return  # the agent stops
            except ShepardError as exc:
                index = 0
                heartbeats_seen(self.consul, (), 0.0)  # no view: holders are read until the watch answers
                self.clock.wait(self.stopping, self._consul_outage.failed("kv.watch nodes", exc))
                continue
            self._consul_outage.recovered()
            # The agents holding a heartbeat are alive (at this answer, and until the next one, which
            # comes as soon as a heartbeat is released, or after the wait and Consul's jitter of up to
            # wait / 16): the holders of their restarts need no read.
            trusted = self.clock.monotonic() + wait * 17 / 16 + self.config.session_ttl / 2
            heartbeats_seen(self.consul, (e.session for e in entries if e.session), trusted)
            if index and new_index != index:
                self._rollouts.poke()
            index = new_index

    def _join_threads(self) -> None:
        """Wait for every thread of the agent (each was told to end); log those still running."""
        threads = [*self._threads, *self._periodic, *self._rollouts.threads()]
        if self._discovery is not None and self._discovery.thread.ident is not None:
            threads.append(self._discovery.thread)
        for thread in threads:
            thread.join(THREAD_JOIN)
            if thread.is_alive():
                log.warning("agent of node %s: thread %s still runs after stop", self.node_name, thread.name)

    def _join_workers(self, seconds: float) -> None:
        deadline = self.clock.monotonic() + max(seconds, 0.0)
        for thread in self._rollouts.threads():  # the registrar too: it registers what it gathered
            thread.join(max(0.0, self.clock.real(deadline - self.clock.monotonic())))

    # --- callbacks ---------------------------------------------------------------------------------------

    def _on_allocations(self, managed: Mapping[str, ManagedAlloc]) -> None:
        """Discovery: watch new managed tasks, drop those gone."""
        watcher = self._watcher
        if watcher is None or self.stopping.is_set():
            return
        with self._allocs_lock:
            self._allocs = {alloc_id: m.alloc for alloc_id, m in managed.items()}
        wanted = {TaskKey(alloc_id, task) for alloc_id, m in managed.items() for task in m.tasks}
        current = watcher.watched()
        for key in sorted(current - wanted):
            watcher.unwatch(key)
        for key in sorted(wanted - current):
            watcher.watch(key)
        self.metrics.watched_allocations.set(len(managed))
        self.metrics.watched_tasks.set(len(wanted))
        self.metrics.inotify_fallback.set(watcher.fallback_count())

    def _on_gone(self, key: TaskKey) -> None:
        watched = self.watched()
        self.metrics.watched_tasks.set(len(watched))
        self.metrics.watched_allocations.set(len({k.alloc_id for k in watched}))

    def _on_change(self, event: ChangeEvent) -> None:
        """Watcher: a settled content change; queue it on its task's rollout worker."""
        if self.stopping.is_set():
            return
        with self._allocs_lock:
            alloc = self._allocs.get(event.key.alloc_id)
        if alloc is None:
            return
        self.metrics.change_events.labels(alloc.job_id, alloc.task_group, event.key.task).inc()
        if self._watcher is not None:
            self.metrics.inotify_fallback.set(self._watcher.fallback_count())
        self._rollouts.submit(Change(alloc, event.key.task, event.files))

    def _observe(self, event: RolloutEvent) -> None:
        """Coordinator observer: slot waits, restarts started, restart-to-healthy times."""
        if not event.alloc_id:
            return
        if event.kind is EventKind.WAITING:
            self._inflight[event.alloc_id] = (EventKind.WAITING, event.at)
            return
        previous = self._inflight.pop(event.alloc_id, None)
        if event.kind is EventKind.RESTARTING:
            scope = event.scope
            self.metrics.restarts_started.labels(scope.job, scope.group, scope.task).inc()
            if previous is not None and previous[0] is EventKind.WAITING:
                self.metrics.slot_wait.observe(max(0.0, event.at - previous[1]))
            self._inflight[event.alloc_id] = (EventKind.RESTARTING, event.at)
        elif (
            event.kind is EventKind.RESTARTED and previous is not None and previous[0] is EventKind.RESTARTING
        ):
            self.metrics.restart_to_healthy.observe(max(0.0, event.at - previous[1]))
