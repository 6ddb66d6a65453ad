"""The agent's rollouts: one worker thread per task (``job/group/task``), all tasks concurrently.

A change event of an allocation's task is registered in the task's plan at once by the agent's
registrar thread (so the member is visible as ``pending`` even if this agent dies while it is
busy with another restart), then queued on that task's worker, which hands each change to
:meth:`Coordinator.handle_change`, one at a time (one coordinator drives one member at a time,
see :mod:`shepard_lib.coordinator`).

**Lanes.** A worker keeps its restart slot after its member is through (``drive(...,
keep_slot=True)``) and, while it holds it, drives the task's other pending members, whichever
node they are on, one after the other: any slot holder may write any allocation's trigger key,
and Nomad on that node renders it. So a rollout across many agents runs in at most ``c`` lanes
that hand nothing over between restarts; the agents still waiting for a slot are not woken by
every restart (their blocking query is on the slot prefix, which a lane leaves alone), and when a
lane ends they find their members done (a slot wait first asks whether its member still needs a
slot). A lane gives its slot back when the plan has no pending member left. A lane's member found
healthy is finished in the txn of its next claim (``drive(..., defer_finish=True)``), its last with
the slot's release; an agent whose member another lane restarts leaves it to that lane
(``wait_for_holders=False``) and, if that lane dies, takes it over when it next looks. The registrar
gathers a node's changes into one plan write, 1 to 2 s after they settle (``registration_spread``);
a stop ends that wait and the registrar still registers them (not drives them: the other agents do,
once this node's heartbeat is released).

**No rollout depends on every agent being alive.** Once its own members are through, a worker
stays while the task's plan (every node's plan of the task with ``lock_scope: node``) still has
members pending or restarting, and drives, through :meth:`Coordinator.drive`, each member that
no live agent will: a ``pending`` member on a node whose heartbeat key
``<prefix>/nodes/<node>`` is not held by a session (its agent is dead or was never there), or a
``restarting`` one on such a node whose holder's session is gone; and, on any node, a member left
``restarting`` under this agent's own session with no claim token held here (a lane's finish whose
write failed: the member's own agent sees a live holder and leaves it). A member whose allocation Nomad
stopped, replaced (a lost node's are) or garbage-collected is settled ``skipped`` in the plan by
that drive, so the plan completes; one that is not gone but not running (its node disconnected) is
looked at again later. The worker wakes when a heartbeat changes (the agent watches the ``nodes/``
prefix) and at least every session TTL.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.config import LockScope
from shepard_lib.coordinator import Coordinator, MemberOutcome, Outcome, Target, target_for
from shepard_lib.errors import NotFound, PlanError, ShepardError
from shepard_lib.keyspace import TASK_LOCK, Keyspace, TaskRef, TaskScope
from shepard_lib.model import Allocation, AllocClientStatus
from shepard_lib.plan import Member, MemberState, Plan, PlanStore
from shepard_lib.recovery import stopped_reason
from shepard_lib.trigger import describe

__all__ = ["Change", "RolloutHost", "Rollouts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """A settled content change of ``task`` in ``alloc``; ``target`` is set once it is registered.

    When the change happened is not a host's clock time: the registration orders it by the plan's
    Consul index read when the agent handles it (``seen_index``), which is after the files changed.
    A restart claimed between the change and that read is then restarted once more (never missed).
    """

    alloc: Allocation
    task: str
    files: tuple[str, ...] = ()
    target: Target | None = None


class RolloutHost(Protocol):
    """What the workers need of the agent."""

    consul: ConsulAPI
    nomad: NomadAPI
    keyspace: Keyspace
    node_name: str
    clock: Clock
    stopping: CancelEvent

    def coordinator(self) -> Coordinator | None:
        """A coordinator under the agent's current live session; None while it has none."""
        ...

    def wait_for_session(self) -> bool:
        """Block until the agent holds a live session (True) or is stopping (False)."""
        ...

    def recheck_interval(self) -> float:
        """Cluster seconds an idle worker waits at most before looking at its plan again."""
        ...

    def registration_spread(self) -> float:
        """Cluster seconds the registrar waits at most (a random part of it) before writing changes."""
        ...

    def record(self, outcome: MemberOutcome) -> None:
        """Count an outcome in the metrics."""
        ...


class _Worker:
    """The rollout of one task on this agent."""

    def __init__(
        self,
        host: RolloutHost,
        name: tuple[str, str, str],
        lock: threading.Lock,
        done: Callable[[_Worker], None],
    ) -> None:
        self.host = host
        self.lock = lock
        self.job, self.group, self.task = name
        self.pending: dict[str, Change] = {}
        self.wake = threading.Event()
        self.busy = False  # driving a member now
        self._done = done
        self._skipped: set[tuple[str, int]] = set()  # (alloc, generation) whose drive ended skipped
        self._retry_at: dict[tuple[str, int], float] = {}  # whose drive failed, and when to try it again
        self._lane: Coordinator | None = None  # the coordinator that keeps this worker's slot, if any
        self._just_read: list[tuple[Plan, int, str]] | None = None  # plans _drive_orphan read, for _idle
        self._again: list[Target] = []  # members whose finish sent them back to pending (see _end_lane)
        self.thread = threading.Thread(
            target=self._run, name=f"shepard-rollout[{'/'.join(name)}]", daemon=True
        )

    @property
    def label(self) -> str:
        return f"{self.job}/{self.group}/{self.task}"

    def _run(self) -> None:
        try:
            while not self.host.stopping.is_set():
                changes = self._take()
                if changes:
                    self._handle(changes)
                    continue
                if self._drive_orphan():
                    continue
                self._end_lane()
                if self._again:
                    self._drive_again()
                    continue
                if not self._idle():
                    return
        except Exception:
            log.exception("rollout worker of %s failed", self.label)
        finally:
            self._end_lane()
            self._done(self)

    def _end_lane(self) -> None:
        """Give the kept slot back (with the last member's finish): no member is left for this
        worker's lane. A member that finish sent back to ``pending`` is driven again (``_again``)."""
        lane, self._lane = self._lane, None
        if lane is not None:
            try:
                self._again += lane.release_slots()
            except ShepardError as exc:  # released when the session ends anyway
                log.warning("%s: giving the restart slot back failed: %s", self.label, exc)

    def _drive_again(self) -> None:
        """Drive the members this worker restarted that a change arrived for meanwhile."""
        again, self._again = self._again, []
        for target in again:
            self._with_session(functools.partial(_drive_lane_member, target=target))

    def _take(self) -> list[Change]:
        with self.lock:
            changes = list(self.pending.values())
            self.pending.clear()
            self.wake.clear()
        return changes

    def _handle(self, changes: list[Change]) -> None:
        """Drive each change (already registered) through the coordinator.

        A change whose step failed (Consul or Nomad refused, a plan update lost every race) is not
        dropped: it is handed back after ``recheck_interval``, as many times as it takes.
        """
        since = PlanStore.mark()  # after every change here was registered (or is registered in the drive)
        for number, change in enumerate(changes):
            if self.host.stopping.is_set():
                return
            step = functools.partial(_handle_change, change=change, since=since)
            if self._with_session(step) is None:
                self._retry_later(changes[number:])
                return

    def _retry_later(self, changes: list[Change]) -> None:
        """Hand ``changes`` back after ``recheck_interval``; the lane ends first (its last finish
        written, its slot given back), so no slot waits idle and no restarted member stays
        ``restarting`` meanwhile (or for good, if the step keeps failing)."""
        self._end_lane()
        if self.host.clock.wait(self.host.stopping, self.host.recheck_interval()):
            return
        with self.lock:
            for change in changes:
                self.pending.setdefault(change.alloc.id, change)  # a newer change of it wins

    def _with_session(self, step: Callable[[Coordinator], MemberOutcome]) -> MemberOutcome | None:
        """Run ``step``; after a lost session once more under the agent's next one.

        None when it could not run (stopping, or an error, which is logged).
        """
        outcome = None
        for _ in range(2):
            coordinator = self._coordinator()
            if coordinator is None:
                return None
            self.busy = True
            try:
                outcome = step(coordinator)
            except ShepardError as exc:
                log.error("%s: %s", self.label, exc)
                return None
            finally:
                self.busy = False
            self.host.record(outcome)
            if not (outcome.outcome is Outcome.SKIPPED and coordinator.session.lost.is_set()):
                break
        return outcome

    def _coordinator(self) -> Coordinator | None:
        """The lane's coordinator while its session is the agent's current one, else a new one."""
        if not self.host.wait_for_session():
            return None
        current = self.host.coordinator()
        lane = self._lane
        if lane is not None and current is not None and lane.session is current.session:
            return lane
        self._end_lane()
        self._lane = current
        return current

    def _in_lane(self) -> bool:
        """Whether this worker keeps a restart slot (so it drives any pending member)."""
        return self._lane is not None and self._lane.keeps_slot

    # --- members nobody else will drive --------------------------------------------------------------

    def _plans(self, *, known: bool = False) -> list[tuple[Plan, int, str]]:
        """The task's plans (one, or one per node with lock_scope node) that still have work.

        ``known``: as last seen in this process (a lane choosing its next member: a stale plan
        costs a refused claim), else read consistently.
        """
        consul, keys = self.host.consul, self.host.keyspace
        if keys.lock_scope is LockScope.NODE:
            plan_keys = []
            for key in consul.keys(keys.locks_prefix()):
                try:
                    scope, kind, _ = keys.parse_lock_key(key)
                except ValueError:
                    continue
                if kind == TASK_LOCK and (scope.job, scope.group, scope.task) == (
                    self.job,
                    self.group,
                    self.task,
                ):
                    plan_keys.append(key)
        else:
            plan_keys = [keys.task_lock_key(TaskScope(self.job, self.group, self.task))]
        coordinator = self.host.coordinator()
        if coordinator is None:
            return []
        plans = []
        for key in plan_keys:
            try:
                plan, index = coordinator.plans.known(key) if known else coordinator.plans.read(key)
            except PlanError as exc:
                log.warning("%s: unreadable plan at %s: %s", self.label, key, exc)
                continue
            if plan is not None and not plan.halted and _open(plan):
                plans.append((plan, index, key))
        return plans

    def _drive_orphan(self) -> bool:
        """Drive one member that no live agent will (in a lane: any pending one); True if one was driven."""
        self._just_read = None
        try:
            lane = self._in_lane()
            since = PlanStore.mark()
            plans = self._plans(known=lane)
            keeper = self._lane if lane else None
            if keeper is not None and any(keeper.written_elsewhere(key) for _, _, key in plans):
                plans = self._plans()  # other agents' lanes wrote since: choose from what is there now
            elif not plans and lane:
                plans = self._plans()  # none left in what is known: make sure
            if not lane or not plans:
                self._just_read = plans  # read consistently: _idle decides on it if nothing is driven here
            if not plans:
                return False
            alive = set() if lane else self._alive_nodes()
            me = self._lane or self.host.coordinator()
            for plan, _, _ in plans:
                members = sorted(plan.members.items(), key=lambda kv: kv[1].alloc_index)
                if lane:
                    _RNG.shuffle(members)  # lanes spread over the pending members instead of colliding
                # pending members first: a restarting one needs its holder's session read
                members.sort(key=lambda kv: kv[1].state != MemberState.PENDING)
                for alloc_id, m in members:
                    if (alloc_id, m.generation) in self._skipped:
                        continue
                    if self._retry_at.get((alloc_id, m.generation), 0.0) > self.host.clock.monotonic():
                        continue
                    # Another live agent drives its node's members, but not one this agent left
                    # restarting under its own session (a finish it could not write): that agent
                    # sees a live holder and leaves it to this one.
                    ours = me is not None and m.session is not None and m.session == me.session.id
                    if m.node != self.host.node_name and m.node in alive and not ours:
                        continue
                    if m.state == MemberState.RESTARTING:
                        if me is None or me.driven(m):
                            continue
                    elif m.state != MemberState.PENDING:
                        continue
                    self._just_read = None
                    self._drive(alloc_id, m, since)
                    return True
        except ShepardError as exc:
            log.warning("%s: looking for members nobody drives failed: %s", self.label, exc)
        return False

    def _drive(self, alloc_id: str, member: Member, since: int) -> None:
        """Drive one member through :meth:`Coordinator.drive`, which settles it ``skipped`` when Nomad
        stopped, replaced or forgot its allocation (a member left ``restarting`` is reclaimed first).
        ``since``: a read mark taken before the plan it was chosen from was read."""
        node, key = member.node, (alloc_id, member.generation)
        ref = TaskRef(node, self.job, self.group, self.task, member.alloc_index)
        target = Target(ref, alloc_id)  # gone: no restart, so no health gate and no services
        try:
            alloc = self.host.nomad.allocation(alloc_id)
        except NotFound:
            alloc = None
        if alloc is not None and stopped_reason(alloc) is None:
            if alloc.client_status not in _LIVE:
                # Not gone, but its node does not run it now (disconnected): triggering it would fail
                # the member at healthy_deadline and halt the plan. Nomad decides it: look again later.
                log.warning(
                    "%s: member alloc %s on %s is %s, not restarting it now",
                    self.label,
                    alloc_id,
                    node,
                    alloc.client_status,
                )
                self._retry_at[key] = self.host.clock.monotonic() + self.host.recheck_interval()
                return
            target = target_for(alloc, self.task, self.host.nomad.job(self.job))
        if node != self.host.node_name:
            log.info(
                "%s: driving alloc %s of node %s, whose agent is not alive (no heartbeat)",
                self.label,
                alloc_id,
                node,
            )
        outcome = self._with_session(functools.partial(_drive_lane_member, target=target, since=since))
        if outcome is None:  # an error, logged: look at the member again after recheck_interval, not never
            self._retry_at[key] = self.host.clock.monotonic() + self.host.recheck_interval()
        elif outcome.outcome is Outcome.SKIPPED:
            self._skipped.add(key)

    def _alive_nodes(self) -> set[str]:
        """Nodes whose heartbeat key is held by a session (their agent is alive)."""
        keys = self.host.keyspace
        alive = set()
        for entry in self.host.consul.get_tree(keys.nodes_prefix(), consistent=True):
            if entry.session is not None:
                try:
                    alive.add(keys.parse_node_key(entry.key))
                except ValueError:
                    continue
        return alive

    def _idle(self) -> bool:
        """Wait for new changes or a heartbeat change while the plan has work; False when it has none."""
        plans, self._just_read = self._just_read, None
        try:
            if not (self._plans() if plans is None else plans):
                with self.lock:
                    return bool(self.pending)
        except ShepardError as exc:
            log.warning("%s: reading the plan failed: %s", self.label, exc)
        self.host.clock.wait(self.wake, self.host.recheck_interval())
        return True


_LIVE = (AllocClientStatus.RUNNING, AllocClientStatus.PENDING)
_RNG = random.Random()


def _drive_lane_member(coordinator: Coordinator, target: Target, since: int | None = None) -> MemberOutcome:
    """Drive a member in a lane: keep the slot, finish with the next claim, leave others' restarts to them."""
    return coordinator.drive(target, keep_slot=True, since=since, wait_for_holders=False, defer_finish=True)


def _handle_change(coordinator: Coordinator, change: Change, since: int) -> MemberOutcome:
    """Drive a registered change; register it first (``handle_change``) if the registrar could not.

    ``since``: a plan read mark taken after the change was registered (see :meth:`Coordinator.drive`).
    A member restarting under another live holder is left to it (its idle worker takes it over if
    the holder dies).
    """
    if change.target is not None:
        return coordinator.drive(
            change.target, keep_slot=True, since=since, wait_for_holders=False, defer_finish=True
        )
    return coordinator.handle_change(
        change.alloc, change.task, keep_slot=True, wait_for_holders=False, defer_finish=True
    )


def _open(plan: Plan) -> bool:
    return any(m.state in (MemberState.PENDING, MemberState.RESTARTING) for m in plan.members.values())


class Rollouts:
    """The agent's workers, by task; :meth:`submit` queues a change on its task's worker."""

    def __init__(self, host: RolloutHost) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._to_register: list[Change] = []
        self._registrar: threading.Thread | None = None
        self._workers: dict[tuple[str, str, str], _Worker] = {}

    def submit(self, change: Change) -> None:
        """Register ``change`` in its plan (on the registrar thread), then queue it on its task's worker."""
        with self._lock:
            self._to_register.append(change)
            if self._registrar is None or not self._registrar.is_alive():
                self._registrar = threading.Thread(
                    target=self._register_loop, name="shepard-registrar", daemon=True
                )
                self._registrar.start()
            self._registered.notify_all()

    def _register_loop(self) -> None:
        while True:
            with self._lock:
                if not self._to_register and not self._host.stopping.is_set():
                    self._registered.wait(1.0)  # poke() notifies, and the agent pokes when it stops
                if not self._to_register:
                    if self._host.stopping.is_set():
                        return
                    continue
            # Gather and spread: the node's other changes of the same burst join this one write, and
            # agents that saw one change at the same moment do not all write the plan at once. A stop
            # ends the spread, not the registration: the watcher takes the files as they are when the
            # agent starts again, so a change gathered here and not registered would be lost.
            spread = self._host.registration_spread() * _RNG.uniform(0.5, 1.0)
            self._host.clock.wait(self._host.stopping, spread)
            with self._lock:
                changes, self._to_register = self._to_register, []
            by_task: dict[tuple[str, str, str], list[Change]] = {}
            for change in changes:
                by_task.setdefault((change.alloc.job_id, change.alloc.task_group, change.task), []).append(
                    change
                )
            for name, group in by_task.items():
                registered = self._register(name, group)
                if self._host.stopping.is_set():
                    # Registered, they are pending in the plan: the other agents drive them once
                    # this node's heartbeat is released. Not registered, they are lost: say which.
                    self._report_unregistered(name, [c for c in registered if c.target is None])
                    continue
                for change in registered:
                    self._queue(name, change)
            if self._host.stopping.is_set():
                return

    @staticmethod
    def _report_unregistered(name: tuple[str, str, str], changes: list[Change]) -> None:
        if changes:
            log.error(
                "%s: agent stopping, the change(s) of allocation(s) %s could not be registered: they "
                "are not restarted for it (`shepard restart --alloc` restarts them)",
                "/".join(name),
                ", ".join(c.alloc.id for c in changes),
            )

    def _register(self, name: tuple[str, str, str], changes: list[Change]) -> list[Change]:
        """Register ``changes`` (one task's) in their plan(s); returned with their targets when
        registered, as they were otherwise (the worker then registers them through handle_change)."""
        for change in changes:
            alloc = change.alloc
            ref = TaskRef(alloc.node_name, alloc.job_id, alloc.task_group, change.task, alloc.index)
            log.info(
                "%s alloc %s: change seen in %s",
                describe(ref),
                alloc.id,
                ", ".join(change.files),
                extra={
                    "event": "change",
                    "ref": describe(ref),
                    "alloc_id": alloc.id,
                    "files": list(change.files),
                },
            )
        coordinator = self._host.coordinator()
        if coordinator is None:
            return changes
        try:
            job = self._host.nomad.job(name[0])
            targets = [target_for(c.alloc, c.task, job) for c in changes]
            scopes: dict[TaskScope, list[int]] = {}
            for i, target in enumerate(targets):
                scopes.setdefault(self._host.keyspace.scope(target.ref), []).append(i)
            for scope, indexes in scopes.items():
                # Without a seen index the registration reads the plan first (other agents and lanes
                # write it all the time: a stale one would only be refused).
                coordinator.register(scope, [targets[i] for i in indexes], job)
        except ShepardError as exc:
            log.error("%s: could not register %d change(s) yet: %s", "/".join(name), len(changes), exc)
            return changes
        return [dataclasses.replace(c, target=t) for c, t in zip(changes, targets, strict=True)]

    def _queue(self, name: tuple[str, str, str], change: Change) -> None:
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = _Worker(self._host, name, self._lock, self._finished)
                self._workers[name] = worker
                worker.thread.start()
            worker.pending[change.alloc.id] = change
            worker.wake.set()

    def poke(self) -> None:
        """Wake every idle worker (a heartbeat changed: an agent may have died) and the registrar."""
        with self._lock:
            self._registered.notify_all()
            for worker in self._workers.values():
                worker.wake.set()

    def busy(self) -> bool:
        """A worker is driving a member now."""
        with self._lock:
            return any(w.busy for w in self._workers.values())

    def threads(self) -> list[threading.Thread]:
        """Every thread the rollouts started that may still run: the registrar and the workers."""
        with self._lock:
            registrar = [self._registrar] if self._registrar is not None else []
            return registrar + [w.thread for w in self._workers.values()]

    def _finished(self, worker: _Worker) -> None:
        with self._lock:
            name = (worker.job, worker.group, worker.task)
            if self._workers.get(name) is worker:
                del self._workers[name]
                if worker.pending and not self._host.stopping.is_set():
                    # A change arrived as the worker was leaving: start another for it.
                    successor = _Worker(self._host, name, self._lock, self._finished)
                    successor.pending.update(worker.pending)
                    self._workers[name] = successor
                    successor.thread.start()
