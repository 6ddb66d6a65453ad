"""Which allocations of this node Shepard manages, followed with a blocking query (no polling).

:class:`Discovery` holds a blocking query on ``GET /v1/node/<id>/allocations`` and, every time the
node's allocations change, works out the managed tasks: those of a *running* allocation (Nomad
runs it and means to keep it) whose ``<data_dir>/alloc/<id>/<task>/local/shepard.tpl`` exists,
and keeps one it already follows while a task restarts (Nomad then reports it ``pending``). It
reports the difference to the previous answer: an allocation that appears (or is replaced by a
reschedule, which gives it a new ID), starts running, stops, or whose directory is gone is picked
up or dropped. Nomad unreachable: backoff, one log line per outage, then the query resumes.
Setting ``stop`` (the agent's ``stopping``, a :class:`~shepard_lib.cancel.CancelEvent`) cancels
the blocking query in flight: the thread ends at once, without a log line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shepard_lib.agent.outage import Outage
from shepard_lib.backends import NomadAPI
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.errors import Cancelled, ShepardError
from shepard_lib.keyspace import TEMPLATE_DESTINATION
from shepard_lib.model import Allocation, AllocClientStatus

__all__ = ["Discovery", "ManagedAlloc", "managed_tasks"]

log = logging.getLogger(__name__)

WAIT = 60.0
"""Cluster seconds one blocking query waits at most (Nomad's default is 5 minutes): also how long
an unreachable Nomad may go unnoticed while nothing changes (``/ready``)."""


@dataclass(frozen=True)
class ManagedAlloc:
    """A running allocation of this node and its Shepard-managed tasks."""

    alloc: Allocation
    tasks: tuple[str, ...]


def managed_tasks(alloc: Allocation, data_dir: Path) -> tuple[str, ...]:
    """The tasks of ``alloc`` that render ``local/shepard.tpl`` on this node (none unless it runs)."""
    if not alloc.running:
        return ()
    base = data_dir / "alloc" / alloc.id
    return tuple(sorted(t for t in alloc.task_states if (base / t / TEMPLATE_DESTINATION).is_file()))


def _restarting(alloc: Allocation) -> bool:
    """Nomad means to keep ``alloc`` running and it is pending again (a task restarts)."""
    return alloc.desired_status == "run" and alloc.client_status == AllocClientStatus.PENDING


class Discovery:
    """Follows node ``node_id``'s allocations and calls ``on_update`` with the managed ones.

    ``on_update`` gets every managed allocation by ID each time the set (or an allocation's
    ModifyIndex) changed; it runs on the discovery thread. Setting ``stop`` cancels the blocking
    query under way and ends the thread; nothing is reported after ``stop``.
    """

    def __init__(
        self,
        nomad: NomadAPI,
        node_id: str,
        data_dir: Path,
        on_update: Callable[[Mapping[str, ManagedAlloc]], None],
        *,
        clock: Clock,
        stop: CancelEvent,
    ) -> None:
        self.node_id = node_id
        self.data_dir = data_dir
        self.reachable = threading.Event()
        self._nomad = nomad
        self._on_update = on_update
        self._clock = clock
        self._stop = stop
        self._outage = Outage("Nomad", clock)
        self._last: dict[str, ManagedAlloc] = {}
        self._index = 0
        self.thread = threading.Thread(target=self._run, name="shepard-discovery", daemon=True)

    def start(self) -> None:
        """Read the node's allocations once (ShepardError when Nomad does not answer), report them,
        then follow them on a thread."""
        self._index, allocs = self._nomad.watch_node_allocations(self.node_id, 0, WAIT, cancel=self._stop)
        self.reachable.set()
        self._report(allocs)
        self.thread.start()

    def _run(self) -> None:
        index = self._index
        while not self._stop.is_set():
            try:
                index, allocs = self._nomad.watch_node_allocations(
                    self.node_id, index, WAIT, cancel=self._stop
                )
            except Cancelled:
                return  # the agent stops
            except ShepardError as exc:
                if self._stop.is_set():  # failed as the agent stopped: no outage to report
                    return
                self.reachable.clear()
                index = 0
                self._clock.wait(self._stop, self._outage.failed("node.allocations", exc))
                continue
            self._outage.recovered()
            self.reachable.set()
            if self._stop.is_set():
                return
            self._report(allocs)

    def _report(self, allocs: list[Allocation]) -> None:
        managed = {}
        for alloc in allocs:
            known = self._last.get(alloc.id)
            if known is not None and _restarting(alloc):
                # A restarting task makes its allocation "pending" for a while: keep watching it.
                managed[alloc.id] = ManagedAlloc(alloc, known.tasks)
            elif tasks := managed_tasks(alloc, self.data_dir):
                managed[alloc.id] = ManagedAlloc(alloc, tasks)
        if managed != self._last:
            self._last = managed
            self._on_update(managed)
