"""The pure part of garbage collection: which scanned keys are garbage, by which rule.

Input: the keys of one scan (:func:`classify` turns each KV entry into a :class:`ScannedKey`, plans
decoded to the few facts the rules need, so the pass keeps no values) and a :class:`NomadView`
(what Nomad said, read *after* the scan: an allocation that existed when a trigger key was
written is still listed unless it has stopped since). Output: :class:`Deletion` and :class:`Skip`
values; nothing here does I/O.

The rules (docs/design.md section 6):

- a trigger key ``keys/<node>/<job>/<group>/<task>/<index>`` with a live allocation (pending,
  running or unknown) of that job, group and index on that node is never garbage. Otherwise it
  goes when its node is gone from Nomad or down for ``node_cleanup_timeout`` (``node_gone``,
  ``node_down``), when its job no longer exists or is stopped or dead (``job_gone``), or when its
  node is ready and simply has no such allocation (``alloc_gone``). A node down for less than the
  timeout keeps its keys (``node_down_recently``), an initializing one too;
- ``nodes/<node>`` goes with its node (``node_gone``, ``node_down``);
- a plan (``task_lock``) goes when its job is gone (``job_gone``), its node is gone or down long
  enough (``lock_scope: node``), or it is ``complete`` and older than ``gc_plan_retention``
  (``plan_expired``); never while a member is ``restarting`` (but a plan of a gone job whose
  restarting members' holder sessions are all gone: nobody can resume them, and there is nothing
  left to restart), never when it cannot be read;
- a slot (``restart_lock/<i>``) goes with its job or node, with its plan (``plan_expired``), or
  when its task has no plan at all (``plan_gone``); never while held, never while its plan (kept) has a
  member restarting;
- any key that Shepard does not write is reported (``unknown_key``), never deleted.

A job matches by ID or by name (keys are written with the job ID, the template reads the job
name). Times: node ages compare Nomad's ``StatusUpdatedAt`` with the time of Nomad's answer
(``now``); plan ages compare the plan's ``updated_at`` (its writers' clocks) with the same ``now``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shepard_lib.durations import format_go_duration
from shepard_lib.keyspace import TASK_LOCK, Keyspace, TaskRef, TaskScope
from shepard_lib.model import Allocation, JobStub, KVEntry, NodeInfo
from shepard_lib.plan import MemberState, Plan, PlanError, PlanStatus

from .report import Deletion, Rule, Skip, SkipReason

__all__ = [
    "GCSettings",
    "KeyKind",
    "NodeState",
    "NomadView",
    "PlanFacts",
    "ScannedKey",
    "classify",
    "holder_sessions_to_check",
    "plan_cluster_pass",
    "plan_node_pass",
]

LIVE_CLIENT_STATUSES = frozenset({"pending", "running", "unknown"})
"""Allocation client statuses whose tasks may still read their trigger keys."""

READY = "ready"
DOWN_STATUSES = frozenset({"down", "disconnected"})

LiveKey = tuple[str, str, str, int]
"""``(node name, job, group, alloc index)`` of a live allocation."""


class KeyKind(enum.StrEnum):
    """What a scanned key is."""

    TRIGGER = "trigger"
    PLAN = "plan"
    SLOT = "slot"
    NODE = "node"
    GC_LEADER = "gc_leader"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PlanFacts:
    """What the rules need of a plan; ``status`` None when the value is not a readable plan.

    ``holders`` are the sessions of the ``restarting`` members (``""`` for a member without one).
    """

    status: PlanStatus | None
    restarting: int = 0
    updated_at: float = 0.0
    holders: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ScannedKey:
    """One key of the scan, parsed, without its value."""

    key: str
    modify_index: int
    session: str | None
    kind: KeyKind
    ref: TaskRef | None = None  # TRIGGER
    scope: TaskScope | None = None  # PLAN, SLOT
    node: str | None = None  # NODE
    plan: PlanFacts | None = None  # PLAN


@dataclass(frozen=True)
class NodeState:
    """One node name as Nomad sees it (several node records may share a name).

    ``status`` is ``ready`` when any record is ready, else ``initializing`` when any is, else
    ``down``/``disconnected``; ``since`` is then the latest ``StatusUpdatedAt`` (None: unknown).
    """

    status: str
    since: float | None = None

    @classmethod
    def of(cls, records: Iterable[NodeInfo]) -> NodeState:
        """Fold the records of one node name."""
        records = list(records)
        statuses = {r.status for r in records}
        for wanted in (READY, "initializing"):
            if wanted in statuses:
                return cls(wanted)
        others = statuses - DOWN_STATUSES
        if others:
            return cls(sorted(others)[0])
        times = [r.status_updated_at for r in records if r.status_updated_at > 0]
        status = "disconnected" if "disconnected" in statuses else "down"
        return cls(status, max(times) if len(times) == len(records) else None)


@dataclass(frozen=True)
class NomadView:
    """What Nomad said, as the rules need it.

    ``now`` is cluster time (Unix seconds of Nomad's answer); ``nodes`` by name; ``active_jobs``
    the IDs and names of jobs that exist and are neither stopped nor dead; ``live`` maps
    ``(node, job, group, index)`` of each live allocation (under its job's ID and name) to its task
    names (None when Nomad reported no task states yet).
    """

    now: float
    nodes: Mapping[str, NodeState]
    active_jobs: frozenset[str]
    live: Mapping[LiveKey, frozenset[str] | None]

    @classmethod
    def build(
        cls, now: float, nodes: Iterable[NodeInfo], jobs: Iterable[JobStub], allocations: Iterable[Allocation]
    ) -> NomadView:
        """The view from Nomad's lists (nodes with ``StatusUpdatedAt`` where they are not ready)."""
        by_name: dict[str, list[NodeInfo]] = {}
        for node in nodes:
            by_name.setdefault(node.name, []).append(node)
        jobs = list(jobs)
        names: dict[str, set[str]] = {}
        for job in jobs:
            names.setdefault(job.id, set()).update({job.id, job.name})
        active = frozenset(
            alias for j in jobs if not j.stop and j.status != "dead" for alias in (j.id, j.name)
        )
        live: dict[LiveKey, frozenset[str] | None] = {}
        for alloc in allocations:
            if alloc.client_status not in LIVE_CLIENT_STATUSES:
                continue
            tasks = frozenset(alloc.task_states) or None
            for alias in names.get(alloc.job_id, {alloc.job_id}):
                key = (alloc.node_name, alias, alloc.task_group, alloc.index)
                known = live.get(key, frozenset())
                live[key] = None if known is None or tasks is None else known | tasks
        return cls(now, {n: NodeState.of(r) for n, r in by_name.items()}, active, live)

    def is_live(self, ref: TaskRef) -> bool:
        """A live allocation of the trigger's job, group and index runs on its node (with that task)."""
        key = (ref.node, ref.job, ref.group, ref.alloc_index)
        if key not in self.live:
            return False
        tasks = self.live[key]
        return tasks is None or ref.task in tasks


@dataclass(frozen=True)
class GCSettings:
    """The two ages the rules use, in cluster seconds."""

    node_cleanup_timeout: float
    plan_retention: float


# --- classification ---------------------------------------------------------------------------


def classify(entry: KVEntry, keyspace: Keyspace) -> ScannedKey:
    """Parse one scanned entry with ``keyspace`` (decoding a plan to :class:`PlanFacts`)."""
    key = entry.key

    def scanned(kind: KeyKind, **parsed: object) -> ScannedKey:
        return ScannedKey(key, entry.modify_index, entry.session, kind, **parsed)  # type: ignore[arg-type]

    try:
        if key == keyspace.gc_leader_key():
            return scanned(KeyKind.GC_LEADER)
        if key.startswith(keyspace.keys_prefix()):
            return scanned(KeyKind.TRIGGER, ref=keyspace.parse_trigger_key(key))
        if key.startswith(keyspace.nodes_prefix()):
            return scanned(KeyKind.NODE, node=keyspace.parse_node_key(key))
        if key.startswith(keyspace.locks_prefix()):
            scope, kind, _slot = keyspace.parse_lock_key(key)
            if kind == TASK_LOCK:
                return scanned(KeyKind.PLAN, scope=scope, plan=_plan_facts(entry))
            return scanned(KeyKind.SLOT, scope=scope)
    except ValueError:
        pass
    return scanned(KeyKind.UNKNOWN)


def _plan_facts(entry: KVEntry) -> PlanFacts:
    try:
        plan = Plan.decode(entry.value)
    except PlanError:
        return PlanFacts(status=None)
    restarting = [m for m in plan.members.values() if m.state == MemberState.RESTARTING]
    return PlanFacts(
        status=plan.status,
        restarting=len(restarting),
        updated_at=plan.updated_at,
        holders=frozenset(m.session or "" for m in restarting),
    )


# --- the passes ---------------------------------------------------------------------------------


class _Decisions:
    def __init__(self) -> None:
        self.deletions: list[Deletion] = []
        self.skips: list[Skip] = []

    def delete(self, key: ScannedKey, rule: Rule, why: str) -> None:
        if key.session:
            self.skips.append(Skip(key.key, SkipReason.HELD, f"{why}, but held by session {key.session}"))
        else:
            self.deletions.append(Deletion(key.key, key.modify_index, rule, why))

    def skip(self, key: ScannedKey, reason: SkipReason, why: str) -> None:
        self.skips.append(Skip(key.key, reason, why))


def plan_node_pass(
    keys: Iterable[ScannedKey], view: NomadView, node: str
) -> tuple[list[Deletion], list[Skip]]:
    """The per-node rule over the scanned ``keys/<node>/`` tree: triggers with no live allocation there."""
    out = _Decisions()
    state = view.nodes.get(node)
    for key in keys:
        if key.kind is not KeyKind.TRIGGER or key.ref is None or key.ref.node != node:
            out.skip(key, SkipReason.UNKNOWN_KEY, "not a trigger key of this node")
            continue
        if view.is_live(key.ref):
            continue
        if state is None or state.status != READY:
            shown = "not in Nomad" if state is None else state.status
            out.skip(key, SkipReason.NODE_NOT_READY, f"node {node} is {shown}: left to the cluster pass")
        elif key.ref.job not in view.active_jobs:
            out.delete(key, Rule.JOB_GONE, f"job {key.ref.job} no longer exists or is stopped")
        else:
            out.delete(key, Rule.ALLOC_GONE, _no_alloc(key.ref))
    return out.deletions, out.skips


def holder_sessions_to_check(keys: Iterable[ScannedKey], view: NomadView) -> set[str]:
    """The holder sessions of the restarting members of plans whose job is gone.

    The pass asks Consul which of them still exist (read after the scan: a session named in a
    scanned plan existed before it, and a destroyed session never comes back) and passes the gone
    ones to :func:`plan_cluster_pass`.
    """
    return {
        holder
        for k in keys
        if k.kind is KeyKind.PLAN and k.plan is not None and k.scope is not None and k.plan.restarting
        if k.scope.job not in view.active_jobs
        for holder in k.plan.holders
        if holder
    }


def plan_cluster_pass(
    keys: Iterable[ScannedKey],
    view: NomadView,
    settings: GCSettings,
    gone_sessions: frozenset[str] = frozenset(),
) -> tuple[list[Deletion], list[Skip]]:
    """Every rule over a scan of the whole prefix; ``gone_sessions``: holder sessions known gone."""
    out = _Decisions()
    keys = list(keys)
    plans: dict[TaskScope, ScannedKey] = {}
    doomed_plans: dict[TaskScope, tuple[Rule, str]] = {}
    for key in keys:
        if key.kind is KeyKind.PLAN and key.scope is not None:
            plans[key.scope] = key
            verdict = _plan_verdict(key, view, settings, gone_sessions, out)
            if verdict is not None:
                doomed_plans[key.scope] = verdict
    for key in keys:
        if key.kind is KeyKind.UNKNOWN:
            out.skip(key, SkipReason.UNKNOWN_KEY, "not a key Shepard writes under its prefix")
        elif key.kind is KeyKind.TRIGGER and key.ref is not None:
            _trigger(key, key.ref, view, settings, out)
        elif key.kind is KeyKind.NODE and key.node is not None:
            rule, reason, why = _node_verdict(key.node, view, settings)
            if rule is not None:
                out.delete(key, rule, why)
            elif reason is SkipReason.NODE_DOWN_RECENTLY:
                out.skip(key, reason, why)
        elif key.kind is KeyKind.SLOT and key.scope is not None:
            _slot(key, key.scope, plans.get(key.scope), doomed_plans.get(key.scope), view, settings, out)
    return out.deletions, out.skips


def _trigger(key: ScannedKey, ref: TaskRef, view: NomadView, settings: GCSettings, out: _Decisions) -> None:
    if view.is_live(ref):
        return
    rule, reason, why = _node_verdict(ref.node, view, settings)
    if rule is not None:
        out.delete(key, rule, why)
    elif ref.job not in view.active_jobs:
        out.delete(key, Rule.JOB_GONE, f"job {ref.job} no longer exists or is stopped")
    elif reason is not None:
        out.skip(key, reason, why)
    else:
        out.delete(key, Rule.ALLOC_GONE, _no_alloc(ref))


def _plan_verdict(
    key: ScannedKey, view: NomadView, settings: GCSettings, gone_sessions: frozenset[str], out: _Decisions
) -> tuple[Rule, str] | None:
    """Decide a plan key; return the rule when the plan goes (its free slots go with it)."""
    assert key.scope is not None and key.plan is not None
    scope, facts = key.scope, key.plan
    verdict = _scope_verdict(scope, view, settings)
    if isinstance(verdict, Skip):
        out.skip(key, verdict.reason, verdict.why)
        return None
    if verdict is None and facts.status is PlanStatus.COMPLETE:
        age = view.now - facts.updated_at
        if age >= settings.plan_retention:
            verdict = (
                Rule.PLAN_EXPIRED,
                f"complete for {_age(age)} (gc_plan_retention {_age(settings.plan_retention)})",
            )
    if verdict is None:
        return None
    if facts.status is None:
        out.skip(
            key, SkipReason.PLAN_UNREADABLE, f"{verdict[1]}, but the value is not a plan this code reads"
        )
        return None
    if facts.restarting:
        if verdict[0] is not Rule.JOB_GONE or not facts.holders <= gone_sessions:
            out.skip(
                key, SkipReason.PLAN_RESTARTING, f"{verdict[1]}, but {facts.restarting} member(s) restarting"
            )
            return None
        verdict = (
            verdict[0],
            f"{verdict[1]}; the holders of its {facts.restarting} restarting member(s) are gone",
        )
    out.delete(key, *verdict)
    return verdict if not key.session else None


def _slot(
    key: ScannedKey,
    scope: TaskScope,
    plan: ScannedKey | None,
    doomed: tuple[Rule, str] | None,
    view: NomadView,
    settings: GCSettings,
    out: _Decisions,
) -> None:
    verdict = _scope_verdict(scope, view, settings)
    if isinstance(verdict, Skip):
        out.skip(key, verdict.reason, verdict.why)
        return
    if verdict is None:
        if plan is None:
            verdict = (Rule.PLAN_GONE, f"task {_label(scope)} has no plan")
        elif doomed is not None:
            verdict = (doomed[0], f"its plan goes: {doomed[1]}")
        else:
            return
    if plan is not None and plan.plan is not None and plan.plan.restarting and doomed is None:
        out.skip(key, SkipReason.PLAN_RESTARTING, f"{verdict[1]}, but its plan has a member restarting")
        return
    out.delete(key, *verdict)


def _scope_verdict(scope: TaskScope, view: NomadView, settings: GCSettings) -> tuple[Rule, str] | Skip | None:
    """Whether a plan's or slot's task is gone: by its node (lock_scope node), then by its job."""
    if scope.node is not None:
        rule, reason, why = _node_verdict(scope.node, view, settings)
        if rule is not None:
            return rule, why
        if reason is not None and scope.job in view.active_jobs:
            return Skip("", reason, why)
    if scope.job not in view.active_jobs:
        return Rule.JOB_GONE, f"job {scope.job} no longer exists or is stopped"
    return None


def _node_verdict(
    node: str, view: NomadView, settings: GCSettings
) -> tuple[Rule | None, SkipReason | None, str]:
    """``(rule, None, why)`` when the node's keys go, ``(None, reason, why)`` when they must stay for
    now, ``(None, None, "")`` when the node is ready."""
    state = view.nodes.get(node)
    if state is None:
        return Rule.NODE_GONE, None, f"node {node} is not in Nomad"
    if state.status == READY:
        return None, None, ""
    if state.status in DOWN_STATUSES:
        limit = _age(settings.node_cleanup_timeout)
        if state.since is None:
            return None, SkipReason.NODE_DOWN_RECENTLY, f"node {node} is {state.status} since an unknown time"
        age = view.now - state.since
        if age >= settings.node_cleanup_timeout:
            return (
                Rule.NODE_DOWN,
                None,
                f"node {node} {state.status} for {_age(age)} (node_cleanup_timeout {limit})",
            )
        return (
            None,
            SkipReason.NODE_DOWN_RECENTLY,
            f"node {node} {state.status} for {_age(max(age, 0.0))}, less than node_cleanup_timeout {limit}",
        )
    return None, SkipReason.NODE_NOT_READY, f"node {node} is {state.status}"


def _no_alloc(ref: TaskRef) -> str:
    return (
        f"no live allocation {ref.job}.{ref.group}[{ref.alloc_index}] with task {ref.task} on node {ref.node}"
    )


def _label(scope: TaskScope) -> str:
    base = f"{scope.job}/{scope.group}/{scope.task}"
    return f"{base}@{scope.node}" if scope.node else base


def _age(seconds: float) -> str:
    return format_go_duration(float(round(seconds)))
