"""The restart plan of one task scope: the value of ``.../task_lock`` (docs/design.md section 4).

A :class:`Plan` is a pure, frozen value with pure transition functions (:func:`register`,
:func:`claim`, :func:`reclaim`, :func:`unclaim`, :func:`finish`, :func:`resume`, :func:`abort`);
:class:`PlanStore` is the only part that does I/O: it applies one transition to the last plan
seen and writes it back with a txn ``cas`` on its ModifyIndex, reading the key again only on
conflict.

Locking choice: ``task_lock`` is **not** taken as a Consul lock. Every plan update is a
read-modify-write guarded by CAS on the key's ModifyIndex, which is exactly as atomic as a lock
around the update but depends on no holder being alive: a lock on ``task_lock`` would put a
session (and after a crash, its lock-delay) in front of every finish, resume and abort.

Generations: ``generation`` counts the changes a plan has seen. Changes are ordered by Consul's
logical indexes, never by comparing two hosts' clocks. Every transition is applied at the plan's
ModifyIndex (the ``index`` the CAS write is based on): a claim records it as ``claim_index``, so
the claim's write came after every plan write up to that index. A registration carries
``seen_index``: the plan's ModifyIndex read *after* the change was seen (0 when there was no plan;
default: the index the registration itself is applied at, i.e. "now"). A member with
``claim_index >= seen_index`` was claimed after the change was seen, so its restart runs the
changed config and the registration leaves it alone: the many events of one change, and a rollout
asked for together with them, restart each member once. Otherwise:

- a member not in the plan, or ``pending``, joins the current generation (a pending member is
  never restarted twice);
- a member ``done``, ``failed`` or ``skipped`` in the current generation opens a new generation
  (at most one per registration): it becomes ``pending``, the other pending members move to the
  new generation (they are restarted once, with the newest config);
- a member ``restarting`` is marked ``rerun`` (opening a new generation if it was claimed in the
  current one): its restart began before the change, so the new config may not have been
  rendered in time; when it finishes it goes back to ``pending`` in the newest generation
  instead of ``done``;
- a halted (failed or aborted) plan is planned again, in a new generation, by a change seen
  after it halted (``seen_index`` past the ``halt_index`` recorded by the halting write), whichever
  member reports it first; a late event of the change that halted it does not un-halt it.

``join=True`` (a rollout that was not asked to restart ``--again``) joins a ``planned`` plan
instead: members of the current generation are left as they are and no generation is opened.

Concurrency: a member counts against ``concurrent_lock_count`` while it is ``restarting``, and
also while it is ``failed`` in the current generation of a plan that goes on (``max_failures`` not
exceeded) until :func:`recover` records that its task is healthy again, or an operator aborts or
resumes: a failed restart leaves its task down, and the limit counts what is really down.

``max_failures`` is how many failed restarts a generation tolerates: the plan halts when the
failures exceed it (0: at the first).

Members whose allocation Nomad stopped, replaced or garbage-collected are ``skipped`` (settled,
never a failure). A registration drops settled members of allocations Nomad replaced: those of
an earlier allocation with the same index as one it registers (a replacement keeps its
allocation's name and index; a failed member of the current generation and one the registration
leaves alone are kept), and, when the caller knows the job's ``live`` allocations (a rollout),
those of every other allocation. So the plan stays bounded however many deployments the job sees:
about one settled member per allocation index, without a Nomad read.

Wire format: JSON with ``"schema": 1``. A value that is not such JSON (corrupt, or written by
something else) is logged with its key and replaced by a fresh plan on the next update.
"""

from __future__ import annotations

import enum
import functools
import itertools
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shepard_lib.backends import ConsulAPI
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.errors import ConfigError, ConsulError, LockLost, PlanError
from shepard_lib.model import Job, TxnOp, TxnVerb
from shepard_lib.perbackend import PerBackend

__all__ = [
    "CONCURRENCY_META",
    "MAX_FAILURES_META",
    "SCHEMA_VERSION",
    "ConcurrencyFull",
    "Member",
    "MemberSpec",
    "MemberState",
    "MemberUnavailable",
    "Plan",
    "PlanFormatError",
    "PlanSettings",
    "PlanStatus",
    "PlanStore",
    "abort",
    "claim",
    "down",
    "finish",
    "new_plan",
    "reclaim",
    "recover",
    "register",
    "require",
    "resolve_settings",
    "resume",
    "skip",
    "unclaim",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
CONCURRENCY_META = "shepard_concurrency"
MAX_FAILURES_META = "shepard_max_failures"


class PlanStatus(enum.StrEnum):
    """Where a plan stands; only ``planned`` lets anyone start a restart."""

    PLANNED = "planned"
    COMPLETE = "complete"
    FAILED = "failed"  # max_failures exceeded: halted until resume or a new change
    ABORTED = "aborted"  # halted by an operator: halted until resume or a new change


class MemberState(enum.StrEnum):
    """Where one allocation stands in the plan."""

    PENDING = "pending"
    RESTARTING = "restarting"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # its allocation was stopped, replaced or garbage-collected: settled


HALTED = frozenset({PlanStatus.FAILED, PlanStatus.ABORTED})
SETTLED = frozenset({MemberState.DONE, MemberState.FAILED, MemberState.SKIPPED})


class PlanFormatError(PlanError):
    """The ``task_lock`` value is not a Shepard plan of a schema this code reads."""


class MemberUnavailable(PlanError):
    """A transition does not apply to the member as it is now (claimed by someone else, halted...).

    ``reason`` is a short phrase for logs and results (``"restarting, held by ..."``).
    """

    def __init__(self, alloc_id: str, reason: str) -> None:
        self.alloc_id = alloc_id
        self.reason = reason
        super().__init__(f"allocation {alloc_id}: {reason}")


class ConcurrencyFull(MemberUnavailable):
    """A claim refused because ``concurrent_lock_count`` members are down already (see :func:`down`)."""


@dataclass(frozen=True)
class PlanSettings:
    """The numbers a plan is created with; fixed for the plan while it is active.

    ``max_failures`` is how many failed restarts are tolerated: the plan halts past it (0: at the first).
    """

    concurrency: int = 1
    max_failures: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class MemberSpec:
    """An allocation asking to be part of the plan."""

    alloc_id: str
    node: str
    alloc_index: int


@dataclass(frozen=True)
class Member:
    """One allocation of the plan.

    ``holder`` is the unique token of one claim (several coordinators may share one session; a
    member is held by exactly one claim), ``session`` that claimant's Consul session ID (a member
    whose session is gone can be reclaimed) and ``holder_name`` says who it is, for humans.
    ``restarts_before`` / ``started_before`` are the task's restart count and start time read
    before the trigger, so a reclaimer can tell whether the restart already took effect (with
    method consul_key the claim and the trigger are one transaction: a claimed member was triggered).
    ``claim_index`` is the plan ModifyIndex the claim was applied at (see the module docs).
    ``recovered`` marks a failed member whose task is healthy again (it no longer counts as down).
    ``error`` is why it failed, or why it was skipped.
    """

    state: MemberState
    node: str
    alloc_index: int
    generation: int
    updated_at: float
    holder: str | None = None
    session: str | None = None
    holder_name: str | None = None
    restarts_before: int | None = None
    started_before: float | None = None
    claim_index: int | None = None
    rerun: bool = False
    recovered: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The member as it appears in the plan JSON."""
        return {
            "state": self.state.value,
            "node": self.node,
            "alloc_index": self.alloc_index,
            "generation": self.generation,
            "holder": self.holder,
            "session": self.session,
            "holder_name": self.holder_name,
            "restarts_before": self.restarts_before,
            "started_before": self.started_before,
            "claim_index": self.claim_index,
            "rerun": self.rerun,
            "recovered": self.recovered,
            "updated_at": self.updated_at,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Member:
        """Parse one member; raises KeyError/TypeError/ValueError on a malformed one."""
        return cls(
            state=MemberState(data["state"]),
            node=_str(data["node"]),
            alloc_index=_int(data["alloc_index"]),
            generation=_int(data["generation"]),
            updated_at=_float(data["updated_at"]),
            holder=_opt(data.get("holder"), _str),
            session=_opt(data.get("session"), _str),
            holder_name=_opt(data.get("holder_name"), _str),
            restarts_before=_opt(data.get("restarts_before"), _int),
            started_before=_opt(data.get("started_before"), _float),
            claim_index=_opt(data.get("claim_index"), _int),
            rerun=bool(data.get("rerun", False)),
            recovered=bool(data.get("recovered", False)),
            error=_opt(data.get("error"), _str),
        )


@dataclass(frozen=True)
class Plan:
    """The restart plan of one task scope (job/group/task, plus node when lock_scope is node).

    ``method`` and ``health_source`` are how this plan restarts and judges its members, recorded
    when it was created or re-opened, so a resume or a reclaimer uses the plan's, not its own
    configuration's. ``halt_index`` is the plan ModifyIndex the halting write was applied at.
    """

    job: str
    group: str
    task: str
    node: str | None
    status: PlanStatus
    generation: int
    instance_count: int
    concurrent_lock_count: int
    max_failures: int
    created_at: float
    updated_at: float
    members: Mapping[str, Member] = field(default_factory=dict)
    halt_reason: str | None = None
    halt_index: int | None = None
    method: str | None = None
    health_source: str | None = None

    @property
    def label(self) -> str:
        """``job/group/task`` (with ``@node`` for a node-scoped plan), for logs."""
        base = f"{self.job}/{self.group}/{self.task}"
        return f"{base}@{self.node}" if self.node else base

    @property
    def halted(self) -> bool:
        """Failed or aborted: nobody may start a restart."""
        return self.status in HALTED

    def in_state(self, state: MemberState) -> dict[str, Member]:
        """The members in ``state``, by allocation ID."""
        return {a: m for a, m in self.members.items() if m.state == state}

    def failures(self) -> int:
        """Failed members of the current generation: what counts against max_failures."""
        return sum(
            1
            for m in self.members.values()
            if m.state == MemberState.FAILED and m.generation == self.generation
        )

    def to_json(self) -> dict[str, Any]:
        """The plan as stored in Consul."""
        return {
            "schema": SCHEMA_VERSION,
            "kind": "shepard.plan",
            "job": self.job,
            "group": self.group,
            "task": self.task,
            "node": self.node,
            "status": self.status.value,
            "generation": self.generation,
            "instance_count": self.instance_count,
            "concurrent_lock_count": self.concurrent_lock_count,
            "max_failures": self.max_failures,
            "halt_reason": self.halt_reason,
            "halt_index": self.halt_index,
            "method": self.method,
            "health_source": self.health_source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "members": {a: m.to_json() for a, m in sorted(self.members.items())},
        }

    def encode(self) -> bytes:
        """The bytes written to ``task_lock``: :meth:`to_json`, members without their unset fields
        (None, False), which :meth:`Member.from_json` restores. Consul refuses a value over 512 KiB:
        a pending member costs about 130 bytes, a settled one about 250."""
        data = self.to_json()
        data["members"] = {
            alloc_id: {k: v for k, v in member.items() if v is not None and v is not False}
            for alloc_id, member in data["members"].items()
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | None) -> Plan:
        """Parse a ``task_lock`` value; raises :class:`PlanFormatError` saying what is wrong."""
        if not raw:
            raise PlanFormatError("empty value")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanFormatError(f"not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != "shepard.plan":
            raise PlanFormatError('not a Shepard plan (no "kind": "shepard.plan")')
        if data.get("schema") != SCHEMA_VERSION:
            raise PlanFormatError(f"plan schema {data.get('schema')!r}, this Shepard reads {SCHEMA_VERSION}")
        try:
            members = data["members"]
            if not isinstance(members, dict):
                raise TypeError("members is not an object")
            return cls(
                job=_str(data["job"]),
                group=_str(data["group"]),
                task=_str(data["task"]),
                node=_opt(data.get("node"), _str),
                status=PlanStatus(data["status"]),
                generation=_int(data["generation"]),
                instance_count=_int(data["instance_count"]),
                concurrent_lock_count=_positive(data["concurrent_lock_count"]),
                max_failures=_not_negative(data["max_failures"]),
                created_at=_float(data["created_at"]),
                updated_at=_float(data["updated_at"]),
                members={_str(a): Member.from_json(m) for a, m in members.items()},
                halt_reason=_opt(data.get("halt_reason"), _str),
                halt_index=_opt(data.get("halt_index"), _int),
                method=_opt(data.get("method"), _str),
                health_source=_opt(data.get("health_source"), _str),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFormatError(f"malformed plan ({type(exc).__name__}: {exc})") from None


# --- settings ---------------------------------------------------------------------------------


def resolve_settings(job: Job, group: str, *, concurrency: int, max_failures: int) -> PlanSettings:
    """Concurrency and max_failures for a new plan of ``job``/``group``.

    ``concurrency``/``max_failures`` are the configured defaults; job meta ``shepard_concurrency``
    / ``shepard_max_failures`` override them, and the group's meta overrides the job's. A bad
    meta value is a :class:`ConfigError` naming the job, the group and the meta key.
    """
    tg = job.group(group)
    group_meta: Mapping[str, str] = tg.meta if tg is not None else {}
    problems: list[str] = []
    values = {CONCURRENCY_META: concurrency, MAX_FAILURES_META: max_failures}
    least = {CONCURRENCY_META: 1, MAX_FAILURES_META: 0}
    for key in values:
        for where, meta in ((f"job {job.id!r}", job.meta), (f"job {job.id!r} group {group!r}", group_meta)):
            if key not in meta:
                continue
            raw = meta[key]
            try:
                number = int(str(raw).strip())
            except ValueError:
                number = -1
            if number < least[key]:
                problems.append(f"{where}: meta {key} = {raw!r} is not a whole number >= {least[key]}")
            else:
                values[key] = number
    if problems:
        raise ConfigError(problems)
    return PlanSettings(concurrency=values[CONCURRENCY_META], max_failures=values[MAX_FAILURES_META])


# --- transitions (pure) -----------------------------------------------------------------------


def down(plan: Plan) -> dict[str, Member]:
    """The members that count against the concurrency: restarting, or failed and not yet recovered.

    A failed member of the current generation counts until its task is healthy again
    (:func:`recover`) or the plan leaves that generation (resume, a new change).
    """
    return {
        a: m
        for a, m in plan.members.items()
        if m.state == MemberState.RESTARTING
        or (m.state == MemberState.FAILED and m.generation == plan.generation and not m.recovered)
    }


def new_plan(
    job: str,
    group: str,
    task: str,
    node: str | None,
    *,
    instance_count: int,
    settings: PlanSettings,
    now: float,
    method: str | None = None,
    health_source: str | None = None,
) -> Plan:
    """An empty ``planned`` plan at generation 1."""
    return Plan(
        job=job,
        group=group,
        task=task,
        node=node,
        status=PlanStatus.PLANNED,
        generation=1,
        instance_count=instance_count,
        concurrent_lock_count=settings.concurrency,
        max_failures=settings.max_failures,
        created_at=now,
        updated_at=now,
        method=method,
        health_source=health_source,
    )


def register(
    plan: Plan,
    specs: Iterable[MemberSpec],
    *,
    now: float,
    index: int = 0,
    seen_index: int | None = None,
    settings: PlanSettings | None = None,
    instance_count: int | None = None,
    method: str | None = None,
    health_source: str | None = None,
    live: Iterable[str] | None = None,
    join: bool = False,
) -> Plan:
    """Register allocations that need a restart (one change event, or one rollout request).

    ``index`` is the plan ModifyIndex this registration is applied at and ``seen_index`` (default
    ``index``) the plan's ModifyIndex read after the change was seen; ``join`` joins a planned
    plan without opening a generation. See the module docstring for the generation rules.
    ``settings``, ``instance_count``, ``method`` and ``health_source`` are applied only when the
    plan is not active (complete, or a new change with nothing restarting): an active plan keeps
    the concurrency it was created with, so every participant uses the same slots. Settled
    members of allocations replaced by one of ``specs`` (the same index) are dropped; ``live``
    (every live allocation of the job, when the caller knows them) drops the settled members of
    the others too.
    """
    seen = index if seen_index is None else seen_index
    specs = list(specs)

    def covered(m: Member) -> bool:
        if join and plan.status == PlanStatus.PLANNED and m.generation == plan.generation:
            return True
        return m.claim_index is not None and m.claim_index >= seen

    members = _pruned(plan, specs, live, covered)

    reopened = plan.halted and (plan.halt_index is None or seen > plan.halt_index)
    new_change = reopened or (
        not (join and plan.status == PlanStatus.PLANNED)
        and any(
            (m := members.get(s.alloc_id)) is not None
            and m.generation == plan.generation
            and m.state != MemberState.PENDING
            and not covered(m)
            for s in specs
        )
    )
    generation = plan.generation + 1 if new_change else plan.generation
    if new_change:
        for alloc_id, m in members.items():
            if m.state == MemberState.PENDING:
                members[alloc_id] = replace(m, generation=generation, updated_at=now)
    for s in specs:
        m = members.get(s.alloc_id)
        if m is None:
            members[s.alloc_id] = Member(
                MemberState.PENDING, s.node, s.alloc_index, generation, updated_at=now
            )
        elif covered(m):
            continue
        elif m.state in SETTLED:
            members[s.alloc_id] = replace(_back_to_pending(m, now), generation=generation)
        elif m.state == MemberState.RESTARTING:
            # Its restart began before the change: restart it once more when it finishes.
            if not m.rerun:
                members[s.alloc_id] = replace(m, rerun=True, updated_at=now)
        elif m.generation != generation:
            members[s.alloc_id] = replace(m, generation=generation, updated_at=now)
    status, halt_reason, halt_index = plan.status, plan.halt_reason, plan.halt_index
    if new_change or (status == PlanStatus.COMPLETE and members != plan.members):
        status, halt_reason, halt_index = PlanStatus.PLANNED, None, None
    updated = replace(
        plan,
        members=members,
        generation=generation,
        status=status,
        halt_reason=halt_reason,
        halt_index=halt_index,
    )
    if plan.status == PlanStatus.COMPLETE or (new_change and not plan.in_state(MemberState.RESTARTING)):
        if settings is not None:
            updated = replace(
                updated, concurrent_lock_count=settings.concurrency, max_failures=settings.max_failures
            )
        if instance_count is not None:
            updated = replace(updated, instance_count=instance_count)
        if method is not None:
            updated = replace(updated, method=method, health_source=health_source)
    if updated == plan:
        return plan
    return _settle(replace(updated, updated_at=now), index)


def _pruned(
    plan: Plan, specs: Sequence[MemberSpec], live: Iterable[str] | None, covered: Callable[[Member], bool]
) -> dict[str, Member]:
    """``plan``'s members without the settled ones a registration of ``specs`` may drop (module docs).

    Dropped: settled members of allocations not in ``live`` (when known), and settled members of
    an earlier allocation with the same index as a spec (Nomad's replacement of an allocation keeps
    its name and index). Kept: pending and restarting members, a failed member of the current
    generation (it counts against max_failures, and against the concurrency while its task is
    down), and one the registration leaves alone (``covered``).
    """
    alive = set(live) if live is not None else None
    ids = {s.alloc_id for s in specs}
    indexes = {s.alloc_index for s in specs}

    def dropped(alloc_id: str, m: Member) -> bool:
        if m.state not in SETTLED:
            return False
        if alive is not None and alloc_id not in alive:
            return True
        if alloc_id in ids or m.alloc_index not in indexes or covered(m):
            return False
        return not (m.state == MemberState.FAILED and m.generation == plan.generation)

    return {a: m for a, m in plan.members.items() if not dropped(a, m)}


def claim(
    plan: Plan,
    alloc_id: str,
    *,
    holder: str,
    session: str,
    holder_name: str,
    restarts_before: int,
    started_before: float | None,
    now: float,
    index: int = 0,
) -> Plan:
    """``pending`` -> ``restarting`` by ``holder``, applied at plan ModifyIndex ``index``; idempotent.

    Raises :class:`MemberUnavailable` when the plan is not ``planned`` or the member is not
    pending (someone else took it, it finished, or it is not in the plan), and
    :class:`ConcurrencyFull` when ``concurrent_lock_count`` members are down already
    (:func:`down`): a restart whose holder died keeps counting until it is reclaimed and seen
    through although its slot came free, and a failed restart until its task is healthy again.
    """
    m = _member(plan, alloc_id)
    if m.state == MemberState.RESTARTING and m.holder == holder:
        return plan
    if plan.status != PlanStatus.PLANNED:
        raise MemberUnavailable(alloc_id, _halted_reason(plan))
    if m.state != MemberState.PENDING:
        raise MemberUnavailable(alloc_id, _describe(m))
    busy = len(down(plan))
    if busy >= plan.concurrent_lock_count:
        raise ConcurrencyFull(
            alloc_id, f"{busy} member(s) restarting or failed, the concurrency of plan {plan.label}"
        )
    claimed = replace(
        m,
        state=MemberState.RESTARTING,
        holder=holder,
        session=session,
        holder_name=holder_name,
        restarts_before=restarts_before,
        started_before=started_before,
        claim_index=index,
        rerun=False,
        recovered=False,
        error=None,
        updated_at=now,
    )
    return _with_member(plan, alloc_id, claimed, now)


def reclaim(
    plan: Plan,
    alloc_id: str,
    *,
    dead_holder: str | None,
    holder: str,
    session: str,
    holder_name: str,
    now: float,
) -> Plan:
    """Take over a ``restarting`` member whose claim ``dead_holder`` is no longer driven by anyone.

    The caller checked that ``dead_holder``'s session is gone (or, for its own session, that no
    coordinator of it holds that claim); the transition only applies while the member is still
    held by that claim. ``restarts_before`` is kept, so the new holder can tell whether the dead
    holder's trigger already took effect. Reclaiming is allowed on a halted plan too: it
    finishes an in-flight restart, it does not start a new one.
    """
    m = _member(plan, alloc_id)
    if m.state == MemberState.RESTARTING and m.holder == holder:
        return plan
    if m.state != MemberState.RESTARTING or m.holder != dead_holder:
        raise MemberUnavailable(alloc_id, _describe(m))
    taken = replace(m, holder=holder, session=session, holder_name=holder_name, updated_at=now)
    return _with_member(plan, alloc_id, taken, now)


def unclaim(
    plan: Plan, alloc_id: str, *, holder: str, now: float, index: int = 0, error: str | None = None
) -> Plan:
    """``restarting`` -> ``pending``: the holder gives the member back without having triggered it."""
    m = _member(plan, alloc_id)
    if m.state != MemberState.RESTARTING or m.holder != holder:
        if m.state == MemberState.PENDING:
            return plan  # our own earlier write that we did not see acknowledged
        raise MemberUnavailable(alloc_id, _describe(m))
    back = replace(_back_to_pending(m, now), generation=plan.generation, error=error)
    return _settle(_with_member(plan, alloc_id, back, now), index)


def finish(
    plan: Plan,
    alloc_id: str,
    *,
    holder: str,
    ok: bool,
    now: float,
    index: int = 0,
    error: str | None = None,
) -> Plan:
    """``restarting`` -> ``done`` / ``failed``, or back to ``pending`` when it was marked ``rerun``.

    Then the plan becomes ``failed`` when the failures of the current generation exceed
    max_failures (recording ``halt_index``), or ``complete`` when no member is pending or restarting.
    """
    m = _member(plan, alloc_id)
    if m.state != MemberState.RESTARTING or m.holder != holder:
        if m.holder == holder and m.state in SETTLED:
            return plan  # our own earlier write that we did not see acknowledged
        raise MemberUnavailable(alloc_id, _describe(m))
    if m.rerun:
        finished = replace(_back_to_pending(m, now), generation=plan.generation, error=None if ok else error)
    elif ok:
        # A done member is read for its holder (a finish whose answer was lost finds its own write)
        # and its claim index (the change it covers, see register); its session and baseline are
        # dropped, so that a plan of 2,000 done members stays within Consul's 512 KiB.
        finished = replace(
            m,
            state=MemberState.DONE,
            session=None,
            restarts_before=None,
            started_before=None,
            error=None,
            updated_at=now,
        )
    else:
        finished = replace(m, state=MemberState.FAILED, error=error, updated_at=now)
    return _settle(_with_member(plan, alloc_id, finished, now), index)


def skip(
    plan: Plan, alloc_id: str, *, reason: str, now: float, index: int = 0, holder: str | None = None
) -> Plan:
    """Settle a member whose allocation Nomad stopped, replaced or forgot as ``skipped`` (never a failure).

    A pending member is skipped by anyone; a restarting one only by its ``holder`` (who checked
    that its trigger did not restart it). Idempotent.
    """
    m = _member(plan, alloc_id)
    if m.state == MemberState.SKIPPED:
        return plan
    if m.state == MemberState.RESTARTING and (holder is None or m.holder != holder):
        raise MemberUnavailable(alloc_id, _describe(m))
    if m.state not in (MemberState.PENDING, MemberState.RESTARTING):
        raise MemberUnavailable(alloc_id, _describe(m))
    skipped = replace(_back_to_pending(m, now), state=MemberState.SKIPPED, error=reason)
    return _settle(_with_member(plan, alloc_id, skipped, now), index)


def recover(plan: Plan, alloc_id: str, *, now: float) -> Plan:
    """A failed member's task is healthy again: it no longer counts against the concurrency. Idempotent."""
    m = _member(plan, alloc_id)
    if m.state != MemberState.FAILED or m.recovered:
        return plan
    return _with_member(plan, alloc_id, replace(m, recovered=True, updated_at=now), now)


def resume(plan: Plan, *, now: float) -> Plan:
    """An operator resumes a failed or aborted plan: failed members of this generation are pending again.

    Idempotent: a plan that is not halted (a resume whose answer was lost, or an orphaned
    ``planned`` plan the operator wants driven again) is returned unchanged.
    """
    if not plan.halted:
        return plan
    members = {
        a: (
            _back_to_pending(m, now)
            if m.state == MemberState.FAILED and m.generation == plan.generation
            else m
        )
        for a, m in plan.members.items()
    }
    return _settle(
        replace(
            plan,
            members=members,
            status=PlanStatus.PLANNED,
            halt_reason=None,
            halt_index=None,
            updated_at=now,
        ),
        0,
    )


def abort(plan: Plan, *, reason: str, now: float, index: int = 0) -> Plan:
    """An operator stops a plan: nobody starts a restart; in-flight restarts finish. Idempotent."""
    if plan.status == PlanStatus.COMPLETE:
        raise PlanError(f"plan {plan.label} is complete: nothing to abort")
    if plan.status == PlanStatus.ABORTED:
        return plan
    return replace(plan, status=PlanStatus.ABORTED, halt_reason=reason, halt_index=index, updated_at=now)


def require(plan: Plan | None, key: str) -> Plan:
    """``plan``, or a PlanError when an update finds no plan at ``key`` any more."""
    if plan is None:
        raise PlanError(f"plan {key} disappeared (deleted, or replaced after it became unreadable)")
    return plan


def _settle(plan: Plan, index: int) -> Plan:
    """Recompute the plan status after a member changed; ``index``: where this write is applied."""
    if plan.status == PlanStatus.PLANNED and plan.failures() > plan.max_failures:
        return replace(
            plan,
            status=PlanStatus.FAILED,
            halt_reason=f"{plan.failures()} failed restart(s) exceeded max_failures={plan.max_failures}",
            halt_index=index,
        )
    active = any(m.state in (MemberState.PENDING, MemberState.RESTARTING) for m in plan.members.values())
    if plan.status == PlanStatus.PLANNED and not active:
        return replace(plan, status=PlanStatus.COMPLETE)
    if plan.status == PlanStatus.COMPLETE and active:
        return replace(plan, status=PlanStatus.PLANNED)
    return plan


def _back_to_pending(m: Member, now: float) -> Member:
    return replace(
        m,
        state=MemberState.PENDING,
        holder=None,
        session=None,
        holder_name=None,
        restarts_before=None,
        started_before=None,
        claim_index=None,
        rerun=False,
        recovered=False,
        error=None,
        updated_at=now,
    )


def _member(plan: Plan, alloc_id: str) -> Member:
    m = plan.members.get(alloc_id)
    if m is None:
        raise MemberUnavailable(alloc_id, f"not a member of plan {plan.label}")
    return m


def _with_member(plan: Plan, alloc_id: str, member: Member, now: float) -> Plan:
    return replace(plan, members={**plan.members, alloc_id: member}, updated_at=now)


def _describe(m: Member) -> str:
    if m.state == MemberState.RESTARTING:
        return f"restarting, held by {m.holder_name or m.holder}"
    return f"{m.state.value} in generation {m.generation}"


def _halted_reason(plan: Plan) -> str:
    reason = f": {plan.halt_reason}" if plan.halt_reason else ""
    return f"plan {plan.label} is {plan.status.value}{reason}"


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _positive(value: Any) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError(f"expected an integer >= 1, got {number}")
    return number


def _not_negative(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {number}")
    return number


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _opt(value: Any, parse: Callable[[Any], Any]) -> Any:
    return None if value is None else parse(value)


# --- storage ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _decode_plan(raw: bytes | None) -> Plan:
    """:meth:`Plan.decode`, once per distinct value: every worker of a rollout reads the same plans.

    Plans are frozen values, so sharing one decoded plan between threads is safe.
    """
    return Plan.decode(raw)


class _KnownPlans:
    """The last plan value and ModifyIndex seen per key, shared by the stores on one Consul backend.

    Only ever used to write with ``cas`` (a stale entry costs a refused write and a read, never a
    wrong decision): what a caller decides on comes from :meth:`PlanStore.read` or from a write
    that Consul accepted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: dict[str, tuple[Plan | None, int]] = {}
        self._reads: dict[str, int] = {}  # the read mark of a known plan that a consistent read gave
        self._writers: dict[str, threading.Lock] = {}

    def writing(self, key: str) -> threading.Lock:
        """The lock the writers of ``key`` in this process take turns with."""
        with self._lock:
            return self._writers.setdefault(key, threading.Lock())

    def get(self, key: str) -> tuple[Plan | None, int] | None:
        with self._lock:
            return self._plans.get(key)

    def put(self, key: str, plan: Plan | None, index: int, *, read_mark: int | None = None) -> None:
        """Remember ``plan`` at ``index`` unless something newer is known (always when ``read_mark``
        is given: what a consistent read sent at that mark answered; the mark is taken before the
        request, so that a read sent before a write and answered after it concludes nothing made
        after that write)."""
        with self._lock:
            known = self._plans.get(key)
            if read_mark is not None or known is None or index >= known[1]:
                self._plans[key] = (plan, index)
                if read_mark is not None:
                    self._reads[key] = read_mark
                else:
                    self._reads.pop(key, None)

    def read_since(self, key: str, mark: int) -> bool:
        """Whether the plan known for ``key`` is what a consistent read made after ``mark`` gave."""
        with self._lock:
            return self._reads.get(key, 0) > mark

    def forget(self, key: str) -> None:
        with self._lock:
            self._plans.pop(key, None)
            self._reads.pop(key, None)


_READ_MARKS = itertools.count(1)
"""Consistent plan reads in the process, numbered in the order they were made (see :meth:`PlanStore.mark`)."""


_known_for = PerBackend(_KnownPlans)
"""The plans last seen on a Consul backend (shared by its stores in the process)."""


def _ambiguous(exc: ConsulError) -> bool:
    """A write error that says nothing about whether it applied (no answer, or a 5xx outage)."""
    return exc.status is None or exc.status >= 500


class PlanStore:
    """Reads and CAS-updates plans in Consul.

    ``update(key, change)`` calls the pure ``change`` on the plan (None when there is no plan, or
    when the value is corrupt or foreign: that is logged with the key and the value is replaced)
    and writes the result with a one-operation txn ``cas`` on the plan's ModifyIndex. The plan
    and index it starts from are the last ones seen on this Consul backend in this process (a
    read, a blocking answer, an accepted write, whose txn result carries the new ModifyIndex), so
    an update usually costs one request; it reads the key (consistently) only when nothing is
    known, when the CAS is refused, or when ``change`` refuses or keeps a plan that was not just
    read. On a refused CAS after a fresh read it waits a jittered, growing backoff before the next
    attempt, at most ``attempts`` in all. A ``change`` that returns the plan unchanged writes
    nothing. Exceptions of ``change`` (such as :class:`MemberUnavailable`) on a fresh read
    propagate and nothing is written.

    A write whose answer was lost (a transport error or a 5xx) may have been applied: the next
    attempt reads the key and, if it holds exactly what was written, counts the write as done;
    otherwise ``change`` runs again on what is there (transitions treat the caller's own earlier
    write as done).
    """

    def __init__(
        self,
        consul: ConsulAPI,
        *,
        clock: Clock = REAL_CLOCK,
        attempts: int = 30,
        backoff: float = 0.05,
        rng: random.Random | None = None,
    ) -> None:
        self._consul = consul
        self._clock = clock
        self._attempts = attempts
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._known = _known_for(consul)

    def read(self, key: str) -> tuple[Plan | None, int]:
        """The plan at ``key`` (None if absent, corrupt or foreign) and its ModifyIndex (0 if absent)."""
        plan, index, _ = self._read(key)
        return plan, index

    def _read(self, key: str) -> tuple[Plan | None, int, bytes | None]:
        mark = self.mark()  # before the request: what the read answers was true at least then
        entry = self._consul.get(key, consistent=True)
        if entry is None:
            self._known.put(key, None, 0, read_mark=mark)
            return None, 0, None
        plan = self._decode(key, entry.value)
        self._known.put(key, plan, entry.modify_index, read_mark=mark)
        return plan, entry.modify_index, entry.value

    @staticmethod
    def _decode(key: str, raw: bytes | None) -> Plan | None:
        try:
            return _decode_plan(raw)
        except PlanFormatError as exc:
            log.warning(
                "plan key %s holds a corrupt or foreign value (%s); it will be replaced by a fresh plan",
                key,
                exc,
            )
            return None

    def known(self, key: str) -> tuple[Plan | None, int]:
        """The plan at ``key`` as last seen in this process (a read when nothing is known).

        It may be stale: act on it (every write is a CAS that a stale plan cannot pass), but
        conclude from :meth:`read`.
        """
        known = self._known.get(key)
        return known if known is not None else self.read(key)

    @staticmethod
    def mark() -> int:
        """A point in this process's sequence of consistent plan reads: :meth:`read_since` tells
        whether the plan known for a key was read consistently after it."""
        return next(_READ_MARKS)

    def read_since(self, key: str, mark: int) -> bool:
        """Whether the plan :meth:`known` returns for ``key`` came from a consistent read made after
        ``mark`` (and nothing newer replaced it): what such a read showed settled may be concluded on."""
        return self._known.read_since(key, mark)

    def load(self, key: str) -> Plan | None:
        """The plan at ``key``, or None."""
        return self.read(key)[0]

    def update(self, key: str, change: Callable[[Plan | None], Plan]) -> Plan:
        """Apply ``change`` atomically (see the class docstring); returns the plan as written."""
        return self.update_at(key, lambda plan, _index: change(plan))

    def update_at(
        self,
        key: str,
        change: Callable[[Plan | None, int], Plan],
        *,
        ops: Sequence[TxnOp] = (),
        read_first: bool = False,
    ) -> Plan:
        """:meth:`update` with ``change(plan, index)``: ``index`` is the ModifyIndex the write is based on.

        ``ops`` go into the same transaction after the plan's ``cas``, so the plan is written only
        with them and they apply only with it (a fence such as the slot's ``check-index``, a
        trigger, a slot's ``unlock``). When one of them is refused nothing is written and
        :class:`~shepard_lib.errors.LockLost` is raised with Consul's reasons. ``read_first``: the
        first attempt reads the plan (consistently) instead of trying what is known: the ``index`` of
        the first ``change`` call is Consul's index now, never a stale one, and a caller that expects
        another process to have written the plan since it was last seen here makes a read and a
        write, not a refused write, a read and a write.
        """
        last_error: Exception | None = None
        unanswered: bytes | None = None  # what a write whose answer was lost tried to store
        for attempt in range(self._attempts):
            backoff = self._rng.uniform(0, self._backoff * 2 ** min(attempt, 6))
            # Writers of one key in this process take turns, so they never refuse each other's CAS.
            with self._known.writing(key):
                known = None if read_first and attempt == 0 else self._known.get(key)
                fresh = known is None
                try:
                    if known is None:
                        plan, index, raw = self._read(key)
                        if unanswered is not None and raw == unanswered and plan is not None:
                            return plan  # the write whose answer was lost did apply
                    else:
                        plan, index = known
                    updated = change(plan, index)
                except ConsulError as exc:
                    if not exc.transient:
                        raise
                    last_error = exc
                    updated = None
                except Exception:
                    if fresh:
                        raise
                    self._known.forget(key)  # refused on what was known: decide on what is there
                    continue
                if updated is None:
                    pass
                elif updated is plan:
                    if fresh:
                        return updated
                    self._known.forget(key)  # nothing to write on what was known: confirm with a read
                    continue
                else:
                    encoded = updated.encode()
                    try:
                        result = self._consul.txn(
                            [TxnOp(TxnVerb.CAS, key, value=encoded, index=index), *ops]
                        )
                    except ConsulError as exc:
                        if not _ambiguous(exc):
                            raise
                        self._known.forget(key)
                        unanswered, last_error = encoded, exc
                    else:
                        if result.ok:
                            written = result.results[0].modify_index if result.results else 0
                            if written:
                                self._known.put(key, updated, written)
                            else:
                                self._known.forget(key)
                            return updated
                        refused = [what for number, what in result.errors if number > 0]
                        if refused:
                            raise LockLost(f"plan {key} not written: {'; '.join(refused)}")
                        self._known.forget(key)
                        last_error = None
                        if not fresh:
                            continue  # what was known was stale: read and try again at once
            self._clock.sleep(backoff)  # a real race with another writer, or an error: spread the retries
        if last_error is not None:
            raise PlanError(
                f"plan {key}: Consul kept failing ({last_error}); giving up after {self._attempts} attempts"
            ) from last_error
        raise PlanError(
            f"plan {key}: {self._attempts} concurrent updates in a row won the CAS race; giving up"
        )

    def watch(self, key: str, index: int, wait: float, *, cancel: CancelEvent | None = None) -> int:
        """Block until the plan key changes past ``index`` (or ``wait`` cluster seconds); the new index.

        The answer's value is remembered for the next update. Setting ``cancel`` ends the wait with
        :class:`~shepard_lib.errors.Cancelled`.
        """
        new_index, entries = self._consul.watch(key, index, wait, cancel=cancel)
        entry = next((e for e in entries if e.key == key), None)
        if entry is None:
            self._known.forget(key)
        else:
            self._known.put(key, self._decode(key, entry.value), entry.modify_index)
        return new_index
