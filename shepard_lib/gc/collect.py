"""One garbage-collection pass: scan, ask Nomad, decide (:mod:`.planner`), delete (:mod:`.executor`).

Order matters. The Consul scan comes first and Nomad is asked after it, so every allocation for
which a scanned trigger key was written is either in Nomad's answer or has stopped since. Any
failure to read either (an error, a timeout, an answer without ``X-Nomad-KnownLeader: true``)
ends the pass before anything is deleted: "could not ask" is never "gone".

The cluster pass runs under the GC leader lock (``<prefix>/gc/leader``) held with a session, so
only one agent runs it at a time; an agent that finds the lock held skips the pass
(``not_leader``). The lock fences the deletes: each delete transaction opens with a
``check-session`` on it, so Consul applies none once the session no longer holds it (``lock_lost``).
A dry run takes no lock, creates no session and writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack

from shepard_lib.backends import ConsulAPI, NomadListAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import ShepardConfig
from shepard_lib.errors import LockTimeout, ShepardError
from shepard_lib.keyspace import Keyspace
from shepard_lib.locks import Lock
from shepard_lib.model import Allocation, NodeInfo, TxnOp, TxnVerb
from shepard_lib.session import Session

from .executor import delete_all
from .planner import (
    READY,
    GCSettings,
    KeyKind,
    NomadView,
    ScannedKey,
    classify,
    holder_sessions_to_check,
    plan_cluster_pass,
    plan_node_pass,
)
from .report import Deletion, GCReport, GCScope, Skip, SkipReason

__all__ = ["collect_garbage"]

log = logging.getLogger("shepard_lib.gc")


def collect_garbage(
    consul: ConsulAPI,
    nomad: NomadListAPI,
    config: ShepardConfig,
    *,
    scope: GCScope | str = GCScope.CLUSTER,
    node: str | None = None,
    dry_run: bool = False,
    session: Session | None = None,
    clock: Clock = REAL_CLOCK,
    name: str = "shepard gc",
) -> GCReport:
    """Run one pass and return its report (never raises for Consul or Nomad trouble: see ``report.error``).

    ``scope`` ``node`` collects the trigger keys of ``node`` (default: ``config.node_name``, else
    the local Nomad agent's node); ``cluster`` applies every rule to every key, under the GC leader
    lock held with ``session`` (the agent's; when None, a session of its own for the pass). ``name``
    says who runs the pass (the lock's value, logs).
    """
    scope = GCScope(scope)
    keyspace = Keyspace(config.key_prefix, config.lock_scope)
    report = GCReport(scope=scope, dry_run=dry_run)
    try:
        if scope is GCScope.NODE:
            report.node = node or config.node_name or nomad.agent_self().node_name
            _node_pass(consul, nomad, keyspace, report.node, report, clock)
        elif dry_run:
            _cluster_pass(consul, nomad, keyspace, config, report, clock, None, lambda: None)
        else:
            with ExitStack() as stack:
                if session is None:
                    session = Session(
                        consul, name, ttl=config.session_ttl, lock_delay=config.lock_delay, clock=clock
                    )
                    stack.enter_context(session)
                lock = Lock(consul, keyspace.gc_leader_key(), session, value=name, clock=clock)
                try:
                    lock.acquire(timeout=0)
                except LockTimeout:
                    why = f"another agent holds {keyspace.gc_leader_key()} and runs the cluster pass"
                    report.skipped.append(Skip("", SkipReason.NOT_LEADER, why))
                    log.info("gc: %s", why)
                    return report
                stack.callback(lock.release)
                held_by = session

                def lost() -> str | None:
                    if held_by.lost.is_set():
                        return f"the GC leader lock was lost: {held_by.lost_reason}"
                    return None

                fence = TxnOp(TxnVerb.CHECK_SESSION, keyspace.gc_leader_key(), session=held_by.id)
                _cluster_pass(consul, nomad, keyspace, config, report, clock, fence, lost)
    except ShepardError as exc:
        report.error = str(exc)
        log.warning("gc %s pass stopped, nothing more deleted: %s", scope.value, exc)
        return report
    log.info(
        "gc %s pass%s: %d keys scanned, %s %s, skipped %s, %d failed",
        scope.value,
        " (dry run)" if dry_run else "",
        report.scanned,
        "would delete" if dry_run else "deleted",
        report.deleted_by_rule() or "none",
        report.skipped_by_reason() or "none",
        len(report.failed),
    )
    return report


def _scan(consul: ConsulAPI, keyspace: Keyspace, prefix: str) -> list[ScannedKey]:
    """One consistent ``?recurse`` read of ``prefix``, kept as parsed keys without their values."""
    return [classify(entry, keyspace) for entry in consul.get_tree(prefix, consistent=True)]


def _node_pass(
    consul: ConsulAPI, nomad: NomadListAPI, keyspace: Keyspace, node: str, report: GCReport, clock: Clock
) -> None:
    keys = _scan(consul, keyspace, keyspace.keys_prefix(node))
    report.scanned = len(keys)
    if not keys:
        return
    records = [n for n in nomad.list_nodes().items if n.name == node]
    jobs = nomad.list_jobs()
    allocations: list[Allocation] = []
    for record in records:
        allocations += nomad.list_allocations(record.id).items
    view = NomadView.build(jobs.server_time or clock.time(), records, jobs.items, allocations)
    deletions, skips = plan_node_pass(keys, view, node)
    _apply(consul, report, deletions, skips, clock, None, lambda: None)


def _cluster_pass(
    consul: ConsulAPI,
    nomad: NomadListAPI,
    keyspace: Keyspace,
    config: ShepardConfig,
    report: GCReport,
    clock: Clock,
    fence: TxnOp | None,
    stop: Callable[[], str | None],
) -> None:
    keys = _scan(consul, keyspace, f"{keyspace.prefix}/")
    report.scanned = len(keys)
    if not any(k.kind is not KeyKind.GC_LEADER for k in keys):
        return
    nodes = nomad.list_nodes()
    jobs = nomad.list_jobs()
    allocations = nomad.list_allocations()
    records = _with_status_times(nomad, nodes.items, _named_nodes(keys))
    view = NomadView.build(nodes.server_time or clock.time(), records, jobs.items, allocations.items)
    settings = GCSettings(config.node_cleanup_timeout, config.gc_plan_retention)
    gone = frozenset(
        s for s in sorted(holder_sessions_to_check(keys, view)) if consul.session_info(s) is None
    )
    deletions, skips = plan_cluster_pass(keys, view, settings, gone)
    _apply(consul, report, deletions, skips, clock, fence, stop)


def _named_nodes(keys: list[ScannedKey]) -> set[str]:
    """The node names the scanned keys mention."""
    names: set[str] = set()
    for k in keys:
        names.update(
            n for n in (k.node, k.ref.node if k.ref else None, k.scope.node if k.scope else None) if n
        )
    return names


def _with_status_times(nomad: NomadListAPI, nodes: tuple[NodeInfo, ...], wanted: set[str]) -> list[NodeInfo]:
    """The node list, with ``StatusUpdatedAt`` read for the nodes that matter and are not ready.

    A node list stub has no ``StatusUpdatedAt``; only nodes named by some key and with no ready
    record under their name need it (usually none or a few), one read each.
    """
    ready = {n.name for n in nodes if n.status == READY}
    return [
        nomad.node_status(n.id).items[0] if n.name in wanted and n.name not in ready else n for n in nodes
    ]


def _apply(
    consul: ConsulAPI,
    report: GCReport,
    deletions: list[Deletion],
    skips: list[Skip],
    clock: Clock,
    fence: TxnOp | None,
    stop: Callable[[], str | None],
) -> None:
    report.planned = deletions
    report.skipped += skips
    if report.dry_run or not deletions:
        return
    outcome = delete_all(consul, deletions, fence=fence, stop=stop, clock=clock)
    report.deleted += outcome.deleted
    report.skipped += outcome.skipped
    report.failed += outcome.failed
