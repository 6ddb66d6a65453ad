"""The part of garbage collection that deletes: ``delete-cas`` in Consul transactions of at most 64 ops.

Each :class:`~shepard_lib.gc.report.Deletion` is a ``delete-cas`` on the ``ModifyIndex`` its scan
read, so a key written (or acquired) after the scan survives. A transaction is atomic: when Consul
refuses it (HTTP 409) it names the ops that failed; those keys changed since the scan (``index is
stale``: reported as ``changed``) or were refused for another reason (reported as failures), and
the transaction is sent again with the other ops, whose keys did not change. A ``delete-cas`` on a
key already gone succeeds (as in Consul), so a transaction whose answer was lost can be sent again
safely: it never deletes a key written after the scan.

A ``fence`` op (the cluster pass's ``check-session`` on the GC leader lock) opens every
transaction, which then carries at most 63 deletes: Consul applies the deletes only while the lock
is held. A refused fence means the lock is lost: nothing more is sent, and every delete not yet
applied is reported ``lock_lost``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shepard_lib.backends import ConsulAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.errors import ConsulError
from shepard_lib.model import TxnOp, TxnVerb

from .report import Deletion, Failure, Skip, SkipReason

__all__ = ["MAX_TXN_OPS", "Outcome", "delete_all"]

log = logging.getLogger(__name__)

MAX_TXN_OPS = 64
"""Consul's transaction limit before 1.14 (later servers allow 128): this works on both."""

ATTEMPTS = 3
"""Tries of one transaction that got no answer (or a 5xx) before its keys count as failed."""
RETRY_DELAY = 1.0
"""Cluster seconds between those tries (doubled each time)."""

_STALE = "index is stale"


@dataclass
class Outcome:
    """What :func:`delete_all` did."""

    deleted: list[Deletion] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


def delete_all(
    consul: ConsulAPI,
    deletions: Sequence[Deletion],
    *,
    fence: TxnOp | None = None,
    stop: Callable[[], str | None] = lambda: None,
    clock: Clock = REAL_CLOCK,
    batch: int | None = None,
) -> Outcome:
    """Delete ``deletions`` in transactions of ``batch`` deletes (default: as many as fit beside ``fence``).

    ``fence`` (e.g. ``check-session`` on the GC leader lock) is the first op of every transaction;
    when Consul refuses it, nothing more is sent and what is left is reported as skipped
    (``lock_lost``) for the next pass. ``stop`` (checked before each transaction) returns why to
    stop early (e.g. the session is known lost), or None to go on; it ends the pass the same way.
    """
    room = MAX_TXN_OPS if fence is None else MAX_TXN_OPS - 1
    batch = room if batch is None else batch
    if not 1 <= batch <= room:
        raise ValueError(f"batch must be 1..{room}, got {batch}")
    out = Outcome()
    for start in range(0, len(deletions), batch):
        why = stop()
        if why is None:
            why = _one_batch(consul, list(deletions[start : start + batch]), fence, out, clock)
        if why is not None:
            done = {d.key for d in out.deleted} | {s.key for s in out.skipped} | {f.key for f in out.failed}
            left = [d for d in deletions[start:] if d.key not in done]
            out.skipped += [Skip(d.key, SkipReason.LOCK_LOST, why) for d in left]
            break
    return out


def _one_batch(
    consul: ConsulAPI, pending: list[Deletion], fence: TxnOp | None, out: Outcome, clock: Clock
) -> str | None:
    """Send one batch until each key is deleted, reported or failed; return why to stop if the fence fails."""
    head = [] if fence is None else [fence]
    tries = 0
    while pending:
        ops = head + [TxnOp(TxnVerb.DELETE_CAS, d.key, index=d.modify_index) for d in pending]
        try:
            result = consul.txn(ops)
        except ConsulError as exc:
            tries += 1
            if tries >= ATTEMPTS or (exc.status is not None and 400 <= exc.status < 500):
                out.failed += [Failure(d.key, str(exc)) for d in pending]
                return None
            log.warning("gc: delete transaction of %d keys failed, trying again: %s", len(pending), exc)
            clock.sleep(RETRY_DELAY * 2 ** (tries - 1))
            continue
        if result.ok:
            out.deleted += pending
            return None
        fenced = [what for i, what in result.errors if head and i == 0]
        if fenced:
            log.warning("gc: the fence refused the transaction, deleting nothing more: %s", fenced[0])
            return f"the GC leader lock is no longer held: {fenced[0]}"
        refused = {i - len(head): what for i, what in result.errors if 0 <= i - len(head) < len(pending)}
        if not refused:  # a rollback that names none of our ops: nothing to retry without
            what = "; ".join(w for _, w in result.errors) or "transaction rolled back"
            out.failed += [Failure(d.key, what) for d in pending]
            return None
        for i, what in refused.items():
            d = pending[i]
            if _STALE in what:
                out.skipped.append(Skip(d.key, SkipReason.CHANGED, f"written since the scan ({d.why})"))
            else:
                out.failed.append(Failure(d.key, what))
        pending = [d for i, d in enumerate(pending) if i not in refused]
    return None
