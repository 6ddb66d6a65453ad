"""Periodic jobs the agent runs beside its rollouts (garbage collection, log shipping).

A :class:`PeriodicJob` is a name, an interval read from the configuration (so a SIGHUP reload
changes it) and a callable that gets the running agent. Each job runs on its own thread, first one
interval after the agent starts; a job that raises is logged and counted, and runs again at its
next interval. A capability plugs in with one line in :func:`default_jobs`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from shepard_lib.backends import NomadListAPI
from shepard_lib.config import ShepardConfig
from shepard_lib.gc import GCScope, collect_garbage
from shepard_lib.logship import LogShipper

if TYPE_CHECKING:
    from shepard_lib.agent.agent import Agent

__all__ = ["PeriodicJob", "PeriodicRunner", "ShipLogsJob", "collect_garbage_job", "default_jobs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeriodicJob:
    """``run(agent)`` every ``interval(agent.config)`` cluster seconds."""

    name: str
    interval: Callable[[ShepardConfig], float]
    run: Callable[[Agent], None]
    close: Callable[[], None] | None = None
    """Called once when the agent stops (a job that keeps sockets or files open closes them)."""


def default_jobs(cfg: ShepardConfig) -> list[PeriodicJob]:
    """The periodic jobs of an agent with ``cfg``, one line each: garbage collection every
    ``gc_interval``; log shipping every ``ship_log_interval`` when ``log_shipping.enabled``."""
    jobs = [PeriodicJob("gc", lambda c: c.gc_interval, collect_garbage_job)]
    if cfg.log_shipping.enabled:
        shipping = ShipLogsJob()
        jobs.append(PeriodicJob("log_shipping", lambda c: c.ship_log_interval, shipping, shipping.close))
    return jobs


def collect_garbage_job(agent: Agent) -> None:
    """This node's trigger keys, then the cluster pass under the GC leader lock (one agent at a time).

    The cluster pass holds the lock with the agent's session; without a live session it waits for
    the next interval. The Nomad backend must also be a ``NomadListAPI`` (``NomadBackend`` is).
    """
    nomad = cast(NomadListAPI, agent.nomad)
    name = f"shepard-agent {agent.node_name}"
    common: dict[str, Any] = {"clock": agent.clock, "name": name}
    report = collect_garbage(
        agent.consul, nomad, agent.config, scope=GCScope.NODE, node=agent.node_name, **common
    )
    agent.metrics.count_gc(report)
    session = agent.session
    if session is not None and not session.lost.is_set():
        report = collect_garbage(
            agent.consul, nomad, agent.config, scope=GCScope.CLUSTER, session=session, **common
        )
        agent.metrics.count_gc(report)


class ShipLogsJob:
    """Ships this node's task logs at each run, keeping one :class:`LogShipper` (its sinks, its
    counters, exposed in the agent's metrics) from the first run on."""

    def __init__(self) -> None:
        self._shipper: LogShipper | None = None

    def close(self) -> None:
        """Close the shipper's sinks (the agent stopped)."""
        if self._shipper is not None:
            self._shipper.close()

    def __call__(self, agent: Agent) -> None:
        if self._shipper is None:
            self._shipper = LogShipper.for_node(agent.config, agent.nomad, agent.node_name)
            agent.metrics.add_log_shipping(self._shipper.metrics)
        report = self._shipper.ship_once()
        if not report.ok:
            problems = [f"{s.name}: {s.error}" for s in report.sinks if s.error is not None]
            problems += [report.source_error] if report.source_error else []
            problems += report.stream_errors
            log.warning(
                "log shipping round incomplete (%s); the rest ships at the next round", "; ".join(problems)
            )


class PeriodicRunner:
    """Runs one :class:`PeriodicJob` for ``agent`` until ``agent.stopping`` is set."""

    def __init__(self, job: PeriodicJob, agent: Agent, on_failure: Callable[[str], None]) -> None:
        self.job = job
        self._agent = agent
        self._on_failure = on_failure
        self.thread = threading.Thread(target=self._loop, name=f"shepard-periodic[{job.name}]", daemon=True)

    def _loop(self) -> None:
        agent = self._agent
        try:
            while not agent.clock.wait(agent.stopping, self.job.interval(agent.config)):
                try:
                    self.job.run(agent)
                except Exception:
                    log.exception(
                        "periodic job %s failed; it runs again in %gs",
                        self.job.name,
                        self.job.interval(agent.config),
                    )
                    self._on_failure(self.job.name)
        finally:
            if self.job.close is not None:
                self.job.close()
