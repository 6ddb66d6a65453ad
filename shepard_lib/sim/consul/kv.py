"""The KV table of the simulated Consul: entries, tombstones and lock-delays.

Semantics follow Consul's state store (``agent/consul/state/kvs.go``) and KVS endpoint
(``agent/consul/kvs_endpoint.go``):

- a write that changes nothing (same value, flags and session) keeps the entry's ModifyIndex;
- a plain set or CAS keeps the entry's Session (and, as in Consul, resets LockIndex to 0);
  only lock/unlock change the Session;
- an empty value is stored as no value (``"Value": null``), as Consul's encoding does;
- a lock by the holding session keeps LockIndex, a lock of a free key increments it;
- a delete leaves a tombstone, so the index of a prefix never slides backwards (the sim never
  reaps tombstones, so no index it reports ever goes backwards);
- ``delete-cas`` of a key that does not exist succeeds (``kvsDeleteCASTxn``).

The store is not locked by itself: :class:`~shepard_lib.sim.consul.state.ConsulState` serialises
every call. Writes take the raft index ``idx`` they commit at.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, replace

from shepard_lib.model import KVEntry


class KVError(Exception):
    """A KV operation was rejected with an error (Consul answers 500 with this text)."""


@dataclass(frozen=True)
class KVSnapshot:
    """A copy of the whole table, to roll a failed transaction back."""

    entries: dict[str, KVEntry]
    keys: list[str]
    tombstones: dict[str, int]
    table_index: int


class KVStore:
    """Consul's ``kvs`` and ``tombstones`` tables plus the lock-delay map."""

    def __init__(self) -> None:
        self._entries: dict[str, KVEntry] = {}
        self._keys: list[str] = []  # sorted, for prefix scans
        self._tombstones: dict[str, int] = {}
        self._lock_delay: dict[str, float] = {}  # key -> cluster-monotonic expiry
        self.table_index = 0
        """Max index of the kvs and tombstones tables (``kvsMaxIndex``)."""

    # --- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> KVEntry | None:
        """The entry at ``key``."""
        return self._entries.get(key)

    def get_index(self, key: str) -> tuple[int, KVEntry | None]:
        """``KVS.Get``: the entry and the index to report (its ModifyIndex, else the table index)."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry.modify_index, entry
        return max(1, self.table_index), None

    def list_prefix(self, prefix: str) -> tuple[int, list[KVEntry]]:
        """``KVS.List``: entries under ``prefix`` (sorted) and the index of ``kvsListTxn``.

        The index is the highest ModifyIndex among the entries and the tombstones under the prefix;
        the whole-table index when the prefix is empty or nothing (alive or dead) is under it.
        """
        entries = [self._entries[k] for k in self._iter_prefix(prefix)]
        if prefix:
            index = max((e.modify_index for e in entries), default=0)
            index = max(index, self._graveyard_index(prefix))
            if index == 0:
                index = self.table_index
        else:
            index = self.table_index
        return max(1, index), entries

    def held_by(self, session: str) -> list[KVEntry]:
        """Entries whose lock ``session`` holds."""
        return [e for e in self._entries.values() if e.session == session]

    def lock_delay_until(self, key: str) -> float:
        """Cluster-monotonic time until which ``key`` refuses a new lock (0 when none)."""
        return self._lock_delay.get(key, 0.0)

    # --- writes -----------------------------------------------------------------------------

    def set(self, idx: int, key: str, value: bytes | None, flags: int = 0) -> KVEntry:
        """``kvsSetTxn`` without a session update: a plain write keeps the holder's Session.

        Like Consul, it does not carry LockIndex over: the request's entry has LockIndex 0, and
        ``kvsSetTxn`` preserves only CreateIndex and Session.
        """
        existing = self._entries.get(key)
        entry = KVEntry(
            key=key,
            value=value or None,
            create_index=existing.create_index if existing else idx,
            modify_index=idx,
            lock_index=0,
            flags=flags,
            session=existing.session if existing else None,
        )
        return self._store(idx, entry, existing)

    def cas(self, idx: int, key: str, value: bytes | None, flags: int, cas_index: int) -> KVEntry | None:
        """``kvsSetCASTxn``: set only if ModifyIndex equals ``cas_index`` (0: only if absent)."""
        existing = self._entries.get(key)
        if cas_index == 0 and existing is not None:
            return None
        if cas_index != 0 and (existing is None or existing.modify_index != cas_index):
            return None
        return self.set(idx, key, value, flags)

    def lock(
        self, idx: int, key: str, value: bytes | None, flags: int, session: str, now: float
    ) -> KVEntry | None:
        """``kvsPreApply`` lock-delay check plus ``kvsLockTxn``; None when the lock is not taken.

        The caller has checked that ``session`` exists (``invalid session`` otherwise).
        """
        if self._lock_delay.get(key, 0.0) > now:
            return None
        existing = self._entries.get(key)
        if existing is None:
            create, lock_index = idx, 1
        elif existing.session == session:
            create, lock_index = existing.create_index, existing.lock_index
        elif existing.session:
            return None
        else:
            create, lock_index = existing.create_index, existing.lock_index + 1
        entry = KVEntry(key, value or None, create, idx, lock_index, flags, session)
        return self._store(idx, entry, existing)

    def unlock(self, idx: int, key: str, value: bytes | None, flags: int, session: str) -> KVEntry | None:
        """``kvsUnlockTxn``: clear the lock if ``session`` holds it, storing ``value``."""
        existing = self._entries.get(key)
        if existing is None or existing.session != session:
            return None
        entry = KVEntry(key, value or None, existing.create_index, idx, existing.lock_index, flags, None)
        return self._store(idx, entry, existing)

    def release_session(self, idx: int, key: str) -> None:
        """Drop the Session of ``key`` (session invalidated with behavior ``release``)."""
        existing = self._entries[key]
        self._store(idx, replace(existing, session=None, modify_index=idx), existing)

    def delete(self, idx: int, key: str) -> bool:
        """``kvsDeleteTxn``: remove ``key`` leaving a tombstone; False when it did not exist."""
        if self._entries.pop(key, None) is None:
            return False
        del self._keys[bisect.bisect_left(self._keys, key)]
        self._tombstones[key] = idx
        self.table_index = idx
        return True

    def delete_cas(self, idx: int, key: str, cas_index: int) -> bool:
        """``kvsDeleteCASTxn``: delete if ModifyIndex equals ``cas_index``; a missing key is success."""
        existing = self._entries.get(key)
        if existing is None:
            return True
        if existing.modify_index != cas_index:
            return False
        return self.delete(idx, key)

    def delete_tree(self, idx: int, prefix: str) -> int:
        """``kvsDeleteTreeTxn``: delete every key under ``prefix``; returns how many went."""
        doomed = list(self._iter_prefix(prefix))
        for key in doomed:
            self.delete(idx, key)
        return len(doomed)

    def set_lock_delay(self, key: str, until: float) -> None:
        """Refuse new locks of ``key`` until cluster-monotonic time ``until``."""
        self._lock_delay[key] = max(until, self._lock_delay.get(key, 0.0))

    # --- transactions -----------------------------------------------------------------------

    def snapshot(self) -> KVSnapshot:
        """A copy of the table (entries are immutable, so shallow copies suffice)."""
        return KVSnapshot(dict(self._entries), list(self._keys), dict(self._tombstones), self.table_index)

    def restore(self, snap: KVSnapshot) -> None:
        """Roll back to ``snap``."""
        self._entries = snap.entries
        self._keys = snap.keys
        self._tombstones = snap.tombstones
        self.table_index = snap.table_index

    # --- internals --------------------------------------------------------------------------

    def _store(self, idx: int, entry: KVEntry, existing: KVEntry | None) -> KVEntry:
        if existing is not None and _same_content(existing, entry):
            return existing  # Consul skips the write and keeps the ModifyIndex
        if existing is None:
            bisect.insort(self._keys, entry.key)
        self._entries[entry.key] = entry
        self.table_index = idx
        return entry

    def _iter_prefix(self, prefix: str) -> Iterator[str]:
        start = bisect.bisect_left(self._keys, prefix)
        for key in self._keys[start:]:
            if not key.startswith(prefix):
                break
            yield key

    def _graveyard_index(self, prefix: str) -> int:
        return max((i for k, i in self._tombstones.items() if k.startswith(prefix)), default=0)


def key_names(entries: list[KVEntry], prefix: str, separator: str = "") -> list[str]:
    """``KVS.ListKeys`` of a listing of ``prefix``: the key names, folded after ``separator``
    (deduplicated). Consul reads (and, blocking, watches) every entry under the prefix for it."""
    if not separator:
        return [e.key for e in entries]
    out: list[str] = []
    seen: set[str] = set()
    for e in entries:
        cut = e.key.find(separator, len(prefix))
        name = e.key if cut < 0 else e.key[: cut + len(separator)]
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _same_content(a: KVEntry, b: KVEntry) -> bool:
    """``DirEntry.Equal`` as far as a write can change it."""
    return (
        a.value == b.value
        and a.flags == b.flags
        and a.session == b.session
        and a.lock_index == b.lock_index
        and a.create_index == b.create_index
    )
