"""The per-allocation restart flow of docs/design.md section 4: plan, slot, claim, trigger, health, finish.

A :class:`Coordinator` works under one :class:`~shepard_lib.session.Session`. An agent calls
:meth:`Coordinator.handle_change` when the files of an allocation's task changed; the rolling
restart (:mod:`shepard_lib.rollout`) registers many allocations with :meth:`Coordinator.register`
and calls :meth:`Coordinator.drive` for each, so agents and rollouts cooperate through the same
plan and the same slots instead of racing each other.

The happy path of one member (:meth:`Coordinator._claim`) is three Consul transactions and the
health wait: take a slot (its ModifyIndex is the fencing token of this acquisition); check that
Nomad still runs the allocation; claim the member and trigger its restart in **one** txn (CAS
``pending`` -> ``restarting`` with a fresh holder token on the plan's ModifyIndex, ``check-session``
and ``check-index`` on the slot, ``set`` of the trigger key: the claim is refused while
``concurrent_lock_count`` members are down, and nothing is triggered without the slot); wait for
health; finish (``done``/``failed``) and release the slot in one txn (plan CAS + slot ``unlock``).
With method nomad_api the restart is Nomad's API call after the claim (Nomad cannot join a Consul
transaction). The plan a step acts on is the last one this process saw (a stale one only costs a
refused CAS and a read); what ends a drive (the member settled, the plan halted) is read first.

``drive`` loops until the member is no longer its business:

- ``pending`` in a ``planned`` plan: first take over any member left ``restarting`` that nobody
  drives (its holder's session is gone, or its claim token is held by no coordinator of its
  session), then run the happy path. A claim refused because the plan is full waits for a plan
  change (or for a failed member's task to become healthy again);
- ``restarting`` and nobody drives it: take a slot and reclaim it; trigger again only with method
  nomad_api and when the task did not restart since the claim (with consul_key the claim carried
  its trigger);
- ``restarting`` and driven by a live holder: wait (blocking query on the plan);
- ``done``, ``failed``, ``skipped``, or the plan halted (failed/aborted): stop and report.

What is recovery rather than the happy path (ambiguous Nomad restart calls, allocations Nomad took
away, members nobody drives) is decided in :mod:`shepard_lib.recovery`.

Losing the session stops the flow cleanly: a claimed member that was not triggered (nomad_api) is
given back; one that was triggered stays ``restarting`` under the dead session, for a reclaimer.
Without a ``session_factory`` (an agent) the member is then reported skipped; with one (a
rollout worker, which must take every member it was given to the end) the lost session is
destroyed (so Consul frees its locks now, not at its TTL) and the flow goes on under a new
session, which reclaims the member if it was left ``restarting``. Nothing is ever triggered without a held
slot (the trigger is fenced by the slot acquisition's token).

A member another participant restarted meanwhile is reported ``restarted``, with ``by`` naming
that participant. A member whose task restarted is never reported skipped.

Every log line names the task: ``node/job/group/task[alloc_index] alloc <id>``.
"""

from __future__ import annotations

import enum
import logging
import threading
import uuid
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shepard_lib.backends import ConsulAPI, NomadAPI, TxnOp
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import HealthSource, RestartMethod, ShepardConfig
from shepard_lib.errors import (
    BackendError,
    Cancelled,
    HealthTimeout,
    LockLost,
    LockTimeout,
    NotFound,
    PlanError,
    ShepardError,
    TaskFailed,
)
from shepard_lib.health import HealthGate, restarted
from shepard_lib.keyspace import Keyspace, TaskRef, TaskScope
from shepard_lib.locks import RestartSlots, Slot, SlotNotNeeded
from shepard_lib.model import Allocation, Job, TaskState
from shepard_lib.plan import (
    ConcurrencyFull,
    Member,
    MemberSpec,
    MemberState,
    MemberUnavailable,
    Plan,
    PlanSettings,
    PlanStore,
    claim,
    down,
    finish,
    new_plan,
    reclaim,
    recover,
    register,
    require,
    resolve_settings,
    skip,
    unclaim,
)
from shepard_lib.recovery import (
    GC_REASON,
    Holders,
    TriggerOutcome,
    gone_reason,
    no_longer_down,
    reclaim_decision,
    stopped_reason,
    trigger_outcome,
)
from shepard_lib.session import Session, live_here
from shepard_lib.trigger import Trigger, describe

__all__ = [
    "Coordinator",
    "CoordinatorOptions",
    "EventKind",
    "MemberOutcome",
    "Observer",
    "Outcome",
    "RolloutEvent",
    "SimulatedCrash",
    "Step",
    "Target",
]

log = logging.getLogger(__name__)

PLAN_WAIT = 15.0
"""Cluster seconds a waiter's blocking query (on the plan, on the slots) lasts at most, unless the
session's TTL is longer (see :meth:`Coordinator._max_wait`)."""

SESSION_ATTEMPTS = 3
"""Sessions :meth:`Coordinator.drive` may lose for one member (with a session factory) before it skips it."""

INTERRUPTED = "not restarted: the rollout was interrupted before its restart started"
"""The reason of a member skipped because :class:`Coordinator`'s ``stop`` was set."""


class Step(enum.StrEnum):
    """Protocol steps, as passed to the fault hook (test hook) right after each one."""

    REGISTERED = "registered"
    SLOT = "slot"
    CLAIMED = "claimed"
    TRIGGERED = "triggered"
    HEALTHY = "healthy"
    FINISHED = "finished"


class SimulatedCrash(BaseException):
    """Test hook: raised by a fault hook to stop a coordinator as if its process died.

    The coordinator then runs no cleanup at all: it releases no slot and writes no plan update.
    It derives from BaseException so that ordinary ``except Exception`` handlers do not catch it.
    """


class Outcome(enum.StrEnum):
    """What became of one allocation."""

    RESTARTED = "restarted"
    FAILED = "failed"
    SKIPPED = "skipped"


class EventKind(enum.StrEnum):
    """What a rollout observer is told."""

    PLANNED = "planned"  # members registered; detail: how many
    WAITING = "waiting"  # waiting for a restart slot
    RESTARTING = "restarting"  # claimed and triggered (or reclaimed)
    RESTARTED = "restarted"  # healthy: done
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class RolloutEvent:
    """One thing that happened in a rollout; ``at`` is cluster Unix time."""

    kind: EventKind
    scope: TaskScope
    alloc_id: str
    at: float
    ref: TaskRef | None = None
    detail: str = ""
    count: int = 0


class Observer(Protocol):
    """Receives rollout events (a progress display, a test); must not block and must not raise."""

    def __call__(self, event: RolloutEvent) -> None:
        """Handle one event."""
        ...


@dataclass(frozen=True)
class Target:
    """One allocation's task to restart, with the Consul services its health is judged by."""

    ref: TaskRef
    alloc_id: str
    services: tuple[str, ...] = ()

    def spec(self) -> MemberSpec:
        """The plan member for this target."""
        return MemberSpec(self.alloc_id, self.ref.node, self.ref.alloc_index)


@dataclass(frozen=True)
class MemberOutcome:
    """What :meth:`Coordinator.drive` did for one allocation.

    ``by`` names who restarted it (this coordinator or another holder), ``duration`` is cluster
    seconds from the slot to the verdict when this coordinator restarted it, ``reclaimed`` tells
    that it finished a dead holder's restart. ``stopped`` marks a member skipped because Nomad
    stopped, replaced or garbage-collected its allocation: there is nothing left to restart.
    """

    target: Target
    outcome: Outcome
    reason: str = ""
    generation: int = 0
    by: str = ""
    duration: float | None = None
    reclaimed: bool = False
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        ref = self.target.ref
        return {
            "alloc_id": self.target.alloc_id,
            "node": ref.node,
            "job": ref.job,
            "group": ref.group,
            "task": ref.task,
            "alloc_index": ref.alloc_index,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "generation": self.generation,
            "by": self.by,
            "duration": self.duration,
            "reclaimed": self.reclaimed,
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class CoordinatorOptions:
    """How restarts are done; cluster seconds. ``concurrency``/``max_failures`` are defaults for new plans."""

    method: RestartMethod = RestartMethod.CONSUL_KEY
    health_source: HealthSource = HealthSource.CONSUL
    min_healthy_time: float = 10.0
    healthy_deadline: float = 300.0
    slot_timeout: float = 3600.0
    concurrency: int = 1
    max_failures: int = 1
    error_attempts: int = 5
    watch_nodes: bool = False
    """Health gates follow each allocation's Consul node instead of its services
    (:mod:`shepard_lib.health`): for a participant whose restarts run beside other processes' (the
    agent); one process that restarts a whole task shares each service's watch instead."""

    @classmethod
    def from_config(cls, cfg: ShepardConfig, **overrides: Any) -> CoordinatorOptions:
        """Options from the configuration; ``overrides`` that are None are ignored."""
        values: dict[str, Any] = {
            "method": cfg.restart_method,
            "health_source": cfg.health_source,
            "min_healthy_time": cfg.min_healthy_time,
            "healthy_deadline": cfg.healthy_deadline,
            "slot_timeout": cfg.slot_timeout,
            "concurrency": cfg.concurrency,
            "max_failures": cfg.max_failures,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class _RefLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the task ref and the allocation; a decision line (one logged with an
    ``event`` extra) also gets them as the fields ``ref`` and ``alloc_id`` (``--log-format json``)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        context = self.extra or {}
        fields = kwargs.get("extra")
        if fields and "event" in fields:
            kwargs["extra"] = {"ref": context.get("ref"), "alloc_id": context.get("alloc_id"), **fields}
        return f"{context.get('prefix', '')}: {msg}", kwargs


def target_for(alloc: Allocation, task: str, job: Job) -> Target:
    """The :class:`Target` of ``task`` in ``alloc``; services from the task and its group."""
    group = job.group(alloc.task_group)
    spec = group.task(task) if group is not None else None
    services = (spec.services if spec else ()) + (group.services if group else ())
    ref = TaskRef(
        node=alloc.node_name, job=alloc.job_id, group=alloc.task_group, task=task, alloc_index=alloc.index
    )
    return Target(ref=ref, alloc_id=alloc.id, services=tuple(dict.fromkeys(services)))


class Coordinator:
    """Restarts allocations through the plan and the restart slots, under one session.

    ``name`` identifies this coordinator in plans and slot values (an agent's node, a rollout).
    ``session_factory`` makes a new (not yet created) session to go on with when :attr:`session`
    is lost; without it a lost session ends :meth:`drive` with the member skipped. Once ``stop`` is
    set (an operator interrupted the rollout) :meth:`drive` starts no new restart: a member it has
    not claimed is skipped (:data:`INTERRUPTED`), one it is restarting is seen through. ``fault_hook``
    is a test hook: it is called after each :class:`Step` and may raise :class:`SimulatedCrash`
    to stop the coordinator without any cleanup (or block, to pause a live holder). Several
    coordinators may share one session (each claim carries its own holder token); one
    coordinator serves one thread.

    ``drive(target, keep_slot=True)`` keeps the restart slot after the member is finished, for the
    next member of the same task (a rollout worker's next target, an agent's lane): the next
    drive goes on under the same slot, without giving it up and taking it again, and nobody
    waiting for a slot is woken for nothing. The caller gives kept slots back with
    :meth:`release_slots` when it has no more work.
    """

    def __init__(
        self,
        consul: ConsulAPI,
        nomad: NomadAPI,
        keyspace: Keyspace,
        session: Session,
        options: CoordinatorOptions,
        *,
        clock: Clock = REAL_CLOCK,
        name: str | None = None,
        observer: Observer | None = None,
        session_factory: Callable[[], Session] | None = None,
        fault_hook: Callable[[Step, Target], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.consul = consul
        self.nomad = nomad
        self.keyspace = keyspace
        self.session = session
        self.options = options
        self.name = name or session.name
        self.plans = PlanStore(consul, clock=clock)
        self._clock = clock
        self._observer = observer
        self._session_factory = session_factory
        self._fault_hook = fault_hook
        self._stop = stop
        self._triggers: dict[RestartMethod, Trigger] = {}
        self._gates: dict[HealthSource, HealthGate] = {}
        self._deadline = 0.0
        self._triggered: set[str] = set()  # members this coordinator triggered (or reclaimed) in drive
        self._keep_slot = False
        self._since = 0  # see drive
        self._wait_for_holders = True
        self._defer_finish = False
        self._deferred: _Deferred | None = None  # a healthy member's finish, written with the next claim
        self._holders = Holders(consul, session, clock=clock)
        self._kept: _Held | None = None  # the slot kept after a member, for the next (see drive)

    # --- planning ----------------------------------------------------------------------------

    def plan_key(self, scope: TaskScope) -> str:
        """The ``task_lock`` key of ``scope``."""
        return self.keyspace.task_lock_key(scope)

    def settings_for(self, job: Job, group: str) -> PlanSettings:
        """Concurrency and max_failures for a new plan of ``job``/``group`` (ConfigError on bad meta)."""
        return resolve_settings(
            job, group, concurrency=self.options.concurrency, max_failures=self.options.max_failures
        )

    def register(
        self,
        scope: TaskScope,
        targets: Sequence[Target],
        job: Job,
        settings: PlanSettings | None = None,
        *,
        seen_index: int | None = None,
        live: Sequence[str] | None = None,
        join: bool = False,
    ) -> Plan:
        """Register ``targets`` (all of ``scope``) as needing a restart, in one CAS update.

        ``seen_index`` is the plan's ModifyIndex read after the change was seen (default: the
        index of a consistent read made now, kept when a write whose answer was lost is tried
        again, so that a member restarted meanwhile counts as covered, not as a new change),
        ``live`` every live allocation of the job (settled members of the others are dropped),
        ``join`` joins a planned plan without a new generation; see :func:`shepard_lib.plan.register`.
        ``settings`` (default: :meth:`settings_for`) apply only if this creates or reopens the plan,
        which then records this coordinator's restart method and health source.
        """
        settings = settings or self.settings_for(job, scope.group)
        group = job.group(scope.group)
        count = group.count if group is not None else len(targets)
        now = self._clock.time()
        method, source = self.options.method.value, self.options.health_source.value
        seen: list[int] = [] if seen_index is None else [seen_index]

        def change(plan: Plan | None, index: int) -> Plan:
            if not seen:
                seen.append(index)
            base = plan or new_plan(
                scope.job,
                scope.group,
                scope.task,
                scope.node,
                instance_count=count,
                settings=settings,
                now=now,
                method=method,
                health_source=source,
            )
            return register(
                base,
                [t.spec() for t in targets],
                now=now,
                index=index,
                seen_index=seen[0],
                settings=settings,
                instance_count=count,
                method=method,
                health_source=source,
                live=live,
                join=join,
            )

        plan = self.plans.update_at(self.plan_key(scope), change, read_first=seen_index is None)
        for target in targets:
            self._log(target).info(
                "registered in plan %s (generation %d, %s, concurrency %d)",
                plan.label,
                plan.generation,
                plan.status.value,
                plan.concurrent_lock_count,
                extra={"event": "registered"},
            )
            self._hook(Step.REGISTERED, target)
        self._emit(EventKind.PLANNED, scope, "", detail=plan.status.value, count=len(targets))
        return plan

    def change_mark(self, scope: TaskScope) -> int:
        """The ``seen_index`` of a change seen now: the plan's ModifyIndex, read consistently (0: no plan)."""
        return self.plans.read(self.plan_key(scope))[1]

    def handle_change(
        self,
        alloc: Allocation,
        task: str,
        *,
        seen_index: int | None = None,
        keep_slot: bool = False,
        wait_for_holders: bool = True,
        defer_finish: bool = False,
    ) -> MemberOutcome:
        """The agent's flow for a change of ``task`` in ``alloc``: register, then :meth:`drive`.

        ``seen_index`` is :meth:`change_mark` taken when the change was seen (default: now); the
        other options are :meth:`drive`'s.
        """
        job = self.nomad.job(alloc.job_id)
        target = target_for(alloc, task, job)
        scope = self.keyspace.scope(target.ref)
        self.register(scope, [target], job, seen_index=seen_index)
        return self.drive(
            target, keep_slot=keep_slot, wait_for_holders=wait_for_holders, defer_finish=defer_finish
        )

    # --- the flow ----------------------------------------------------------------------------

    def drive(
        self,
        target: Target,
        *,
        keep_slot: bool = False,
        since: int | None = None,
        wait_for_holders: bool = True,
        defer_finish: bool = False,
    ) -> MemberOutcome:
        """Bring ``target`` through the plan until it is done, failed or not ours to do (see module docs).

        ``keep_slot``: keep the slot for the next member of the task (see the class docs).
        ``since``: a :meth:`PlanStore.mark` taken after ``target``'s change was registered (default:
        now). What ends the drive (the member settled) is concluded on a consistent plan read made
        after it: one read can end the drives of several members registered before it.
        ``wait_for_holders`` False: a member restarting under another live holder is left to it
        (reported ``restarted``, ``by`` the holder, without a duration) instead of waited for: an
        agent, whose idle worker takes the member over if that holder dies (see
        :mod:`shepard_lib.agent.rollouts`).
        ``defer_finish`` (with ``keep_slot``): a member found healthy is reported at once, and its
        finish is written in the same txn as the next claim under the kept slot (one write for
        both), or with :meth:`release_slots`; its claim token stays held until then, so nobody
        takes it for abandoned. A drive of the deferred member itself (a new change of it) writes
        that finish first, alone, and restarts the member again if the change sent it back to
        ``pending``.
        """
        scope = self.keyspace.scope(target.ref)
        deferred = self._deferred
        if deferred is not None and (
            deferred.key != self.plan_key(scope) or deferred.target.alloc_id == target.alloc_id
        ):
            # Another task's finish waits for no claim of this one; the target's own finish comes
            # first: a new change of it (rerun) sends it back to pending, to be claimed in this drive.
            self._flush_finish()
        self._keep_slot = keep_slot
        self._defer_finish = defer_finish and keep_slot
        self._since = self.plans.mark() if since is None else since
        self._wait_for_holders = wait_for_holders
        kept_prefix = self._kept.slots.prefix.rstrip("/") if self._kept is not None else None
        if kept_prefix not in (None, self.keyspace.slot_prefix(scope).rstrip("/")):
            self.release_slots()  # a slot kept for another task
        rlog = self._log(target)
        errors = 0
        sessions = 1
        self._deadline = self._clock.monotonic() + self.options.slot_timeout
        self._triggered.discard(target.alloc_id)
        while True:
            if self._stopped(target):
                return self._skip(target, scope, INTERRUPTED, rlog)
            if self.session.lost.is_set():
                reason = f"session lost ({self.session.lost_reason})"
                if self._session_factory is None or sessions >= SESSION_ATTEMPTS:
                    return self._skip(target, scope, reason, rlog)
                sessions += 1
                try:
                    self._replace_session(self._session_factory, reason, rlog)
                except ShepardError as exc:
                    return self._skip(target, scope, f"{reason}, and no new session: {exc}", rlog)
                continue
            try:
                result = self._step(target, scope, rlog)
            except (BackendError, PlanError) as exc:  # PlanError: a plan update that kept conflicting
                errors += 1
                if errors >= self.options.error_attempts:
                    return self._skip(target, scope, f"giving up after {errors} errors: {exc}", rlog)
                rlog.warning("Consul or Nomad failed, trying again: %s", exc)
                continue
            except LockLost as exc:
                if self._stopped(target):
                    continue  # the slot wait was cancelled by the stop: the top of the loop skips
                gone = self._session_gone()
                if gone and self._session_factory is not None:
                    continue  # the top of the loop goes on with a new session
                if not gone:
                    # The session lives, the slot acquisition does not (a lock of this session applied
                    # late moved its token): nothing was written; the slot was given back, take another.
                    errors += 1
                    if errors < self.options.error_attempts:
                        rlog.warning("the slot is no longer this acquisition's, trying again: %s", exc)
                        continue
                return self._skip(target, scope, str(exc), rlog)
            except LockTimeout as exc:
                return self._skip(target, scope, str(exc), rlog)
            if result is not None:
                return result

    @property
    def keeps_slot(self) -> bool:
        """Whether a slot kept by ``drive(..., keep_slot=True)`` is held (for the next member)."""
        kept = self._kept
        return kept is not None and kept.holding is not None and not kept.slot.lost.is_set()

    def release_slots(self) -> list[Target]:
        """Write a deferred finish and give back the slot kept by ``drive(..., keep_slot=True)``, if
        any (one txn for both when there are both). Returns the deferred member when its finish sent
        it back to ``pending`` (a change arrived during its restart: it needs one more)."""
        kept, self._kept = self._kept, None
        again = self._flush_finish(kept)
        if kept is not None:
            kept.release()
        return again

    def _flush_finish(self, release: _Held | None = None) -> list[Target]:
        """Write the deferred finish alone (and release ``release``'s slot in the same txn); errors are
        logged: the member then stays ``restarting`` under this session's claim until a reclaimer,
        seeing the claim unheld (a coordinator of this session: an agent's worker looks for such
        members on every node) or the session gone, finds its task healthy and finishes it.
        Returns the member when the finish sent it back to ``pending``."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return []
        rlog = self._log(deferred.target)
        alloc_id = deferred.target.alloc_id
        try:
            plan = self._finish(
                deferred.key, deferred.target, release, holder=deferred.holder, ok=True, error=None
            )
        except MemberUnavailable as exc:
            rlog.warning("restart seen through, but the member is no longer ours to finish: %s", exc.reason)
            return []
        except ShepardError as exc:
            rlog.warning("could not write its finish (%s); it stays restarting for a reclaimer", exc)
            return []
        finally:
            self.session.drop(deferred.holder)
        member = plan.members.get(alloc_id)
        if member is not None and member.state == MemberState.PENDING:
            rlog.info("restarted, but a new change arrived meanwhile: it is restarted once more")
            return [deferred.target]
        return []

    def _with_deferred(
        self, key: str, change: Callable[[Plan | None, int], Plan]
    ) -> Callable[[Plan | None, int], Plan]:
        """``change`` applied after the deferred finish (if any, of ``key``): one write for both."""
        deferred = self._deferred
        if deferred is None or deferred.key != key:
            return change

        def both(plan: Plan | None, index: int) -> Plan:
            try:
                plan = finish(
                    require(plan, key),
                    deferred.target.alloc_id,
                    holder=deferred.holder,
                    ok=True,
                    now=self._clock.time(),
                    index=index,
                )
            except MemberUnavailable as exc:  # taken over meanwhile: as an immediate finish would have found
                self._log(deferred.target).warning(
                    "restart seen through, but the member is no longer ours to finish: %s", exc.reason
                )
            return change(plan, index)

        return both

    def _stopped(self, target: Target) -> bool:
        """Whether an operator's stop ends ``target`` here: not once this coordinator triggered it
        (a restart in flight is seen through, under a new session if need be)."""
        return self._stop is not None and self._stop.is_set() and target.alloc_id not in self._triggered

    def _session_gone(self) -> bool:
        """Whether the session is lost, asking Consul now (a fenced write refused may be the first sign)."""
        try:
            self.session.verify()
        except LockLost:
            return True
        except BackendError:
            pass
        return self.session.lost.is_set()

    def _replace_session(self, factory: Callable[[], Session], why: str, rlog: _RefLog) -> None:
        """Destroy the lost session and go on with a new one (ShepardError if it cannot be created).

        Destroying frees what the lost session still holds in Consul at once (after the
        lock-delay) instead of at its TTL, so a restart it left in flight can be reclaimed now.
        """
        self.release_slots()
        self.session.destroy()
        session = factory()
        session.create()
        self.session = session
        rlog.warning("%s; going on under a new session", why)

    def _step(self, target: Target, scope: TaskScope, rlog: _RefLog) -> MemberOutcome | None:
        """Look at the plan and do what the member needs; None: look again."""
        key = self.plan_key(scope)
        plan, index = self.plans.known(key)
        if _concludes(plan, target.alloc_id) and not self.plans.read_since(key, self._since):
            plan, index = self.plans.read(key)
        member = plan.members.get(target.alloc_id) if plan else None
        if plan is None or member is None:
            return self._skip(target, scope, "not in the plan (it was deleted or replaced)", rlog)
        if member.state in (MemberState.DONE, MemberState.FAILED):
            return self._finished_by_other(target, scope, member)
        if member.state == MemberState.SKIPPED:
            return self._skip(target, scope, member.error or "skipped", rlog, stopped=True)
        if member.state == MemberState.RESTARTING:
            bound = self._live_holder(member)
            if bound is not None and not self._wait_for_holders:
                by = member.holder_name or ""
                return MemberOutcome(
                    target, Outcome.RESTARTED, f"being restarted by {by}", member.generation, by=by
                )
            if bound is not None:
                self._wait(key, index, [bound], f"its restart by {member.holder_name}", rlog)
                return None
            rlog.warning("holder %s of its restart in flight is gone; reclaiming", member.holder_name)
            return self._attempt(target, scope, plan, rlog)
        if plan.halted:
            return self._skip(
                target, scope, f"plan {plan.label} is {plan.status.value}: {plan.halt_reason}", rlog
            )
        orphan = self._orphan(plan, scope, target)
        if orphan is not None:
            self._log(orphan).warning("nobody drives its restart in flight; %s takes it over", self.name)
            self._attempt(orphan, scope, plan, self._log(orphan))
            return None
        return self._attempt(target, scope, plan, rlog)

    def _orphan(self, plan: Plan, scope: TaskScope, target: Target) -> Target | None:
        """A member left ``restarting`` that nobody drives (other than ``target``), as a target."""
        for alloc_id, m in sorted(
            plan.in_state(MemberState.RESTARTING).items(), key=lambda i: i[1].alloc_index
        ):
            if alloc_id != target.alloc_id and self._live_holder(m) is None:
                ref = TaskRef(m.node, scope.job, scope.group, scope.task, m.alloc_index)
                return Target(ref, alloc_id, target.services)
        return None

    def _wait(self, key: str, index: int, bounds: Sequence[float], what: str, rlog: _RefLog) -> None:
        """Wait for the plan to change past ``index`` (at most the shortest bound, and PLAN_WAIT)."""
        if self._clock.monotonic() >= self._deadline:
            raise LockTimeout(f"still waiting for {what} after slot_timeout {self.options.slot_timeout:g}s")
        rlog.info("waiting for %s", what)
        try:
            self.plans.watch(key, index, min([self._max_wait(), *bounds]), cancel=self.session.lost)
        except Cancelled:
            self.session.check()  # the session was lost while the query waited: LockLost
            raise

    def _attempt(self, target: Target, scope: TaskScope, plan: Plan, rlog: _RefLog) -> MemberOutcome | None:
        """One pass with a slot: claim or reclaim, trigger, health, finish. None: look at the plan again."""
        slots = RestartSlots(
            self.consul,
            self.keyspace.slot_prefix(scope),
            plan.concurrent_lock_count,
            clock=self._clock,
            max_wait=self._max_wait(),
            logger=rlog,
        )
        holder_text = f"{self.name} alloc {target.alloc_id}"
        self._emit(EventKind.WAITING, scope, target.alloc_id, ref=target.ref)
        rlog.debug("waiting for a restart slot of %s (%d slots)", plan.label, plan.concurrent_lock_count)
        remaining = max(0.0, self._deadline - self._clock.monotonic())
        try:
            held = self._kept_for(slots, rlog)
            if held is None:
                self._flush_finish()  # a deferred finish waits for no slot
            held = held or _Held(
                slots,
                # the slot wait checks the session; an operator's stop ends it, unless ours is in flight
                slots.acquire(
                    self.session,
                    holder=holder_text,
                    timeout=remaining,
                    cancel=None if target.alloc_id in self._triggered else self._stop,
                    needed=lambda: self._needs_slot(self.plan_key(scope), target.alloc_id),
                ),
            )
        except SlotNotNeeded:
            return None  # someone else took it on while this waited: look at the plan again
        try:
            self._hook(Step.SLOT, target)
            result = self._with_slot(target, scope, held, rlog)
        except SimulatedCrash:
            raise
        except BaseException:
            held.release()
            raise
        if self._keep_slot and held.holding is not None and not held.slot.lost.is_set():
            self._kept = held
        else:
            held.release()
        if result is _FULL:
            return self._when_full(target, scope, rlog)
        return result if isinstance(result, MemberOutcome) else None

    def _needs_slot(self, key: str, alloc_id: str) -> bool:
        """Whether ``alloc_id`` still needs a slot from this coordinator (a consistent plan read):
        pending in a plan that goes on, or restarting with nobody driving it."""
        plan, _ = self.plans.read(key)
        member = plan.members.get(alloc_id) if plan is not None else None
        if plan is None or member is None:
            return False
        if member.state == MemberState.PENDING:
            return not plan.halted
        return member.state == MemberState.RESTARTING and self._live_holder(member) is None

    def _max_wait(self) -> float:
        """Cluster seconds one blocking query of a waiter lasts at most: PLAN_WAIT, or the session's
        TTL when longer (a waiter looks again at least once per TTL, as the session renews)."""
        return max(PLAN_WAIT, self.session.ttl)

    def _kept_for(self, slots: RestartSlots, rlog: _RefLog) -> _Held | None:
        """The slot kept from the last member, if it is one of ``slots`` and still held (then
        ``slots``, which log for this member, release it)."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        if (
            kept.holding is None
            or kept.slot.lost.is_set()
            or kept.slots.prefix != slots.prefix
            or kept.slot.number >= slots.size
        ):
            kept.release()
            return None
        kept.slots = slots
        rlog.info("restart slot %s kept from the last member", kept.slot.key, extra={"event": "slot_kept"})
        return kept

    def _with_slot(self, target: Target, scope: TaskScope, held: _Held, rlog: _RefLog) -> object:
        """With a slot held: claim our pending member, or reclaim it if nobody drives it.

        Returns a MemberOutcome, None (look again) or ``_FULL`` (the claim was refused: the plan
        has ``concurrent_lock_count`` members down).
        """
        plan, _ = self.plans.known(self.plan_key(scope))
        member = plan.members.get(target.alloc_id) if plan else None
        if plan is None or member is None:
            return None
        if member.state == MemberState.RESTARTING:
            self._flush_finish()
            return self._reclaim(target, scope, held, member, rlog)
        if member.state != MemberState.PENDING or plan.halted:
            return None
        return self._claim(target, scope, held, plan, rlog)

    def _claim(self, target: Target, scope: TaskScope, held: _Held, plan: Plan, rlog: _RefLog) -> object:
        """The happy path: live allocation, claim (with consul_key: and trigger), then see it through."""
        key = self.plan_key(scope)
        alloc = self._allocation(target)
        gone = None if alloc is None else stopped_reason(alloc)
        if alloc is None or gone is not None:
            self._flush_finish()
            return self._settle_gone(target, scope, gone or GC_REASON, None, rlog)
        baseline = alloc.task_states.get(target.ref.task, TaskState(state="pending"))
        method = self._method(plan)
        with_trigger = method is RestartMethod.CONSUL_KEY
        trigger_ops = self._trigger(method).ops(target.ref, held.slot) if with_trigger else []
        holder = uuid.uuid4().hex
        self.session.hold(holder)
        try:
            plan = self._claim_write(
                key,
                lambda p, index: claim(
                    require(p, key),
                    target.alloc_id,
                    holder=holder,
                    session=self.session.id,
                    holder_name=self.name,
                    restarts_before=baseline.restarts,
                    started_before=baseline.started_at,
                    now=self._clock.time(),
                    index=index,
                ),
                trigger_ops,
            )
        except ConcurrencyFull as exc:
            self.session.drop(holder)
            rlog.info("not claimed (%s); releasing the slot", exc.reason)
            return _FULL
        except MemberUnavailable as exc:
            self.session.drop(holder)
            rlog.info("not claimed (%s); releasing the slot", exc.reason)
            return None
        except BaseException:
            self.session.drop(holder)
            raise
        if with_trigger:
            rlog.info("claimed and triggered (fenced by %s)", held.slot.key, extra={"event": "triggered"})
        member = plan.members[target.alloc_id]
        return self._see_through(
            target, scope, held, plan, member, before=baseline, must_trigger=not with_trigger, rlog=rlog
        )

    def _claim_write(
        self, key: str, change: Callable[[Plan | None, int], Plan], ops: Sequence[TxnOp]
    ) -> Plan:
        """Write a claim (and its trigger ``ops``), with the deferred finish if there is one; when the
        txn writes nothing (refused, an error) the deferred finish is written alone."""
        deferred = self._deferred
        # After a restart's health wait, other processes' lanes have most likely written the plan.
        read_first = (
            deferred is not None
            and self.written_elsewhere(key, deferred.target.alloc_id)
            and not self.plans.read_since(key, self._since)  # read for this drive already (a lane's choice)
        )
        try:
            plan = self.plans.update_at(key, self._with_deferred(key, change), ops=ops, read_first=read_first)
        except BaseException:
            if deferred is not None:
                self._flush_finish()
            raise
        if deferred is not None:
            self._deferred = None
            self.session.drop(deferred.holder)
        return plan

    def _reclaim(self, target: Target, scope: TaskScope, held: _Held, dead: Member, rlog: _RefLog) -> object:
        """Take over ``dead``'s claim (nobody drives it) and see its restart through."""
        if self._live_holder(dead) is not None:
            return None
        key = self.plan_key(scope)
        alloc = self._allocation(target)
        baseline = (
            TaskState(state="pending")
            if alloc is None
            else alloc.task_states.get(target.ref.task, TaskState(state="pending"))
        )
        holder = uuid.uuid4().hex
        self.session.hold(holder)
        try:
            plan = self.plans.update_at(
                key,
                lambda p, _index: reclaim(
                    require(p, key),
                    target.alloc_id,
                    dead_holder=dead.holder,
                    holder=holder,
                    session=self.session.id,
                    holder_name=self.name,
                    now=self._clock.time(),
                ),
            )
        except MemberUnavailable as exc:
            self.session.drop(holder)
            rlog.info("not reclaimed (%s); releasing the slot", exc.reason)
            return None
        except BaseException:
            self.session.drop(holder)
            raise
        triggered = self._method(plan) is RestartMethod.CONSUL_KEY
        before, must_trigger = reclaim_decision(dead, baseline, triggered=triggered)
        rlog.info(
            "reclaimed from %s; %s",
            dead.holder_name,
            "triggering again" if must_trigger else "it already restarted, checking its health",
            extra={"event": "reclaimed"},
        )
        member = plan.members[target.alloc_id]
        return self._see_through(
            target,
            scope,
            held,
            plan,
            member,
            before=before,
            must_trigger=must_trigger,
            rlog=rlog,
            reclaimed=True,
        )

    def _see_through(
        self,
        target: Target,
        scope: TaskScope,
        held: _Held,
        plan: Plan,
        member: Member,
        *,
        before: TaskState,
        must_trigger: bool,
        rlog: _RefLog,
        reclaimed: bool = False,
    ) -> MemberOutcome | None:
        """Claimed (holder token held): trigger if needed (nomad_api), wait for health, finish and
        release the slot. Drops the token."""
        key = self.plan_key(scope)
        holder = member.holder or ""
        started = self._clock.monotonic()
        try:
            self._hook(Step.CLAIMED, target)
            if must_trigger:
                gone = gone_reason(self.nomad, target.alloc_id)
                if gone is not None:
                    return self._settle_gone(target, scope, gone, holder, rlog)
                self._fire(target, key, held, member, rlog)
            self._triggered.add(target.alloc_id)
            self._hook(Step.TRIGGERED, target)
            self._emit(
                EventKind.RESTARTING,
                scope,
                target.alloc_id,
                ref=target.ref,
                detail="reclaimed" if reclaimed else "",
            )
            ok, error = self._wait_healthy(target, plan, before, rlog)
            self._hook(Step.HEALTHY, target)
            if not ok:
                gone = gone_reason(self.nomad, target.alloc_id)
                if gone is not None:
                    # Nomad took the allocation away during the health wait: not a failure.
                    if not self._restarted_since(target, before):
                        return self._settle_gone(target, scope, gone, holder, rlog)
                    rlog.warning("restarted, then %s: counted as restarted", gone)
                    ok, error = True, None
            if ok and self._defer_finish and self._deferrable(key, target.alloc_id):
                # Written with the next claim under the kept slot, or when the slot is given back; the
                # claim token stays held until then.
                self._deferred = _Deferred(key, target, holder)
                plan = require(self.plans.known(key)[0], key)
            else:
                try:
                    plan = self._finish(
                        key, target, None if self._keep_slot else held, holder=holder, ok=ok, error=error
                    )
                except MemberUnavailable as exc:
                    # Taken over (this claim looked abandoned to someone) or dropped from the plan.
                    rlog.warning(
                        "restart seen through, but the member is no longer ours to finish: %s", exc.reason
                    )
                    return None
        finally:
            deferred = self._deferred
            if deferred is None or deferred.holder != holder:
                self.session.drop(holder)
        self._hook(Step.FINISHED, target)
        duration = self._clock.monotonic() - started
        if plan.members[target.alloc_id].state == MemberState.PENDING:
            rlog.info("restarted, but a new change arrived meanwhile: restarting it once more")
            return None
        if plan.halted and not ok:
            rlog.error("plan %s is %s: %s", plan.label, plan.status.value, plan.halt_reason)
        if ok:
            rlog.info("restarted and healthy in %.1fs", duration, extra={"event": "healthy"})
            self._emit(EventKind.RESTARTED, scope, target.alloc_id, ref=target.ref)
        else:
            self._emit(EventKind.FAILED, scope, target.alloc_id, ref=target.ref, detail=error or "")
        outcome = Outcome.RESTARTED if ok else Outcome.FAILED
        return MemberOutcome(
            target,
            outcome,
            error or "",
            member.generation,
            by=self.name,
            duration=duration,
            reclaimed=reclaimed,
        )

    def _finish(
        self, key: str, target: Target, release: _Held | None, *, holder: str, ok: bool, error: str | None
    ) -> Plan:
        """Write the member's outcome, releasing ``release``'s slot in the same txn when it still holds it."""

        def change(p: Plan | None, index: int) -> Plan:
            return finish(
                require(p, key),
                target.alloc_id,
                holder=holder,
                ok=ok,
                now=self._clock.time(),
                index=index,
                error=error,
            )

        slot = release.holding if release is not None else None
        read_first = self.written_elsewhere(key, target.alloc_id)
        if release is not None and slot is not None:
            try:
                plan = self.plans.update_at(
                    key, change, ops=[release.slots.unlock_op(slot)], read_first=read_first
                )
            except LockLost:
                pass  # the slot is no longer this acquisition's: the outcome is written alone
            else:
                release.released_by_write()
                return plan
        return self.plans.update_at(key, change, read_first=read_first)

    def _deferrable(self, key: str, alloc_id: str) -> bool:
        """Whether ``alloc_id``'s finish may wait for the next claim: nothing else is deferred, and the
        plan last seen does not mark it ``rerun`` (then it is written now, and the member driven again)."""
        if self._deferred is not None:
            return False
        plan, _ = self.plans.known(key)
        member = plan.members.get(alloc_id) if plan is not None else None
        return member is not None and member.state == MemberState.RESTARTING and not member.rerun

    def written_elsewhere(self, key: str, alloc_id: str = "") -> bool:
        """Whether the plan at ``key`` was most likely written by another process since it was last seen
        here (while ``alloc_id``'s restart ran): it has another member restarting under a session this
        process does not hold (its holder finishes it meanwhile). Then a write after a health wait
        reads the plan first instead of having its write on the stale one refused (see
        :meth:`PlanStore.update_at`), and a lane chooses its next member from a fresh read."""
        plan, _ = self.plans.known(key)
        return plan is not None and any(
            other != alloc_id
            and m.state == MemberState.RESTARTING
            and m.session is not None
            and live_here(self.consul, m.session) is None
            for other, m in plan.members.items()
        )

    def _fire(self, target: Target, key: str, held: _Held, member: Member, rlog: _RefLog) -> None:
        """Restart through Nomad's API (method nomad_api), after checking the slot is still held.

        A failure that proves nothing restarted gives the member back and propagates; any other
        may have restarted the task, and the health gate decides.
        """
        try:
            self._trigger(RestartMethod.NOMAD_API).fire(target.ref, target.alloc_id, held.slot)
        except (LockLost, BackendError) as exc:
            if trigger_outcome(exc) is TriggerOutcome.NOT_APPLIED:
                self._give_back(key, target, member.holder or "", f"not triggered: {exc}", rlog)
                raise
            rlog.warning("restart call reported an error but may have been applied; checking health: %s", exc)

    def _when_full(self, target: Target, scope: TaskScope, rlog: _RefLog) -> MemberOutcome | None:
        """The claim was refused for the concurrency: recover failed members healthy again, or wait."""
        key = self.plan_key(scope)
        plan, index = self.plans.read(key)
        if plan is None:
            return None
        busy = down(plan)
        healthy = no_longer_down(self.nomad, self._gate(plan), busy, scope.task, target.services)
        if healthy:
            now = self._clock.time()

            def mark(p: Plan | None) -> Plan:
                current = require(p, key)
                for alloc_id in healthy:
                    current = recover(current, alloc_id, now=now)
                return current

            self.plans.update(key, mark)
            rlog.info("%d failed member(s) healthy again or gone: no longer counted as down", len(healthy))
            return None
        bounds = []
        for m in busy.values():
            if m.state == MemberState.RESTARTING:
                bound = self._live_holder(m)
                if bound is None:
                    return None  # an orphan: the next step takes it over
                bounds.append(bound)
        self._wait(key, index, bounds, f"{len(busy)} member(s) restarting or failed (the concurrency)", rlog)
        return None

    def _wait_healthy(
        self, target: Target, plan: Plan, before: TaskState, rlog: _RefLog
    ) -> tuple[bool, str | None]:
        """(True, None) when healthy; (False, why) when the task failed or timed out. LockLost propagates."""
        try:
            self._gate(plan).wait_healthy(
                target.alloc_id,
                target.ref.task,
                before=before,
                services=target.services,
                cancel=self.session.lost,
            )
        except (TaskFailed, HealthTimeout) as exc:
            rlog.error("restart failed: %s", exc, extra={"event": "failed"})
            return False, str(exc)
        return True, None

    def _allocation(self, target: Target) -> Allocation | None:
        """The allocation from Nomad, or None when Nomad no longer knows it."""
        try:
            return self.nomad.allocation(target.alloc_id)
        except NotFound:
            return None

    def _restarted_since(self, target: Target, before: TaskState) -> bool:
        alloc = self._allocation(target)
        state = alloc.task_states.get(target.ref.task) if alloc is not None else None
        return state is not None and restarted(before, state)

    def _settle_gone(
        self, target: Target, scope: TaskScope, reason: str, holder: str | None, rlog: _RefLog
    ) -> MemberOutcome | None:
        """Settle the member as skipped: Nomad stopped, replaced or forgot its allocation."""
        key = self.plan_key(scope)
        try:
            self.plans.update_at(
                key,
                lambda p, index: skip(
                    require(p, key),
                    target.alloc_id,
                    reason=reason,
                    now=self._clock.time(),
                    index=index,
                    holder=holder,
                ),
            )
        except MemberUnavailable:
            return None
        return self._skip(target, scope, reason, rlog, stopped=True)

    def driven(self, member: Member) -> bool:
        """Whether someone alive drives ``member``'s restart in flight (see :class:`Holders`)."""
        return self._live_holder(member) is not None

    def _live_holder(self, member: Member) -> float | None:
        """How long to wait for the holder driving ``member``'s restart at most; None when nobody drives it.

        A member held under another session is driven while that session lives (consistent read);
        one held under this coordinator's own session only while a coordinator of this process
        holds its claim token: several coordinators may share the session, and a claim whose
        coordinator stopped (a finish or give-back write Consul refused) would be waited for forever.
        """
        self._holders.session = self.session
        return self._holders.wait_bound(member)

    def _give_back(self, key: str, target: Target, holder: str, why: str, rlog: _RefLog) -> None:
        try:
            self.plans.update_at(
                key,
                lambda p, index: unclaim(
                    require(p, key),
                    target.alloc_id,
                    holder=holder,
                    now=self._clock.time(),
                    index=index,
                    error=why,
                ),
            )
        except (PlanError, BackendError) as exc:
            rlog.warning("could not give the member back (%s); it stays reclaimable", exc)
        else:
            rlog.warning("gave the member back: %s", why)

    # --- the plan's method and health source -----------------------------------------------------

    def _method(self, plan: Plan | None) -> RestartMethod:
        """The plan's restart method (recorded when it was created), else this coordinator's."""
        if plan is not None and plan.method:
            return RestartMethod(plan.method)
        return self.options.method

    def _trigger(self, method: RestartMethod) -> Trigger:
        if method not in self._triggers:
            self._triggers[method] = Trigger(self.consul, self.nomad, self.keyspace, method)
        return self._triggers[method]

    def _gate(self, plan: Plan | None) -> HealthGate:
        source = HealthSource(plan.health_source) if plan is not None and plan.health_source else None
        source = source or self.options.health_source
        if source not in self._gates:
            self._gates[source] = HealthGate(
                self.consul,
                self.nomad,
                source=source,
                min_healthy_time=self.options.min_healthy_time,
                healthy_deadline=self.options.healthy_deadline,
                clock=self._clock,
                watch_nodes=self.options.watch_nodes,
            )
        return self._gates[source]

    # --- helpers -----------------------------------------------------------------------------

    def _finished_by_other(self, target: Target, scope: TaskScope, member: Member) -> MemberOutcome:
        by = member.holder_name or ""
        if member.state == MemberState.DONE:
            self._emit(EventKind.RESTARTED, scope, target.alloc_id, ref=target.ref, detail=f"by {by}")
            return MemberOutcome(target, Outcome.RESTARTED, f"restarted by {by}", member.generation, by=by)
        self._emit(EventKind.FAILED, scope, target.alloc_id, ref=target.ref, detail=member.error or "")
        return MemberOutcome(target, Outcome.FAILED, member.error or "failed", member.generation, by=by)

    def _skip(
        self, target: Target, scope: TaskScope, reason: str, rlog: _RefLog, *, stopped: bool = False
    ) -> MemberOutcome:
        if target.alloc_id in self._triggered:
            # Its task restarted (we triggered it): never report that as skipped. Its health gate
            # is left to whoever takes the member over.
            why = f"restarted, but {reason}: its health is judged by whoever takes it over"
            rlog.warning("%s", why)
            self._emit(EventKind.RESTARTED, scope, target.alloc_id, ref=target.ref, detail=why)
            return MemberOutcome(target, Outcome.RESTARTED, why, by=self.name)
        rlog.warning("not restarted: %s", reason)
        self._emit(EventKind.SKIPPED, scope, target.alloc_id, ref=target.ref, detail=reason)
        return MemberOutcome(target, Outcome.SKIPPED, reason, stopped=stopped)

    def _log(self, target: Target) -> _RefLog:
        ref = describe(target.ref)
        return _RefLog(
            log, {"prefix": f"{ref} alloc {target.alloc_id}", "ref": ref, "alloc_id": target.alloc_id}
        )

    def _hook(self, step: Step, target: Target) -> None:
        if self._fault_hook is not None:
            self._fault_hook(step, target)

    def _emit(
        self,
        kind: EventKind,
        scope: TaskScope,
        alloc_id: str,
        *,
        ref: TaskRef | None = None,
        detail: str = "",
        count: int = 0,
    ) -> None:
        if self._observer is None:
            return
        event = RolloutEvent(kind, scope, alloc_id, self._clock.time(), ref=ref, detail=detail, count=count)
        try:
            self._observer(event)
        except Exception:  # a display must never break a rollout
            log.exception("rollout observer failed on %s", kind.value)


@dataclass(frozen=True)
class _Deferred:
    """A healthy member's finish that waits for the next claim's txn (see ``drive(defer_finish=...)``)."""

    key: str
    target: Target
    holder: str


_FULL = object()
"""What :meth:`Coordinator._with_slot` returns when the claim was refused for the concurrency."""


class _Held:
    """The slot a coordinator holds for one attempt, until it is released (alone or with the finish)."""

    def __init__(self, slots: RestartSlots, slot: Slot) -> None:
        self.slots = slots
        self.slot = slot
        self._held: Slot | None = slot

    @property
    def holding(self) -> Slot | None:
        """The slot while this attempt still holds it."""
        return self._held

    def released_by_write(self) -> None:
        """The slot was released by a txn carrying :meth:`RestartSlots.unlock_op`."""
        if self._held is not None:
            self.slots.released(self._held)
            self._held = None

    def release(self) -> None:
        if self._held is not None:
            self.slots.release(self._held)
            self._held = None


def _concludes(plan: Plan | None, alloc_id: str) -> bool:
    """Whether what ``plan`` says of ``alloc_id`` ends its drive: then it must be read, not known."""
    member = plan.members.get(alloc_id) if plan is not None else None
    return (
        plan is None
        or member is None
        or member.state not in (MemberState.PENDING, MemberState.RESTARTING)
        or plan.halted
    )
