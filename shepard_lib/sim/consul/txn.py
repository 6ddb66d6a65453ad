"""KV operations of ``PUT /v1/txn``, with Consul's results and error texts.

Follows ``agent/consul/txn_endpoint.go`` (``preCheck``: an empty key, and a lock refused by
lock-delay, fail before anything runs) and ``agent/consul/state/txn.go`` (``txnKVS``: every op
runs, every error is collected with its op index, and any error means no results and no change).
Results of verbs other than ``get`` carry the entry without its value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from shepard_lib.model import KVEntry, TxnOp, TxnVerb
from shepard_lib.sim.consul.kv import KVError, KVStore
from shepard_lib.sim.consul.sessions import Session

GET_OR_EMPTY = "get-or-empty"
"""A read verb Consul has beyond :class:`~shepard_lib.model.TxnVerb`."""

READ_VERBS = frozenset(
    {
        TxnVerb.GET,
        TxnVerb.GET_TREE,
        TxnVerb.CHECK_INDEX,
        TxnVerb.CHECK_SESSION,
        TxnVerb.CHECK_NOT_EXISTS,
        GET_OR_EMPTY,
    }
)


@dataclass(frozen=True)
class KVOp:
    """One KV operation as the wire carries it (any verb text, so unknown verbs reach Consul's error)."""

    verb: str
    key: str
    value: bytes | None = None
    index: int = 0
    session: str = ""
    flags: int = 0

    @classmethod
    def of(cls, op: TxnOp | KVOp) -> KVOp:
        """Normalise the model's :class:`~shepard_lib.model.TxnOp`."""
        if isinstance(op, KVOp):
            return op
        return cls(str(op.verb), op.key, op.value, op.index or 0, op.session or "", op.flags or 0)


@dataclass(frozen=True)
class TxnOutcome:
    """What a transaction returned: results when it applied, errors ``(op_index, what)`` when not."""

    results: tuple[KVEntry, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()


def run_ops(
    kv: KVStore, session_of: Callable[[str], Session | None], idx: int, now: float, ops: Sequence[KVOp]
) -> TxnOutcome:
    """Run ``ops`` against ``kv`` at raft index ``idx``; the caller rolls back when errors are returned."""
    errors = _pre_check(kv, now, ops)
    if errors:
        return TxnOutcome(errors=tuple(errors))
    results: list[KVEntry] = []
    for i, op in enumerate(ops):
        try:
            results.extend(_run_one(kv, session_of, idx, now, op))
        except KVError as exc:
            errors.append((i, str(exc)))
    if errors:
        return TxnOutcome(errors=tuple(errors))
    return TxnOutcome(results=tuple(results))


def _pre_check(kv: KVStore, now: float, ops: Sequence[KVOp]) -> list[tuple[int, str]]:
    errors: list[tuple[int, str]] = []
    for i, op in enumerate(ops):
        if not op.key and op.verb != TxnVerb.DELETE_TREE:
            errors.append((i, "Must provide key"))
        elif op.verb == TxnVerb.LOCK and kv.lock_delay_until(op.key) > now:
            errors.append((i, f'failed to lock key "{op.key}" due to lock delay'))
    return errors


def _run_one(
    kv: KVStore, session_of: Callable[[str], Session | None], idx: int, now: float, op: KVOp
) -> list[KVEntry]:
    verb, key, flags, cas = op.verb, op.key, op.flags, op.index
    entry: KVEntry | None
    if verb == TxnVerb.SET:
        entry = kv.set(idx, key, op.value, flags)
    elif verb == TxnVerb.CAS:
        entry = kv.cas(idx, key, op.value, flags, cas)
        if entry is None:
            raise KVError(f'failed to set key "{key}", index is stale')
    elif verb == TxnVerb.LOCK:
        if not op.session:
            raise KVError("missing session")
        if session_of(op.session) is None:
            raise KVError(f'invalid session "{op.session}"')
        entry = kv.lock(idx, key, op.value, flags, op.session, now)
        if entry is None:
            raise KVError(f'failed to lock key "{key}", lock is already held')
    elif verb == TxnVerb.UNLOCK:
        if not op.session:
            raise KVError("missing session")
        entry = kv.unlock(idx, key, op.value, flags, op.session)
        if entry is None:
            raise KVError(f'failed to unlock key "{key}", lock isn\'t held, or is held by another session')
    elif verb == TxnVerb.GET:
        entry = kv.get(key)
        if entry is None:
            raise KVError(f'key "{key}" doesn\'t exist')
        return [entry]
    elif verb == GET_OR_EMPTY:
        return [kv.get(key) or KVEntry(key, None, 0, 0, 0, flags, op.session)]
    elif verb == TxnVerb.GET_TREE:
        return kv.list_prefix(key)[1]
    elif verb == TxnVerb.CHECK_SESSION:
        entry = kv.get(key)
        if entry is None:
            raise KVError(f'failed to check session, key "{key}" doesn\'t exist')
        if (entry.session or "") != (op.session or ""):
            raise KVError(
                f'failed session check for key "{key}", current session "{entry.session or ""}" != '
                f'"{op.session or ""}"'
            )
    elif verb == TxnVerb.CHECK_INDEX:
        entry = kv.get(key)
        if entry is None:
            raise KVError(f'failed to check index, key "{key}" doesn\'t exist')
        if entry.modify_index != cas:
            raise KVError(
                f'failed index check for key "{key}", current modify index {entry.modify_index} != {cas}'
            )
    elif verb == TxnVerb.CHECK_NOT_EXISTS:
        if kv.get(key) is not None:
            raise KVError(f'key "{key}" exists')
        return []
    elif verb == TxnVerb.DELETE:
        kv.delete(idx, key)
        return []
    elif verb == TxnVerb.DELETE_CAS:
        if not kv.delete_cas(idx, key, cas):
            raise KVError(f'failed to delete key "{key}", index is stale')
        return []
    elif verb == TxnVerb.DELETE_TREE:
        kv.delete_tree(idx, key)
        return []
    else:
        raise KVError(f'unknown KV verb "{verb}"')
    return [replace(entry, value=None)]
