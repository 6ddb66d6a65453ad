"""The per-allocation restart flow of docs/design.md section 4: plan, slot, claim, trigger, health, finish.

A :class:`Coordinator` works under one :class:`~shepard_lib.session.Session`. An agent calls
:meth:`Coordinator.handle_change` when the files of an allocation's task changed; the rolling
restart (:mod:`shepard_lib.rollout`) registers many allocations with :meth:`Coordinator.register`
and calls :meth:`Coordinator.drive` for each, so agents and rollouts cooperate through the same
plan and the same slots instead of racing each other.

``drive`` loops until the member is no longer its business:

- ``pending`` in a ``planned`` plan: take a slot, claim the member (CAS ``pending`` ->
  ``restarting``; if someone else was faster, release the slot and look again), trigger, wait
  for health, finish (``done``/``failed``), release the slot. The claim is refused while
  ``concurrent_lock_count`` members are restarting: a restart whose holder died counts until
  someone has seen it through (its slot came free when the session ended, but the task may
  still be restarting), so a slot holder that finds such a member takes it over first;
- ``restarting`` under a session that no longer exists (its holder died): take a slot, reclaim
  the member and, if the task already restarted since ``restarts_before``, only run the health
  gate, otherwise trigger. So a member restarts exactly once per generation even when holders
  are killed. (The dead holder's trigger always took effect before the reclaim, because Consul
  invalidates a session at least its TTL after the last renew, much longer than a trigger
  takes to render.)
- ``restarting`` under a live session: wait (blocking query on the plan) for it to finish; it
  may come back as ``pending`` when a new change arrived meanwhile;
- ``done``, ``failed``, or the plan halted (failed/aborted): stop and report.

Losing the session stops the flow cleanly: a claimed member that was not triggered is given
back; one that was triggered stays ``restarting`` under the dead session, for a reclaimer.
Without a ``session_factory`` (an agent) the member is then reported skipped; with one (a
rollout worker, which must take every member it was given to the end) the lost session is
destroyed (so Consul frees its locks now, not at its TTL) and the flow goes on under a new
session, which reclaims the member if it was left ``restarting``. Nothing is ever triggered without a held
slot (the trigger is fenced by the slot).

A member another participant restarted meanwhile is reported ``restarted``, with ``by`` naming
that participant.

Every log line names the task: ``node/job/group/task[alloc_index] alloc <id>``.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import uuid
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import HealthSource, RestartMethod, ShepardConfig
from shepard_lib.errors import (
    BackendError,
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
from shepard_lib.locks import RestartSlots, Slot
from shepard_lib.model import Allocation, Job, SessionInfo, TaskState
from shepard_lib.plan import (
    Member,
    MemberSpec,
    MemberState,
    MemberUnavailable,
    Plan,
    PlanSettings,
    PlanStore,
    claim,
    finish,
    new_plan,
    reclaim,
    register,
    require,
    resolve_settings,
    unclaim,
)
from shepard_lib.session import Session
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
"""Cluster seconds one blocking query on the plan waits at most while another holder restarts."""

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
    that it finished a dead holder's restart.
    """

    target: Target
    outcome: Outcome
    reason: str = ""
    generation: int = 0
    by: str = ""
    duration: float | None = None
    reclaimed: bool = False

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
            "max_failures": max(1, cfg.max_failures),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class _RefLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the task ref and the allocation."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"{self.extra['prefix'] if self.extra else ''}: {msg}", kwargs


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
    to stop the coordinator without any cleanup. One coordinator serves one thread: a rollout
    gives each worker thread its own coordinator and session, because Consul lets a session
    acquire a lock it already holds.
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
        self._trigger = Trigger(consul, nomad, keyspace, options.method)
        self._health = HealthGate(
            consul,
            nomad,
            source=options.health_source,
            min_healthy_time=options.min_healthy_time,
            healthy_deadline=options.healthy_deadline,
            clock=clock,
        )

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
        changed_at: float | None = None,
    ) -> Plan:
        """Register ``targets`` (all of ``scope``) as needing a restart, in one CAS update.

        ``changed_at`` is when the change happened (default: now), see :func:`shepard_lib.plan.register`.
        ``settings`` (default: :meth:`settings_for`) apply only if this creates or reopens the plan.
        """
        settings = settings or self.settings_for(job, scope.group)
        group = job.group(scope.group)
        count = group.count if group is not None else len(targets)
        now = self._clock.time()

        def change(plan: Plan | None) -> Plan:
            base = plan or new_plan(
                scope.job,
                scope.group,
                scope.task,
                scope.node,
                instance_count=count,
                settings=settings,
                now=now,
            )
            return register(
                base,
                [t.spec() for t in targets],
                now=now,
                changed_at=changed_at,
                settings=settings,
                instance_count=count,
            )

        plan = self.plans.update(self.plan_key(scope), change)
        for target in targets:
            self._log(target).info(
                "registered in plan %s (generation %d, %s, concurrency %d)",
                plan.label,
                plan.generation,
                plan.status.value,
                plan.concurrent_lock_count,
            )
            self._hook(Step.REGISTERED, target)
        self._emit(EventKind.PLANNED, scope, "", detail=plan.status.value, count=len(targets))
        return plan

    def handle_change(self, alloc: Allocation, task: str, changed_at: float | None = None) -> MemberOutcome:
        """The agent's flow for a change of ``task`` in ``alloc``: register, then :meth:`drive`.

        ``changed_at`` is when the change was seen (cluster Unix time; default: now).
        """
        job = self.nomad.job(alloc.job_id)
        target = target_for(alloc, task, job)
        scope = self.keyspace.scope(target.ref)
        self.register(scope, [target], job, changed_at=changed_at)
        return self.drive(target)

    # --- the flow ----------------------------------------------------------------------------

    def drive(self, target: Target) -> MemberOutcome:
        """Bring ``target`` through the plan until it is done, failed or not ours to do (see module docs)."""
        scope = self.keyspace.scope(target.ref)
        rlog = self._log(target)
        errors = 0
        sessions = 1
        while True:
            if self._stop is not None and self._stop.is_set():
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
            except NotFound as exc:
                return self._skip(target, scope, f"allocation gone: {exc}", rlog)
            except (BackendError, PlanError) as exc:  # PlanError: a plan update that kept conflicting
                errors += 1
                if errors >= self.options.error_attempts:
                    return self._skip(target, scope, f"giving up after {errors} errors: {exc}", rlog)
                rlog.warning("Consul or Nomad failed, trying again: %s", exc)
                continue
            except LockLost as exc:
                if self._stop is not None and self._stop.is_set():
                    continue  # the slot wait was cancelled by the stop: the top of the loop skips
                if self._session_factory is not None and self._session_gone():
                    continue  # the top of the loop goes on with a new session
                return self._skip(target, scope, str(exc), rlog)
            except LockTimeout as exc:
                return self._skip(target, scope, str(exc), rlog)
            if result is not None:
                return result

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
        self.session.destroy()
        session = factory()
        session.create()
        self.session = session
        rlog.warning("%s; going on under a new session", why)

    def _step(self, target: Target, scope: TaskScope, rlog: _RefLog) -> MemberOutcome | None:
        """Look at the plan and do what the member needs; None: look again."""
        key = self.plan_key(scope)
        plan, index = self.plans.read(key)
        member = plan.members.get(target.alloc_id) if plan else None
        if plan is None or member is None:
            return self._skip(target, scope, "not in the plan (it was deleted or replaced)", rlog)
        if member.state in (MemberState.DONE, MemberState.FAILED):
            return self._finished_by_other(target, scope, plan, member)
        if member.state == MemberState.RESTARTING:
            if self._wait_for_live_holders(key, index, [member], rlog):
                return None
            rlog.warning("holder %s of its restart in flight is gone; reclaiming", member.holder_name)
        elif plan.halted:
            return self._skip(
                target, scope, f"plan {plan.label} is {plan.status.value}: {plan.halt_reason}", rlog
            )
        else:
            inflight = list(plan.in_state(MemberState.RESTARTING).values())
            if len(inflight) >= plan.concurrent_lock_count and self._wait_for_live_holders(
                key, index, inflight, rlog
            ):
                return None
        return self._attempt(target, scope, plan, rlog)

    def _wait_for_live_holders(self, key: str, index: int, members: Sequence[Member], rlog: _RefLog) -> bool:
        """If every one of ``members`` (restarting) has a live holder, wait for a plan change; True if waited.

        The plan changes when a holder finishes; if a holder dies instead nothing changes, so the
        wait is bounded by the holders' TTL.
        """
        ttls = []
        for m in members:
            info = self._live_holder(m)
            if info is None:
                return False
            ttls.append(info.ttl or PLAN_WAIT)
        rlog.info(
            "waiting for %d restart(s) in flight (%s)",
            len(members),
            ", ".join(sorted({m.holder_name or "?" for m in members})),
        )
        self.plans.watch(key, index, min([PLAN_WAIT, *ttls]))
        return True

    def _attempt(self, target: Target, scope: TaskScope, plan: Plan, rlog: _RefLog) -> MemberOutcome | None:
        """One pass with a slot: claim or reclaim, trigger, health, finish. None: look at the plan again."""
        slots = RestartSlots(
            self.consul, self.keyspace.slot_prefix(scope), plan.concurrent_lock_count, clock=self._clock
        )
        holder_text = f"{self.name} alloc {target.alloc_id}"
        self._emit(EventKind.WAITING, scope, target.alloc_id, ref=target.ref)
        rlog.debug("waiting for a restart slot of %s (%d slots)", plan.label, plan.concurrent_lock_count)
        slot = slots.acquire(  # the slot wait checks the session itself; the stop ends it too
            self.session, holder=holder_text, timeout=self.options.slot_timeout, cancel=self._stop
        )
        try:
            self._hook(Step.SLOT, target)
            result = self._with_slot(target, scope, slot, rlog)
        except SimulatedCrash:
            raise
        except BaseException:
            slots.release(slot)
            raise
        slots.release(slot)
        return result

    def _with_slot(self, target: Target, scope: TaskScope, slot: Slot, rlog: _RefLog) -> MemberOutcome | None:
        """With a slot held: claim our member, or first take over a dead holder's restart; None: look again.

        A restart whose holder died still counts against the concurrency until someone has seen
        it through: its slot came free when the holder's session ended, but the task may still be
        restarting. So a claim is refused while ``concurrent_lock_count`` members are restarting,
        and a slot holder that finds a dead holder's member takes it over first.
        """
        key = self.plan_key(scope)
        plan, _ = self.plans.read(key)
        member = plan.members.get(target.alloc_id) if plan else None
        if plan is None or member is None:
            return None
        if member.state == MemberState.RESTARTING:
            return self._restart(target, scope, slot, member, rlog)
        if member.state != MemberState.PENDING or plan.halted:
            return None
        inflight = plan.in_state(MemberState.RESTARTING)
        if len(inflight) < plan.concurrent_lock_count:
            return self._restart(target, scope, slot, None, rlog)
        for alloc_id, other in sorted(inflight.items(), key=lambda item: item[1].alloc_index):
            if self._live_holder(other) is None:
                orphan = Target(
                    TaskRef(other.node, scope.job, scope.group, scope.task, other.alloc_index),
                    alloc_id,
                    target.services,
                )
                self._log(orphan).warning(
                    "holder %s of its restart in flight is gone; %s takes it over",
                    other.holder_name,
                    self.name,
                )
                self._restart(orphan, scope, slot, other, self._log(orphan))
                return None
        return None

    def _restart(
        self, target: Target, scope: TaskScope, slot: Slot, dead: Member | None, rlog: _RefLog
    ) -> MemberOutcome | None:
        """Claim (``dead`` None) or reclaim ``dead``'s member, trigger if needed, wait for health, finish."""
        key = self.plan_key(scope)
        started = self._clock.monotonic()
        holder = uuid.uuid4().hex
        baseline = self._health.baseline(target.alloc_id, target.ref.task)
        trigger_index = self._trigger_index(target)
        if dead is None:
            change = functools.partial(
                claim,
                alloc_id=target.alloc_id,
                holder=holder,
                session=self.session.id,
                holder_name=self.name,
                restarts_before=baseline.restarts,
                started_before=baseline.started_at,
                trigger_index=trigger_index,
            )
            before, must_trigger = baseline, True
        else:
            if self._live_holder(dead) is not None:
                return None
            change = functools.partial(
                reclaim,
                alloc_id=target.alloc_id,
                dead_session=dead.session,
                holder=holder,
                session=self.session.id,
                holder_name=self.name,
            )
            restarts = dead.restarts_before if dead.restarts_before is not None else baseline.restarts
            before = TaskState(state="running", restarts=restarts, started_at=dead.started_before)
            # The dead holder may have written the trigger just before it died, and the task
            # may not have restarted yet: a trigger key that moved since the claim means written.
            written = dead.trigger_index is not None and trigger_index != dead.trigger_index
            must_trigger = not written and not restarted(before, baseline)
        try:
            plan = self.plans.update(key, lambda p: change(require(p, key), now=self._clock.time()))
        except MemberUnavailable as exc:
            rlog.info(
                "not %s (%s); releasing the slot", "claimed" if dead is None else "reclaimed", exc.reason
            )
            return None
        if dead is not None:
            rlog.info(
                "reclaimed from %s; %s",
                dead.holder_name,
                "triggering again" if must_trigger else "it already restarted, checking its health",
            )
        generation = plan.members[target.alloc_id].generation
        self._hook(Step.CLAIMED, target)
        if must_trigger:
            try:
                self._trigger.fire(target.ref, target.alloc_id, slot)
            except (LockLost, BackendError) as exc:
                if not self._trigger_may_have_applied(target, trigger_index, exc):
                    self._give_back(key, target, holder, f"not triggered: {exc}", rlog)
                    raise
                rlog.warning("trigger reported an error but may have been applied; checking health: %s", exc)
        self._hook(Step.TRIGGERED, target)
        reclaimed = dead is not None
        self._emit(
            EventKind.RESTARTING,
            scope,
            target.alloc_id,
            ref=target.ref,
            detail="reclaimed" if reclaimed else "",
        )
        ok, error = self._wait_healthy(target, before, rlog)
        self._hook(Step.HEALTHY, target)
        try:
            plan = self.plans.update(
                key,
                lambda p: finish(
                    require(p, key),
                    target.alloc_id,
                    holder=holder,
                    ok=ok,
                    now=self._clock.time(),
                    error=error,
                ),
            )
        except MemberUnavailable as exc:
            # Taken over (this session looked dead to someone) or dropped from the plan: the plan
            # says what became of it.
            rlog.warning("restart seen through, but the member is no longer ours to finish: %s", exc.reason)
            return None
        self._hook(Step.FINISHED, target)
        duration = self._clock.monotonic() - started
        if plan.members[target.alloc_id].state == MemberState.PENDING:
            rlog.info("restarted, but a new change arrived meanwhile: restarting it once more")
            return None
        if plan.halted and not ok:
            rlog.error("plan %s is %s: %s", plan.label, plan.status.value, plan.halt_reason)
        if ok:
            rlog.info("restarted and healthy in %.1fs", duration)
            self._emit(EventKind.RESTARTED, scope, target.alloc_id, ref=target.ref)
        else:
            self._emit(EventKind.FAILED, scope, target.alloc_id, ref=target.ref, detail=error or "")
        outcome = Outcome.RESTARTED if ok else Outcome.FAILED
        return MemberOutcome(
            target, outcome, error or "", generation, by=self.name, duration=duration, reclaimed=reclaimed
        )

    def _wait_healthy(self, target: Target, before: TaskState, rlog: _RefLog) -> tuple[bool, str | None]:
        """(True, None) when healthy; (False, why) when the task failed or timed out. LockLost propagates."""
        try:
            self._health.wait_healthy(
                target.alloc_id,
                target.ref.task,
                before=before,
                services=target.services,
                cancel=self.session.lost,
            )
        except (TaskFailed, HealthTimeout) as exc:
            rlog.error("restart failed: %s", exc)
            return False, str(exc)
        return True, None

    def _trigger_index(self, target: Target) -> int | None:
        """The trigger key's ModifyIndex (0: absent) for method consul_key; None for nomad_api."""
        if self.options.method is not RestartMethod.CONSUL_KEY:
            return None
        entry = self.consul.get(self.keyspace.trigger_key(target.ref), consistent=True)
        return 0 if entry is None else entry.modify_index

    def _trigger_may_have_applied(self, target: Target, trigger_index: int | None, error: Exception) -> bool:
        """After a trigger error: may the restart have been requested anyway? False only when proven not.

        A refused fence (LockLost) applied nothing. After a BackendError the request may have been
        applied with its answer lost: for method consul_key a trigger key that did not move proves it
        was not. A restart through Nomad's API cannot be disproved (its restart count moves later), nor
        can anything when the check itself fails: those count as applied and the health gate decides.
        A restart that never happened then fails at healthy_deadline and halts the plan, where giving
        the member back could restart the task twice in one generation.
        """
        if isinstance(error, LockLost):
            return False
        if trigger_index is None:
            return True
        try:
            return self._trigger_index(target) != trigger_index
        except BackendError:
            return True

    def _live_holder(self, member: Member) -> SessionInfo | None:
        """The live session of another holder of ``member``'s restart; None when it is reclaimable.

        A member held by this coordinator's own session is reclaimable too: a coordinator drives one
        member at a time, so such a member was left behind by a step of ours that failed (a finish or
        give-back write that Consul refused), and waiting for it would wait forever.
        """
        if member.session is None or member.session == self.session.id:
            return None
        return self.consul.session_info(member.session)

    def _give_back(self, key: str, target: Target, holder: str, why: str, rlog: _RefLog) -> None:
        try:
            self.plans.update(
                key,
                lambda p: unclaim(
                    require(p, key), target.alloc_id, holder=holder, now=self._clock.time(), error=why
                ),
            )
        except (PlanError, BackendError) as exc:
            rlog.warning("could not give the member back (%s); it stays reclaimable", exc)
        else:
            rlog.warning("gave the member back: %s", why)

    # --- helpers -----------------------------------------------------------------------------

    def _finished_by_other(
        self, target: Target, scope: TaskScope, plan: Plan, member: Member
    ) -> MemberOutcome:
        by = member.holder_name or ""
        if member.state == MemberState.DONE:
            self._emit(EventKind.RESTARTED, scope, target.alloc_id, ref=target.ref, detail=f"by {by}")
            return MemberOutcome(target, Outcome.RESTARTED, f"restarted by {by}", member.generation, by=by)
        self._emit(EventKind.FAILED, scope, target.alloc_id, ref=target.ref, detail=member.error or "")
        return MemberOutcome(target, Outcome.FAILED, member.error or "failed", member.generation, by=by)

    def _skip(self, target: Target, scope: TaskScope, reason: str, rlog: _RefLog) -> MemberOutcome:
        rlog.warning("not restarted: %s", reason)
        self._emit(EventKind.SKIPPED, scope, target.alloc_id, ref=target.ref, detail=reason)
        return MemberOutcome(target, Outcome.SKIPPED, reason)

    def _log(self, target: Target) -> _RefLog:
        return _RefLog(log, {"prefix": f"{describe(target.ref)} alloc {target.alloc_id}"})

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
