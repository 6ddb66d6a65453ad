"""What a garbage-collection pass decided and did: rules, skip reasons and the report.

Every key the pass deletes (or, in a dry run, would delete) carries the :class:`Rule` that made it
garbage; every key that looked like garbage but was spared carries a :class:`SkipReason`. The
report's counts by rule and by reason are what the agent exports as
``shepard_gc_deleted_total{rule}`` and ``shepard_gc_skipped_total{reason}``.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class GCScope(enum.StrEnum):
    """What one pass looks at."""

    NODE = "node"  # trigger keys of one node (each agent, its own)
    CLUSTER = "cluster"  # every Shepard key, one agent at a time (the GC leader)


class Rule(enum.StrEnum):
    """Why a key is garbage."""

    ALLOC_GONE = "alloc_gone"  # trigger key with no live allocation on its (ready) node
    JOB_GONE = "job_gone"  # trigger, plan or slot of a job that no longer exists or is stopped/dead
    NODE_GONE = "node_gone"  # keys of a node Nomad no longer lists
    NODE_DOWN = "node_down"  # keys of a node down for node_cleanup_timeout or longer
    PLAN_EXPIRED = "plan_expired"  # complete plan older than gc_plan_retention, and its free slots
    PLAN_GONE = "plan_gone"  # free slot whose task has no plan any more


class SkipReason(enum.StrEnum):
    """Why a key that looked like garbage was not deleted."""

    HELD = "held"  # held by a live session (a slot in use, an agent heartbeat)
    PLAN_RESTARTING = "plan_restarting"  # its plan has a member restarting
    NODE_DOWN_RECENTLY = "node_down_recently"  # its node is down for less than node_cleanup_timeout
    NODE_NOT_READY = "node_not_ready"  # its node is initializing, or unknown to a node pass
    PLAN_UNREADABLE = "plan_unreadable"  # the plan's value is not a plan this code reads
    UNKNOWN_KEY = "unknown_key"  # under the prefix but not a key Shepard writes: reported, never deleted
    CHANGED = "changed"  # written between the scan and the delete (delete-cas refused): it stays
    LOCK_LOST = "lock_lost"  # the GC leader lock was lost mid-pass: left for the next pass
    NOT_LEADER = "not_leader"  # another agent holds the GC leader lock and runs the cluster pass


@dataclass(frozen=True)
class Deletion:
    """A key found to be garbage: deleted only if its ModifyIndex is still ``modify_index``."""

    key: str
    modify_index: int
    rule: Rule
    why: str


@dataclass(frozen=True)
class Skip:
    """A key spared, and why (``key`` is empty for a pass-wide skip such as ``not_leader``)."""

    key: str
    reason: SkipReason
    why: str


@dataclass(frozen=True)
class Failure:
    """A delete that failed for another reason than a change (Consul refused it, or never answered)."""

    key: str
    error: str


@dataclass
class GCReport:
    """The outcome of one pass (:func:`shepard_lib.gc.collect_garbage`).

    ``planned`` is what the pass decided to delete; ``deleted`` what it did delete (empty in a dry
    run). ``error`` is set when the pass stopped before deleting anything it had not yet deleted
    (Consul or Nomad could not be asked): "could not ask" is never "gone".
    """

    scope: GCScope
    dry_run: bool
    node: str | None = None
    scanned: int = 0
    planned: list[Deletion] = field(default_factory=list)
    deleted: list[Deletion] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The pass ran to the end and every delete it tried either applied or met a changed key."""
        return self.error is None and not self.failed

    def deleted_by_rule(self) -> dict[str, int]:
        """Deleted keys (in a dry run: keys that would be deleted) counted by rule."""
        return dict(Counter(d.rule.value for d in (self.planned if self.dry_run else self.deleted)))

    def skipped_by_reason(self) -> dict[str, int]:
        """Spared keys counted by reason."""
        return dict(Counter(s.reason.value for s in self.skipped))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: counts, then every key grouped by rule or reason."""
        removed = self.planned if self.dry_run else self.deleted
        by_rule: dict[str, list[dict[str, str]]] = {}
        for d in removed:
            by_rule.setdefault(d.rule.value, []).append({"key": d.key, "why": d.why})
        by_reason: dict[str, list[dict[str, str]]] = {}
        for s in self.skipped:
            by_reason.setdefault(s.reason.value, []).append({"key": s.key, "why": s.why})
        return {
            "scope": self.scope.value,
            "node": self.node,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "error": self.error,
            "scanned": self.scanned,
            "deleted_count": len(removed),
            "deleted_by_rule": self.deleted_by_rule(),
            "skipped_by_reason": self.skipped_by_reason(),
            "failed_count": len(self.failed),
            "deleted": by_rule,
            "skipped": by_reason,
            "failed": [{"key": f.key, "error": f.error} for f in self.failed],
        }
