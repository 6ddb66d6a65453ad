"""Rolling restarts on request (playbooks, scripts, ``shepard restart``), and plan status/resume/abort.

:class:`RollingRestart` restarts every running allocation of a job (optionally one group, one
task, or a list of allocations) through the same plan and restart slots the agents use, so an
orchestrated restart cooperates with agents instead of racing them: a member an agent is already
restarting is waited for, not restarted twice.

Task scopes (job/group/task, plus node when ``lock_scope`` is ``node``) are rolled one after the
other; within a scope up to ``concurrency`` allocations restart at once, each in a worker thread.
Every worker has its own Consul session, because Consul lets a session acquire a lock it already
holds, so workers sharing one session could take the same slot. A worker whose session is lost
(say Consul was out of reach for longer than the TTL) goes on under a new one and reclaims what
it left in flight, rather than reporting the rest of its members skipped.

Which tasks: with method ``consul_key`` only Shepard-managed tasks (a template whose destination
ends with ``local/shepard.tpl``) can be restarted, the others are skipped with the reason; with
``nomad_api`` every task can.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import HealthSource, RestartMethod, ShepardConfig
from shepard_lib.coordinator import (
    INTERRUPTED,
    Coordinator,
    CoordinatorOptions,
    EventKind,
    MemberOutcome,
    Observer,
    Outcome,
    RolloutEvent,
    Target,
    target_for,
)
from shepard_lib.errors import ConfigError, PlanError, ShepardError
from shepard_lib.interrupt import Interrupt
from shepard_lib.keyspace import TASK_LOCK, TEMPLATE_DESTINATION, Keyspace, TaskRef, TaskScope
from shepard_lib.locks import RestartSlots
from shepard_lib.model import Allocation, AllocClientStatus, Job, Task
from shepard_lib.plan import (
    MemberState,
    Plan,
    PlanSettings,
    PlanStatus,
    PlanStore,
    abort,
    require,
    resolve_settings,
    resume,
)
from shepard_lib.session import Session

__all__ = [
    "PlanView",
    "PlannedRestart",
    "RollingRestart",
    "RolloutOptions",
    "RolloutResult",
    "ScopeSummary",
    "SkippedTask",
    "is_shepard_managed",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutOptions:
    """What to restart and how; None means "from the configuration" (and job/group meta)."""

    group: str | None = None
    task: str | None = None
    alloc_ids: tuple[str, ...] = ()
    concurrency: int | None = None
    method: RestartMethod | None = None
    health_source: HealthSource | None = None
    min_healthy_time: float | None = None
    healthy_deadline: float | None = None
    max_failures: int | None = None
    """Failed restarts tolerated before the plan halts (0: halt at the first)."""
    dry_run: bool = False
    seen_index: int | None = None
    """The change this rollout is for, as a Consul index: the ModifyIndex of each task's plan read
    after the change was seen (0: there was no plan; for several tasks, the largest). Allocations
    whose restart was claimed after it are not restarted again, so a rollout of a change that
    agents are already rolling out cooperates with them. Default: the rollout's own request."""
    again: bool = False
    """Restart every allocation once more even when a plan of the task is in progress; by default
    a rollout joins a ``planned`` plan and restarts only what its current generation has not."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {least}, got {value}"
            for name, value, least in (
                ("concurrency", self.concurrency, 1),
                ("max_failures", self.max_failures, 0),
            )
            if value is not None and value < least
        ]
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class PlannedRestart:
    """One allocation's task the rollout restarts, in rollout order (``order`` from 0)."""

    order: int
    alloc_id: str
    node: str
    alloc_index: int
    group: str
    task: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class SkippedTask:
    """A task the rollout did not touch, and why."""

    group: str
    task: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class ScopeSummary:
    """The plan of one task scope as the rollout left it (or, in a dry run, would use it)."""

    scope: TaskScope
    status: str
    generation: int
    concurrency: int
    max_failures: int
    halt_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "job": self.scope.job,
            "group": self.scope.group,
            "task": self.scope.task,
            "node": self.scope.node,
            "status": self.status,
            "generation": self.generation,
            "concurrency": self.concurrency,
            "max_failures": self.max_failures,
            "halt_reason": self.halt_reason,
        }


@dataclass(frozen=True)
class RolloutResult:
    """What a rollout did. ``peak_concurrency`` is the most restarts this rollout had in flight at once."""

    job: str
    dry_run: bool = False
    planned: tuple[PlannedRestart, ...] = ()
    restarted: tuple[MemberOutcome, ...] = ()
    failed: tuple[MemberOutcome, ...] = ()
    skipped: tuple[MemberOutcome, ...] = ()
    skipped_tasks: tuple[SkippedTask, ...] = ()
    plans: tuple[ScopeSummary, ...] = ()
    peak_concurrency: int = 0
    duration: float = 0.0
    warnings: tuple[str, ...] = ()
    interrupted: bool = False
    """An :class:`~shepard_lib.interrupt.Interrupt` stopped the rollout before it was through."""

    @property
    def ok(self) -> bool:
        """Every allocation asked for restarted and is healthy (tasks that cannot be restarted aside).

        A member skipped because Nomad stopped, replaced or garbage-collected its allocation does
        not count against it: there was nothing left to restart.
        """
        return not self.failed and all(o.stopped for o in self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``shepard restart --output json``)."""
        return {
            "job": self.job,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "planned": [p.to_dict() for p in self.planned],
            "restarted": [o.to_dict() for o in self.restarted],
            "failed": [o.to_dict() for o in self.failed],
            "skipped": [o.to_dict() for o in self.skipped],
            "skipped_tasks": [s.to_dict() for s in self.skipped_tasks],
            "plans": [p.to_dict() for p in self.plans],
            "peak_concurrency": self.peak_concurrency,
            "duration": self.duration,
            "warnings": list(self.warnings),
            "interrupted": self.interrupted,
        }


@dataclass(frozen=True)
class PlanView:
    """A plan as ``status`` shows it: the plan (None if unreadable) and who holds its slots."""

    key: str
    scope: TaskScope
    plan: Plan | None
    holders: dict[int, str] = field(default_factory=dict)
    orphaned: bool = False
    """The plan is planned with members pending or restarting, but no live session holds one of
    its slots or a restarting member: nobody drives it (``resume`` drives it again)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "key": self.key,
            "job": self.scope.job,
            "group": self.scope.group,
            "task": self.scope.task,
            "node": self.scope.node,
            "plan": self.plan.to_json() if self.plan else None,
            "slot_holders": {str(n): h for n, h in sorted(self.holders.items())},
            "orphaned": self.orphaned,
        }


def is_shepard_managed(task: Task) -> bool:
    """Whether ``task`` renders ``local/shepard.tpl`` (so a trigger key write restarts it)."""
    return any(t.dest_path.rstrip("/").endswith(TEMPLATE_DESTINATION) for t in task.templates)


class _Peak:
    """Observer wrapper counting this rollout's restarts in flight."""

    def __init__(self, inner: Observer | None) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self.peak = 0

    def inflight(self) -> set[str]:
        """The allocations restarting now (RESTARTING seen, no final event yet)."""
        with self._lock:
            return set(self._inflight)

    def __call__(self, event: RolloutEvent) -> None:
        with self._lock:
            if event.kind == EventKind.RESTARTING:
                self._inflight.add(event.alloc_id)
                self.peak = max(self.peak, len(self._inflight))
            elif event.kind in (EventKind.RESTARTED, EventKind.FAILED, EventKind.SKIPPED):
                self._inflight.discard(event.alloc_id)
        if self._inner is not None:
            self._inner(event)


class RollingRestart:
    """Restart a job's allocations through plans and slots; inspect, resume and abort plans.

    ``name`` identifies this rollout in plans and slot values (default ``shepard-rollout``).
    """

    def __init__(
        self,
        consul: ConsulAPI,
        nomad: NomadAPI,
        config: ShepardConfig,
        *,
        clock: Clock = REAL_CLOCK,
        observer: Observer | None = None,
        name: str = "shepard-rollout",
    ) -> None:
        self.consul = consul
        self.nomad = nomad
        self.config = config
        self.keyspace = Keyspace(config.key_prefix, config.lock_scope)
        self.name = name
        self._clock = clock
        self._observer = observer
        self._plans = PlanStore(consul, clock=clock)

    # --- restart -----------------------------------------------------------------------------

    def run(
        self, job_id: str, options: RolloutOptions | None = None, interrupt: Interrupt | None = None
    ) -> RolloutResult:
        """Restart ``job_id``'s running allocations as ``options`` say; see the module docs.

        ``interrupt`` lets a caller (the CLI's signal handler) stop it: see :mod:`shepard_lib.interrupt`.
        """
        options = options or RolloutOptions()
        started = self._clock.monotonic()
        job = self.nomad.job(job_id)
        coordinator_options = self._coordinator_options(options)
        scopes, skipped_tasks, live = self._select(job, options, coordinator_options.method)
        planned = tuple(
            PlannedRestart(n, t.alloc_id, t.ref.node, t.ref.alloc_index, t.ref.group, t.ref.task)
            for n, t in enumerate(t for targets in scopes.values() for t in targets)
        )
        if options.dry_run:
            summaries = tuple(self._dry_summary(job, scope, options, coordinator_options) for scope in scopes)
            return RolloutResult(
                job_id,
                True,
                planned,
                skipped_tasks=skipped_tasks,
                plans=summaries,
                duration=self._clock.monotonic() - started,
            )
        outcomes: list[MemberOutcome] = []
        summaries_list: list[ScopeSummary] = []
        warnings: list[str] = []
        peak = _Peak(self._observer)
        for scope, targets in scopes.items():
            if interrupt is not None and interrupt.stop.is_set():  # not even registered
                outcomes += [MemberOutcome(t, Outcome.SKIPPED, INTERRUPTED) for t in targets]
                continue
            settings = self._settings(job, scope, options, coordinator_options)
            plan, scope_outcomes = self._roll_scope(
                job,
                scope,
                targets,
                settings,
                coordinator_options,
                peak,
                registration=_Registration(options.seen_index, live, join=not options.again),
                interrupt=interrupt,
            )
            if options.concurrency is not None and plan.concurrent_lock_count != options.concurrency:
                warnings.append(
                    f"{plan.label}: a rollout was already in progress with concurrency "
                    f"{plan.concurrent_lock_count}; joined it instead of using {options.concurrency}"
                )
            outcomes += scope_outcomes
            summaries_list.append(
                self._summary(scope, self._plans.load(self.keyspace.task_lock_key(scope)) or plan)
            )
        return self._result(
            job_id, planned, outcomes, skipped_tasks, summaries_list, peak, started, warnings, interrupt
        )

    def _coordinator(
        self,
        session: Session,
        options: CoordinatorOptions,
        peak: _Peak,
        name: str,
        session_factory: Callable[[], Session] | None = None,
        interrupt: Interrupt | None = None,
    ) -> Coordinator:
        """A coordinator of this rollout, reporting to ``peak``."""
        return Coordinator(
            self.consul,
            self.nomad,
            self.keyspace,
            session,
            options,
            clock=self._clock,
            name=name,
            observer=peak,
            session_factory=session_factory,
            stop=interrupt.stop if interrupt is not None else None,
        )

    def _roll_scope(
        self,
        job: Job,
        scope: TaskScope,
        targets: Sequence[Target],
        settings: PlanSettings,
        options: CoordinatorOptions,
        peak: _Peak,
        *,
        registration: _Registration | None = None,
        interrupt: Interrupt | None = None,
    ) -> tuple[Plan, list[MemberOutcome]]:
        """Register ``targets`` (unless ``registration`` is None: resume) and drive them in workers.

        On ``interrupt.stop`` the workers take no new member; on ``interrupt.abandon`` their
        sessions are destroyed and the members still in flight are reported skipped.
        """
        with self._session("planner") as session:
            planner = self._coordinator(session, options, peak, self.name)
            if registration is not None:
                plan = planner.register(
                    scope,
                    targets,
                    job,
                    settings,
                    seen_index=registration.seen_index,
                    live=registration.live,
                    join=registration.join,
                )
            else:
                loaded = self._plans.load(planner.plan_key(scope))
                if loaded is None:
                    raise PlanError(f"no plan for {scope.job}/{scope.group}/{scope.task}")
                plan = loaded
        work: queue.Queue[Target] = queue.Queue()
        for target in targets:
            work.put(target)
        outcomes: list[MemberOutcome] = []
        no_session: list[str] = []
        coordinators: list[Coordinator] = []
        lock = threading.Lock()

        def new_session(number: int) -> Session:
            if interrupt is not None and interrupt.abandon.is_set():
                raise PlanError("the rollout was interrupted: no new session")
            return self._session(f"worker {number}")

        def worker(number: int) -> None:
            session = new_session(number)
            try:
                session.create()
            except ShepardError as exc:
                log.error(
                    "%s: worker %d could not create a Consul session: %s", scope_label(scope), number, exc
                )
                with lock:
                    no_session.append(str(exc))
                return
            # A lost session is replaced (session_factory), so a worker sees each member it takes to the end.
            coordinator = self._coordinator(
                session,
                options,
                peak,
                f"{self.name} worker {number}",
                session_factory=functools.partial(new_session, number),
                interrupt=interrupt,
            )
            with lock:
                coordinators.append(coordinator)
            try:
                while interrupt is None or not interrupt.stop.is_set():
                    try:
                        target = work.get_nowait()
                    except queue.Empty:
                        return
                    outcome = _drive(coordinator, target, scope)
                    with lock:
                        outcomes.append(outcome)
            finally:
                coordinator.release_slots()  # before the session ends: no lock-delay on the slot
                coordinator.session.destroy()

        threads = [
            threading.Thread(target=worker, args=(n,), name=f"shepard-rollout-{scope.task}-{n}", daemon=True)
            for n in range(min(plan.concurrent_lock_count, len(targets)))
        ]
        for thread in threads:
            thread.start()
        abandoned = _join(threads, interrupt)
        if abandoned:
            with lock:
                for coordinator in coordinators:  # Consul frees their slots now, not at their TTL
                    coordinator.session.destroy()
        # A member no worker reported must not vanish from the result (it would read as a success).
        with lock:  # abandoned workers may still report: the result is this moment's copy
            result = list(outcomes)
        reported = {o.target.alloc_id for o in result}
        inflight = peak.inflight() if abandoned else set()
        result += [
            MemberOutcome(t, Outcome.SKIPPED, _unreported(t, inflight, no_session, interrupt))
            for t in targets
            if t.alloc_id not in reported
        ]
        order = {t.alloc_id: n for n, t in enumerate(targets)}
        return plan, sorted(result, key=lambda o: order[o.target.alloc_id])

    # --- status, resume, abort ------------------------------------------------------------------

    def status(
        self, job: str | None = None, group: str | None = None, task: str | None = None
    ) -> list[PlanView]:
        """Every plan (of ``job``/``group``/``task`` when given) with its slot holders."""
        views = []
        for key in self.consul.keys(self.keyspace.locks_prefix()):
            try:
                scope, kind, _ = self.keyspace.parse_lock_key(key)
            except ValueError:
                continue
            if kind != TASK_LOCK or any(
                want is not None and want != have
                for want, have in ((job, scope.job), (group, scope.group), (task, scope.task))
            ):
                continue
            plan = self._plans.load(key)
            size = plan.concurrent_lock_count if plan else 1
            holders = RestartSlots(
                self.consul, self.keyspace.slot_prefix(scope), size, clock=self._clock
            ).holders()
            views.append(PlanView(key, scope, plan, holders, orphaned=self._orphaned(plan, holders)))
        return views

    def _orphaned(self, plan: Plan | None, holders: dict[int, str]) -> bool:
        """Whether ``plan`` has work left but no live session holds a slot or a restarting member."""
        if plan is None or plan.status != PlanStatus.PLANNED or holders:
            return False
        active = [
            m for m in plan.members.values() if m.state in (MemberState.PENDING, MemberState.RESTARTING)
        ]
        sessions = {m.session for m in active if m.state == MemberState.RESTARTING and m.session}
        return bool(active) and all(self.consul.session_info(s) is None for s in sessions)

    def resume(self, job_id: str, group: str, task: str, interrupt: Interrupt | None = None) -> RolloutResult:
        """Resume the plan(s) of ``job/group/task`` and restart their pending members.

        A failed or aborted plan is planned again; a plan that is planned already (nobody drives
        it, or a resume whose answer was lost) is driven as it is: resume is idempotent. The
        members are restarted by the plan's own restart method and health source. ``interrupt``
        stops it as it stops :meth:`run`.
        """
        started = self._clock.monotonic()
        job = self.nomad.job(job_id)
        views = [v for v in self.status(job_id, group, task) if v.plan is not None]
        if not views:
            raise PlanError(f"no plan for {job_id}/{group}/{task}: nothing to resume")
        now = self._clock.time()
        allocs = {a.id: a for a in self.nomad.job_allocations(job_id)}
        outcomes: list[MemberOutcome] = []
        summaries: list[ScopeSummary] = []
        peak = _Peak(self._observer)
        for view in views:
            plan = self._plans.update(view.key, functools.partial(_resume, key=view.key, now=now))
            log.info("plan %s resumed by %s", plan.label, self.name)
            targets = []
            for alloc_id, member in sorted(plan.members.items(), key=lambda i: (i[1].alloc_index, i[0])):
                if member.state not in (MemberState.PENDING, MemberState.RESTARTING):
                    continue
                alloc = allocs.get(alloc_id)
                if alloc is not None:
                    targets.append(target_for(alloc, task, job))
                else:
                    ref = TaskRef(member.node, job_id, group, task, member.alloc_index)
                    targets.append(Target(ref, alloc_id))
            settings = PlanSettings(plan.concurrent_lock_count, plan.max_failures)
            options = CoordinatorOptions.from_config(
                self.config,
                method=RestartMethod(plan.method) if plan.method else None,
                health_source=HealthSource(plan.health_source) if plan.health_source else None,
            )
            if targets and interrupt is not None and interrupt.stop.is_set():
                outcomes += [MemberOutcome(t, Outcome.SKIPPED, INTERRUPTED) for t in targets]
            elif targets:
                plan, scope_outcomes = self._roll_scope(
                    job, view.scope, targets, settings, options, peak, interrupt=interrupt
                )
                outcomes += scope_outcomes
            summaries.append(self._summary(view.scope, self._plans.load(view.key) or plan))
        return self._result(job_id, (), outcomes, (), summaries, peak, started, [], interrupt)

    def abort(self, job_id: str, group: str, task: str, reason: str = "aborted by an operator") -> list[Plan]:
        """Abort the plan(s) of ``job/group/task``: nobody starts a new restart; in-flight ones finish."""
        views = [v for v in self.status(job_id, group, task) if v.plan is not None]
        if not views:
            raise PlanError(f"no plan for {job_id}/{group}/{task}: nothing to abort")
        now = self._clock.time()
        plans = []
        for view in views:
            plan = self._plans.update_at(
                view.key, functools.partial(_abort, key=view.key, reason=reason, now=now)
            )
            log.warning("plan %s aborted by %s: %s", plan.label, self.name, reason)
            plans.append(plan)
        return plans

    # --- helpers -----------------------------------------------------------------------------

    def _coordinator_options(self, options: RolloutOptions) -> CoordinatorOptions:
        return CoordinatorOptions.from_config(
            self.config,
            method=options.method,
            health_source=options.health_source,
            min_healthy_time=options.min_healthy_time,
            healthy_deadline=options.healthy_deadline,
        )

    def _settings(
        self, job: Job, scope: TaskScope, options: RolloutOptions, coordinator: CoordinatorOptions
    ) -> PlanSettings:
        settings = resolve_settings(
            job, scope.group, concurrency=coordinator.concurrency, max_failures=coordinator.max_failures
        )
        return replace(
            settings,
            concurrency=options.concurrency or settings.concurrency,
            max_failures=settings.max_failures if options.max_failures is None else options.max_failures,
        )

    def _select(
        self, job: Job, options: RolloutOptions, method: RestartMethod
    ) -> tuple[dict[TaskScope, list[Target]], tuple[SkippedTask, ...], tuple[str, ...]]:
        """The targets by scope in rollout order, the tasks left out, and every live allocation of the job."""
        if options.group is not None and job.group(options.group) is None:
            raise ConfigError(f"job {job.id!r} has no group {options.group!r} (groups: {_names(job.groups)})")
        groups = [g for g in job.groups if options.group in (None, g.name)]
        if options.task is not None and not any(g.task(options.task) for g in groups):
            raise ConfigError(f"job {job.id!r} has no task {options.task!r} in {_names(groups)}")
        allocs = sorted(
            (a for a in self.nomad.job_allocations(job.id) if _live(a)),
            key=lambda a: (a.task_group, a.index, a.id),
        )
        live = tuple(a.id for a in allocs)
        if options.alloc_ids:
            allocs = [a for a in allocs if any(a.id.startswith(want) for want in options.alloc_ids)]
            found = {want for want in options.alloc_ids if any(a.id.startswith(want) for a in allocs)}
            missing = [want for want in options.alloc_ids if want not in found]
            if missing:
                raise ConfigError(
                    f"job {job.id!r}: no running allocation matches {', '.join(missing)}"
                    + (f" in group {options.group!r}" if options.group else "")
                )
        scopes: dict[TaskScope, list[Target]] = {}
        skipped: list[SkippedTask] = []
        for group in groups:
            for task in group.tasks:
                if options.task not in (None, task.name):
                    continue
                if method is RestartMethod.CONSUL_KEY and not is_shepard_managed(task):
                    skipped.append(
                        SkippedTask(
                            group.name,
                            task.name,
                            f"no template renders {TEMPLATE_DESTINATION}, so method consul_key cannot "
                            "restart it (add the shepard template, or use method nomad_api)",
                        )
                    )
                    continue
                for alloc in (a for a in allocs if a.task_group == group.name):
                    target = target_for(alloc, task.name, job)
                    scopes.setdefault(self.keyspace.scope(target.ref), []).append(target)
        return scopes, tuple(skipped), live

    def _dry_summary(
        self, job: Job, scope: TaskScope, options: RolloutOptions, coordinator: CoordinatorOptions
    ) -> ScopeSummary:
        plan = self._plans.load(self.keyspace.task_lock_key(scope))
        settings = self._settings(job, scope, options, coordinator)
        if plan is not None and plan.status != PlanStatus.COMPLETE:
            return self._summary(scope, plan)
        return ScopeSummary(
            scope,
            "absent" if plan is None else plan.status.value,
            plan.generation if plan else 0,
            settings.concurrency,
            settings.max_failures,
        )

    @staticmethod
    def _summary(scope: TaskScope, plan: Plan) -> ScopeSummary:
        return ScopeSummary(
            scope,
            plan.status.value,
            plan.generation,
            plan.concurrent_lock_count,
            plan.max_failures,
            plan.halt_reason,
        )

    def _result(
        self,
        job_id: str,
        planned: tuple[PlannedRestart, ...],
        outcomes: list[MemberOutcome],
        skipped_tasks: tuple[SkippedTask, ...],
        summaries: list[ScopeSummary],
        peak: _Peak,
        started: float,
        warnings: list[str],
        interrupt: Interrupt | None = None,
    ) -> RolloutResult:
        def having(kind: Outcome) -> tuple[MemberOutcome, ...]:
            return tuple(o for o in outcomes if o.outcome == kind)

        return RolloutResult(
            job=job_id,
            planned=planned,
            restarted=having(Outcome.RESTARTED),
            failed=having(Outcome.FAILED),
            skipped=having(Outcome.SKIPPED),
            skipped_tasks=skipped_tasks,
            plans=tuple(summaries),
            peak_concurrency=peak.peak,
            duration=self._clock.monotonic() - started,
            warnings=tuple(warnings),
            interrupted=interrupt is not None and interrupt.stop.is_set(),
        )

    def _session(self, role: str) -> Session:
        return Session(
            self.consul,
            f"{self.name} {role}",
            ttl=self.config.session_ttl,
            lock_delay=self.config.lock_delay,
            clock=self._clock,
        )


@dataclass(frozen=True)
class _Registration:
    """How a rollout registers its targets (see :func:`shepard_lib.plan.register`)."""

    seen_index: int | None
    live: tuple[str, ...]
    join: bool


def _drive(coordinator: Coordinator, target: Target, scope: TaskScope) -> MemberOutcome:
    """``coordinator.drive(target)``, keeping the slot for the worker's next member; an error is
    reported as this allocation's outcome, not raised."""
    try:
        return coordinator.drive(target, keep_slot=True)
    except ShepardError as exc:
        log.error("%s alloc %s: %s", scope_label(scope), target.alloc_id, exc)
        return MemberOutcome(target, Outcome.SKIPPED, f"error: {exc}")
    except Exception as exc:  # a bug: report it for this allocation, keep the rollout going
        log.exception("%s alloc %s: unexpected error", scope_label(scope), target.alloc_id)
        return MemberOutcome(target, Outcome.SKIPPED, f"unexpected error: {exc!r}")


def _join(threads: Sequence[threading.Thread], interrupt: Interrupt | None) -> bool:
    """Wait for ``threads``; True if ``interrupt.abandon`` came first (they are left running)."""
    for thread in threads:
        while thread.is_alive():
            if interrupt is None:
                thread.join()
            elif interrupt.abandon.wait(0.1):
                return True
            else:
                thread.join(0.1)
    return False


def _unreported(
    target: Target, inflight: set[str], no_session: list[str], interrupt: Interrupt | None
) -> str:
    """Why a member no worker reported was not restarted."""
    if target.alloc_id in inflight:
        return (
            "abandoned while restarting (the rollout was interrupted twice): its slot and session "
            "were released; `shepard resume` sees it through"
        )
    if interrupt is not None and interrupt.stop.is_set():
        return INTERRUPTED
    if no_session:
        return f"no worker could create a Consul session: {no_session[-1]}"
    return "its worker stopped"


def _live(alloc: Allocation) -> bool:
    """Running, or pending while one of its tasks restarts (Nomad reports such an allocation pending)."""
    return alloc.desired_status == "run" and alloc.client_status in (
        AllocClientStatus.RUNNING,
        AllocClientStatus.PENDING,
    )


def scope_label(scope: TaskScope) -> str:
    """``job/group/task`` (``@node`` for a node scope), for logs."""
    base = f"{scope.job}/{scope.group}/{scope.task}"
    return f"{base}@{scope.node}" if scope.node else base


def _names(items: Sequence[Any]) -> str:
    return ", ".join(repr(i.name) for i in items) or "none"


def _resume(plan: Plan | None, *, key: str, now: float) -> Plan:
    return resume(require(plan, key), now=now)


def _abort(plan: Plan | None, index: int, *, key: str, reason: str, now: float) -> Plan:
    """Abort at the plan's ModifyIndex ``index``, so only a change seen after it re-opens the plan."""
    return abort(require(plan, key), reason=reason, now=now, index=index)
