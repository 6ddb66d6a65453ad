"""The simulated Consul's state machine: one lock, one raft-like index, all tables.

:class:`ConsulState` is what the HTTP layer serves and what the simulated Nomad drives in-process
(registering nodes, services and checks). Every mutation happens under one condition variable,
commits at the next raft index only when some table changed, and wakes every waiter; a blocking
query re-runs its read after each commit and, like Consul's ``blockingQuery``, goes on blocking
until what it read has changed (:meth:`ConsulState.blocking_read`), not merely the index.

Session TTLs run on the shared :class:`~shepard_lib.clock.Clock` (cluster seconds). There is no
timer thread: every access first invalidates the sessions whose deadline has passed, and every
waiter bounds its wait by the next deadline, so an expiry is seen the moment it is due (never
early, and at most one scheduling delay late).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TypeVar

from shepard_lib.clock import Clock
from shepard_lib.model import CheckStatus, KVEntry, SessionBehavior, TxnOp
from shepard_lib.sim.consul.catalog import SERF_CHECK_ID, Catalog, Check, Service
from shepard_lib.sim.consul.kv import KVError, KVStore
from shepard_lib.sim.consul.sessions import (
    MAX_LOCK_DELAY,
    Session,
    SessionError,
    SessionRequest,
    SessionTable,
)
from shepard_lib.sim.consul.txn import KVOp, TxnOutcome, run_ops

T = TypeVar("T")

_EPSILON = 0.001  # real seconds past a TTL deadline before a waiter re-checks


class ConsulState:
    """The whole simulated Consul datacenter; thread-safe.

    ``clock`` is the cluster clock shared with the code under test; ``seed`` makes session and
    node IDs reproducible. ``server_node`` is the Consul server's own node (registered with its
    ``serfHealth`` check and the ``consul`` service). ``session_ttl_min`` is Consul's
    ``session_ttl_min`` (10 s); ``session_ttl_multiplier`` scales how long after its last renewal
    a TTL session dies: Consul waits up to 2x the TTL, the sim defaults to exactly the TTL.
    """

    def __init__(
        self,
        clock: Clock,
        seed: int = 0,
        *,
        datacenter: str = "dc1",
        server_node: str = "consul-server",
        session_ttl_min: float = 10.0,
        session_ttl_multiplier: float = 1.0,
    ) -> None:
        if session_ttl_multiplier < 1.0:
            raise ValueError("session_ttl_multiplier below 1 would expire sessions before their TTL")
        self.clock = clock
        self.datacenter = datacenter
        self.server_node = server_node
        self.session_ttl_min = session_ttl_min
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._index = 0
        self._blocked = 0
        self.kv = KVStore()
        self.sessions = SessionTable(ttl_multiplier=session_ttl_multiplier)
        self.catalog = Catalog(datacenter=datacenter)
        self.register_node(server_node)
        self.register_service(server_node, "consul", "consul", 8300, status=CheckStatus.PASSING)

    # --- index and waiting ------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The current raft-like index: the highest index of any table; never goes backwards."""
        with self._cond:
            self._expire_sessions()
            return self._index

    @property
    def blocked_reads(self) -> int:
        """How many blocking reads are waiting for a change now (for tests: "the query is blocked")."""
        with self._cond:
            return self._blocked

    def wait_for_change(self, index: int, timeout_real: float) -> int:
        """Block until the state index is above ``index`` or ``timeout_real`` real seconds pass.

        Returns the state index then. Any commit wakes it (it watches the index itself).
        """
        return self.blocking_read(lambda: (self._index, None), index, timeout_real, watch=watch_index)[0]

    def read(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the state lock (after due session expiries)."""
        with self._cond:
            self._expire_sessions()
            return fn()

    def blocking_read(
        self,
        fn: Callable[[], tuple[int, T]],
        min_index: int,
        timeout_real: float,
        abort: threading.Event | None = None,
        watch: Callable[[int, T], object] | None = None,
    ) -> tuple[int, T]:
        """Consul's ``blockingQuery`` (``agent/consul/rpc.go``): run ``fn`` (it returns the index to
        report and the answer); if ``min_index`` is 0 or that index is above it, return the answer at
        once. Otherwise block until the data the query read changes, then run it again and loop; when
        ``timeout_real`` real seconds pass (or ``abort`` is set and :meth:`wake_waiters` called)
        return the last answer, whose index is not above ``min_index``.

        Consul blocks on the memdb watch channels of exactly the data the query read, not on the
        index it reports: ``/v1/health/node/<n>`` reports the checks table's index but wakes only
        for ``n``'s checks; a missing key reports the KV table's index but wakes only when that key
        is written. The sim models "a watch channel fired" as "``watch(index, answer)`` of a re-run
        differs from the run before the wait" (``is``, then ``==``), re-running ``fn`` at each
        commit. ``watch`` defaults to the answer itself; every answer carries ModifyIndex or
        CreateIndex fields or is a membership, so a write to the watched data changes it. A caller
        passes a cheaper projection (encoded bytes; the table index when the query reads a whole
        table; the index when it is the watched data's own, as ``/v1/health/service``'s). Spurious
        wake-ups are not modelled: in Consul a watch on a missing key or an empty prefix is the
        radix-tree node nearest to it, which other writes below that node also fire (and such a
        query, reporting the table index, then returns).

        ``fn`` and ``watch`` run under the state lock.
        """
        seen_as = watch or _answer_of
        deadline = time.monotonic() + timeout_real
        with self._cond:
            self._expire_sessions()
            index, result = fn()
            if min_index <= 0 or index > min_index:
                return index, result
            watched = seen_as(index, result)
            seen = self._index
            self._blocked += 1
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (abort is not None and abort.is_set()):
                        return index, result
                    self._cond.wait(self._bounded_wait(remaining))
                    self._expire_sessions()
                    if self._index == seen:
                        continue
                    seen = self._index
                    new_index, new_result = fn()
                    now = seen_as(new_index, new_result)
                    if now is watched or now == watched:
                        continue  # nothing the query read has changed: keep blocking
                    index, result, watched = new_index, new_result, now
                    if index > min_index:
                        return index, result
            finally:
                self._blocked -= 1

    def wake_waiters(self) -> None:
        """Wake every blocked reader so it re-checks its abort event."""
        with self._cond:
            self._cond.notify_all()

    # --- the contract of CONTRACT.md (used in-process by the Nomad sim) ---------------------

    def session_expired_at(self, session_id: str) -> float | None:
        """The cluster-monotonic time at which ``session_id``'s TTL ran out (None: it did not)."""
        return self.read(lambda: self.sessions.expired_at(session_id))

    def kv_get(self, key: str) -> KVEntry | None:
        """The entry at ``key`` (an empty value reads as ``None``, as over HTTP)."""
        return self.read(lambda: self.kv.get(key))

    def kv_put(self, key: str, value: bytes, flags: int = 0) -> None:
        """Plain write (keeps a lock holder's session), bumps the index, wakes waiters."""
        with self._writing() as idx:
            self.kv.set(idx, key, value, flags)

    def kv_delete(self, key: str) -> None:
        """Delete ``key`` (no-op when absent)."""
        with self._writing() as idx:
            self.kv.delete(idx, key)

    def register_node(self, name: str, address: str = "127.0.0.1") -> None:
        """Add a node with its ``serfHealth`` check (passing)."""
        with self._writing() as idx:
            self.catalog.register_node(idx, name, address, self._uuid())

    def deregister_node(self, name: str) -> None:
        """Remove a node, its services and checks; its sessions are invalidated."""
        with self._writing() as idx:
            for session in self.sessions.for_node(name):
                self._invalidate(idx, session.id)
            for service in [s for s in self.catalog.services.values() if s.node == name]:
                self.catalog.deregister_service(idx, service.id)
            self.catalog.remove_node(idx, name)

    def register_service(
        self,
        node: str,
        service_id: str,
        service_name: str,
        port: int,
        tags: Sequence[str] = (),
        check_id: str | None = None,
        check_name: str = "",
        status: CheckStatus = CheckStatus.CRITICAL,
    ) -> None:
        """Register a service instance on ``node`` and, with ``check_id``, one check of it.

        The node must be registered first (ValueError otherwise), as in Consul's catalog.
        """
        with self._writing() as idx:
            found = self.catalog.nodes.get(node)
            if found is None:
                raise ValueError(f"node {node!r} is not registered")
            self.catalog.register_service(
                idx, Service(node, service_id, service_name, tuple(tags), port, found.address, idx, idx)
            )
            if check_id is not None:
                name = check_name or f"Service '{service_name}' check"
                check = Check(
                    node, check_id, name, status, "", service_id, service_name, tuple(tags), "http", idx, idx
                )
                self._put_check(idx, check)

    def deregister_service(self, service_id: str) -> None:
        """Remove a service instance and its checks; sessions bound to those checks are invalidated."""
        with self._writing() as idx:
            for check in self.catalog.deregister_service(idx, service_id):
                for session in self.sessions.bound_to_check(check.node, check.check_id):
                    self._invalidate(idx, session.id)

    def set_check_status(
        self, check_id: str, status: CheckStatus, output: str = "", node: str | None = None
    ) -> None:
        """Set a check's status; a critical check invalidates the sessions bound to it.

        ``node`` picks the node when the check ID exists on several (``serfHealth`` does).
        """
        with self._writing() as idx:
            found = self.catalog.find_checks(check_id, node)
            if len(found) != 1:
                where = f" on node {node!r}" if node else ""
                what = "is ambiguous; pass node=" if found else "does not exist"
                raise ValueError(f"check {check_id!r}{where} {what}")
            self._put_check(idx, _with_status(found[0], CheckStatus(status), output))

    def set_node_health(self, node: str, status: CheckStatus, output: str = "") -> None:
        """Set ``node``'s ``serfHealth`` (critical: the node failed; its sessions die)."""
        self.set_check_status(SERF_CHECK_ID, status, output, node=node)

    # --- KV writes for the HTTP layer -------------------------------------------------------

    def kv_cas(self, key: str, value: bytes, flags: int, cas_index: int) -> bool:
        """``PUT ?cas=``: write only if the ModifyIndex matches (0: only if absent)."""
        with self._writing() as idx:
            return self.kv.cas(idx, key, value, flags, cas_index) is not None

    def kv_acquire(self, key: str, value: bytes, flags: int, session: str) -> bool:
        """``PUT ?acquire=``: take the lock; KVError ``invalid session "<id>"`` for an unknown session.

        As in Consul, lock-delay is checked first (``kvsPreApply``, on the leader) and refuses
        with False whatever the session; the session is checked when the write applies.
        """
        with self._writing() as idx:
            now = self.clock.monotonic()
            if self.kv.lock_delay_until(key) > now:
                return False
            self._require_session(session)
            return self.kv.lock(idx, key, value, flags, session, now) is not None

    def kv_release(self, key: str, value: bytes, flags: int, session: str) -> bool:
        """``PUT ?release=``: give the lock up, storing ``value``; False unless ``session`` holds it."""
        with self._writing() as idx:
            if not session:
                raise KVError("missing session")
            return self.kv.unlock(idx, key, value, flags, session) is not None

    def kv_delete_cas(self, key: str, cas_index: int) -> bool:
        """``DELETE ?cas=``."""
        with self._writing() as idx:
            return self.kv.delete_cas(idx, key, cas_index)

    def kv_delete_tree(self, prefix: str) -> None:
        """``DELETE ?recurse``."""
        with self._writing() as idx:
            self.kv.delete_tree(idx, prefix)

    def txn(self, ops: Sequence[TxnOp | KVOp]) -> TxnOutcome:
        """Apply KV operations atomically: all of them, or (on any error) none."""
        kv_ops = [KVOp.of(op) for op in ops]
        with self._writing() as idx:
            snap = self.kv.snapshot()
            outcome = run_ops(self.kv, self.sessions.get, idx, self.clock.monotonic(), kv_ops)
            if outcome.errors:
                self.kv.restore(snap)
            return outcome

    # --- sessions for the HTTP layer --------------------------------------------------------

    def session_create(self, req: SessionRequest) -> Session:
        """Create a session; SessionError with Consul's message when its node or checks are unfit."""
        with self._writing() as idx:
            if req.node not in self.catalog.nodes:
                raise SessionError("Missing node registration")
            for check_id in [*req.node_checks, *(c.id for c in req.service_checks)]:
                check = self.catalog.checks.get((req.node, check_id))
                if check is None:
                    raise SessionError(f"Missing check '{check_id}' registration")
                if check.status == CheckStatus.CRITICAL:
                    raise SessionError(f"Check '{check_id}' is in {check.status} state")
            return self.sessions.insert(idx, self._uuid(), req, self.clock.monotonic())

    def session_renew(self, session_id: str) -> Session | None:
        """Reset a session's TTL timer; None when it no longer exists."""
        with self._cond:
            self._expire_sessions()
            return self.sessions.renew(session_id, self.clock.monotonic())

    def session_destroy(self, session_id: str) -> None:
        """Destroy (invalidate) a session; a no-op for an unknown one."""
        with self._writing() as idx:
            self._invalidate(idx, session_id)

    # --- internals --------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[int]:
        """Hold the lock for one write at the next raft index; commit and wake waiters if it changed."""
        with self._cond:
            self._expire_sessions()
            idx = self._index + 1
            try:
                yield idx
            finally:
                if self._max_table_index() >= idx:
                    self._index = idx
                    self._cond.notify_all()

    def _max_table_index(self) -> int:
        c = self.catalog
        return max(
            self.kv.table_index, self.sessions.table_index, c.nodes_index, c.services_index, c.checks_index
        )

    def _expire_sessions(self) -> None:
        for session_id in self.sessions.expired(self.clock.monotonic()):
            idx = self._index + 1
            self._invalidate(idx, session_id)
            self._index = idx
            self._cond.notify_all()

    def _bounded_wait(self, remaining_real: float) -> float:
        """Wait no longer than until the next session TTL deadline (plus a hair)."""
        nxt = self.sessions.next_deadline()
        if nxt is None:
            return remaining_real
        until_deadline = self.clock.real(nxt - self.clock.monotonic()) + _EPSILON
        return max(0.0, min(remaining_real, until_deadline))

    def _invalidate(self, idx: int, session_id: str) -> None:
        """``deleteSessionTxn``: drop the session, then release or delete its keys with lock-delay."""
        session = self.sessions.remove(idx, session_id)
        if session is None:
            return
        delay = min(session.lock_delay, MAX_LOCK_DELAY)
        now = self.clock.monotonic()
        for entry in self.kv.held_by(session_id):
            if session.behavior == SessionBehavior.DELETE:
                self.kv.delete(idx, entry.key)
            else:
                self.kv.release_session(idx, entry.key)
            if delay > 0:
                self.kv.set_lock_delay(entry.key, now + delay)

    def _put_check(self, idx: int, check: Check) -> None:
        self.catalog.put_check(idx, check)
        if check.status == CheckStatus.CRITICAL:
            for session in self.sessions.bound_to_check(check.node, check.check_id):
                self._invalidate(idx, session.id)

    def _require_session(self, session: str) -> None:
        if not session:
            raise KVError("missing session")
        if self.sessions.get(session) is None:
            raise KVError(f'invalid session "{session}"')

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))


def _answer_of(index: int, answer: object) -> object:
    """What a blocking read watches by default: its whole answer."""
    return answer


def watch_index(index: int, answer: object) -> object:
    """A ``watch`` for :meth:`ConsulState.blocking_read` when the index a read reports moves exactly
    when the data it read changes (a whole table's read, the state index, a service's index)."""
    return index


def _with_status(check: Check, status: CheckStatus, output: str) -> Check:
    return replace(check, status=status, output=output)
