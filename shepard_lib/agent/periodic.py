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
from typing import TYPE_CHECKING

from shepard_lib.config import ShepardConfig

if TYPE_CHECKING:
    from shepard_lib.agent.agent import Agent

__all__ = ["PeriodicJob", "PeriodicRunner", "default_jobs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeriodicJob:
    """``run(agent)`` every ``interval(agent.config)`` cluster seconds."""

    name: str
    interval: Callable[[ShepardConfig], float]
    run: Callable[[Agent], None]


def default_jobs(cfg: ShepardConfig) -> list[PeriodicJob]:
    """The periodic jobs of an agent with ``cfg``: garbage collection (``gc_interval``) and log
    shipping (``ship_log_interval``) are added here as they land, one line each."""
    return []


class PeriodicRunner:
    """Runs one :class:`PeriodicJob` for ``agent`` until ``agent.stopping`` is set."""

    def __init__(self, job: PeriodicJob, agent: Agent, on_failure: Callable[[str], None]) -> None:
        self.job = job
        self._agent = agent
        self._on_failure = on_failure
        self.thread = threading.Thread(target=self._loop, name=f"shepard-periodic[{job.name}]", daemon=True)

    def _loop(self) -> None:
        agent = self._agent
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
