"""Consul locks held by a :class:`~shepard_lib.session.Session`: one mutex key, or N restart slots.

A lock is a KV key taken with ``?acquire=<session>``. Consul itself frees it when the session is
destroyed or invalidated, and then refuses it to every other session for the session's lock-delay.

Waiting never polls. A contender that is refused reads the key (or the slot prefix) once, then
waits with blocking queries (``?index=&wait=``): one request per change of the key or prefix, or per
wait. It tries again only when it sees a free key. Each wait is bounded by

- the time left before ``timeout`` (then :class:`~shepard_lib.errors.LockTimeout`);
- the session's ``lock_delay`` (at least 1 s) when a key looked free and was refused anyway: it is
  under the lock-delay of a session that was invalidated, and nothing changes the key when the delay
  ends, so the contender retries after that long (by then the delay is over if the invalidated
  holder used the same lock-delay; otherwise it waits once more);
- ``max_wait`` (default 15 cluster seconds, as Consul's ``api/lock.go``): the longest it takes the
  contender to notice that ``cancel`` was set. Losing the session ends the blocking query in
  flight at once (it is cancelled on ``session.lost``).

Losing the session while waiting raises :class:`~shepard_lib.errors.LockLost`; so does ``cancel``
(the caller's event, usually a session's ``lost`` or a shutdown event), because the caller asked to
stop. A holder learns that it lost a lock from ``session.lost`` (also :attr:`Slot.lost`).

Consul lets a session acquire a key it already holds, and releases a key for whichever holder asks
with the session. So that two holders sharing one session in this process (two threads, two
:class:`Lock` objects) can neither both "get" one key nor free each other's, every acquire is
claimed in-process first, and a release goes out only for the holder that has the claim.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TypeVar

from shepard_lib.backends import ConsulAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.errors import Cancelled, ConsulError, LockLost, LockTimeout, ShepardError
from shepard_lib.model import KVEntry, TxnOp, TxnVerb
from shepard_lib.session import Session

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT = 15.0
"""Cluster seconds one blocking query waits at most (Consul's ``DefaultLockWaitTime``)."""
MIN_WAIT = 0.05
"""Cluster seconds a blocking query waits at least (Consul reads a zero wait as its 5 min default)."""
MIN_RETRY = 1.0
"""Cluster seconds a contender waits at least before retrying a key that looked free but was refused
(its own session may have a shorter lock-delay than the invalidated holder's)."""

T = TypeVar("T")


class _Claims:
    """Which holder in this process holds each key of each session.

    A session is identified by its :class:`Session` object, through its ``lost`` event (a
    :class:`Slot` carries that event), not by its ID: a seeded simulator hands the same IDs out
    again. Only weak references are kept, so claims a crashed holder never gave back go away with it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: weakref.WeakKeyDictionary[threading.Event, dict[str, weakref.ref[object]]] = (
            weakref.WeakKeyDictionary()
        )

    def claim(self, session: threading.Event, key: str, owner: object) -> bool:
        """Claim ``key`` for ``owner``; False when another live holder of the session has it."""
        with self._lock:
            owners = self._owners.setdefault(session, {})
            current = owners.get(key)
            holder = current() if current is not None else None
            if holder is not None and holder is not owner:
                return False
            owners[key] = weakref.ref(owner)
            return True

    def swap(self, session: threading.Event, key: str, owner: object, new_owner: object) -> None:
        """Hand ``owner``'s claim of ``key`` to ``new_owner`` (the same slot with a new token)."""
        with self._lock:
            owners = self._owners.get(session, {})
            current = owners.get(key)
            if current is not None and current() is owner:
                owners[key] = weakref.ref(new_owner)

    def drop(self, session: threading.Event, key: str, owner: object) -> bool:
        """Give up ``owner``'s claim; False when it had none (released already, or never held)."""
        with self._lock:
            owners = self._owners.get(session, {})
            current = owners.get(key)
            if current is None or current() is not owner:
                return False
            del owners[key]
            return True


_CLAIMS = _Claims()


class _Hints:
    """The slot number each session last held under each slot prefix (weakly, like :class:`_Claims`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: weakref.WeakKeyDictionary[threading.Event, dict[str, int]] = weakref.WeakKeyDictionary()

    def remember(self, session: threading.Event, prefix: str, number: int) -> None:
        with self._lock:
            self._last.setdefault(session, {})[prefix] = number

    def last(self, session: threading.Event, prefix: str) -> int | None:
        with self._lock:
            return self._last.get(session, {}).get(prefix)


_HINTS = _Hints()
_RNG = random.Random()


def _acquire_loop(
    consul: ConsulAPI,
    session: Session,
    *,
    what: str,
    watch_key: str,
    recurse: bool,
    attempt: Callable[[list[KVEntry] | None], T | None],
    looks_free: Callable[[list[KVEntry]], bool],
    timeout: float | None,
    cancel: threading.Event | None,
    clock: Clock,
    max_wait: float,
) -> T:
    """Try ``attempt``; while it is refused, wait with blocking queries on ``watch_key`` and retry.

    ``attempt`` gets the last view of the watched key(s) (None before the first read: try
    everything) and returns the acquired thing or None. ``looks_free`` tells from a view whether an
    attempt could succeed.
    """
    if not session.id:
        raise RuntimeError(f"{what}: session {session.name!r} was not created")
    deadline = None if timeout is None else clock.monotonic() + timeout
    index = 0
    view: list[KVEntry] | None = None
    while True:
        session.check()
        if cancel is not None and cancel.is_set():
            raise LockLost(f"{what}: cancelled while waiting")
        refused_while_free = False
        if view is None or looks_free(view):
            try:
                got = attempt(view)
            except ConsulError:
                session.verify()  # Consul answers an acquire with a dead session by HTTP 500
                raise
            if got is not None:
                return got
            refused_while_free = view is not None
        wait = min(max_wait, max(session.lock_delay, MIN_RETRY)) if refused_while_free else max_wait
        if deadline is not None:
            left = deadline - clock.monotonic()
            if left <= 0:
                raise LockTimeout(f"{what}: not acquired within {timeout:g}s")
            wait = min(wait, left)
        try:
            index, view = consul.watch(
                watch_key, index, max(wait, MIN_WAIT), recurse=recurse, cancel=session.lost
            )
        except Cancelled:
            session.check()  # the session was lost while the query waited: LockLost
            raise


class SlotNotNeeded(ShepardError):
    """A slot wait ended because its caller no longer needs a slot (see :meth:`RestartSlots.acquire`)."""


class Lock:
    """One KV key as a mutex held by ``session``; a context manager that acquires with ``timeout``.

    ``value`` is stored in the key while it is held. ``timeout`` (cluster seconds, None: wait
    forever) is what ``with lock:`` uses.
    """

    def __init__(
        self,
        consul: ConsulAPI,
        key: str,
        session: Session,
        *,
        value: bytes | str = b"",
        timeout: float | None = None,
        clock: Clock = REAL_CLOCK,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self.key = key
        self._consul = consul
        self._session = session
        self._value = value
        self._timeout = timeout
        self._clock = clock
        self._max_wait = max_wait
        self._held = False

    def __repr__(self) -> str:
        return f"Lock(key={self.key!r}, session={self._session.name!r}, held={self.held})"

    @property
    def held(self) -> bool:
        """Acquired, not released, and the session is not lost."""
        return self._held and not self._session.lost.is_set()

    @property
    def lost(self) -> threading.Event:
        """Set when the session holding this lock is lost (the session's :attr:`~Session.lost`)."""
        return self._session.lost

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> None:
        """Take the lock, waiting at most ``timeout`` cluster seconds (None: forever).

        Raises LockTimeout when the timeout passes, LockLost when the session is lost or ``cancel``
        is set while waiting.
        """
        if self.held:
            return

        def attempt(_view: list[KVEntry] | None) -> bool | None:
            taken = _acquire_claimed(self._consul, self.key, self._value, self._session, self)
            return True if taken is not None else None

        _acquire_loop(
            self._consul,
            self._session,
            what=f"lock {self.key}",
            watch_key=self.key,
            recurse=False,
            attempt=attempt,
            looks_free=lambda view: not view or view[0].session is None,
            timeout=timeout,
            cancel=cancel,
            clock=self._clock,
            max_wait=self._max_wait,
        )
        self._held = True
        log.debug("lock %s acquired by session %r", self.key, self._session.name)

    def release(self) -> None:
        """Release the lock (idempotent). A failure is logged: the lock then ends with the session."""
        if not self._held:
            return
        self._held = False
        if not _CLAIMS.drop(self._session.lost, self.key, self):
            return
        try:
            self._consul.release(self.key, self._session.id)
        except ShepardError as exc:
            log.warning(
                "lock %s: release failed, it is freed when session %r ends: %s",
                self.key,
                self._session.name,
                exc,
            )

    def __enter__(self) -> Lock:
        self.acquire(self._timeout)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@dataclass(frozen=True)
class Slot:
    """A held restart slot: ``key`` is ``<slot_prefix><number>``.

    ``acquired_at`` is cluster Unix time. ``lost`` is the holding session's ``lost`` event: once it
    is set the slot may already belong to someone else. ``index`` is the fencing token of this
    acquisition: the slot key's ModifyIndex right after it was acquired. A write fenced
    with ``check-index`` on it applies only while this acquisition holds the slot, so a write sent
    under it and applied late can never land under a later acquisition by the same session.
    """

    key: str
    number: int
    session_id: str
    acquired_at: float
    lost: threading.Event
    index: int = 0
    holder: str = ""


class RestartSlots:
    """The seed's ``restart_lock/0..size-1``: at most ``size`` holders at once, each an ordinary lock.

    Every holder is visible by key, and Consul frees a dead holder's slot when its session is
    invalidated. A slot's value is ``{"holder": ..., "session": ..., "acquired_at": ...}`` (JSON).
    ``logger`` takes the "acquired" and "released" lines (events ``slot_acquired`` and
    ``slot_released``): the coordinator passes one that names the member the slot is for.
    """

    def __init__(
        self,
        consul: ConsulAPI,
        slot_prefix: str,
        size: int,
        *,
        clock: Clock = REAL_CLOCK,
        max_wait: float = DEFAULT_MAX_WAIT,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"restart slots: size must be >= 1, got {size!r}")
        self.prefix = slot_prefix if slot_prefix.endswith("/") else slot_prefix + "/"
        self.size = size
        self._consul = consul
        self._clock = clock
        self._max_wait = max_wait
        self._log = logger if logger is not None else log

    def __repr__(self) -> str:
        return f"RestartSlots(prefix={self.prefix!r}, size={self.size})"

    def key(self, number: int) -> str:
        """The key of slot ``number``."""
        return f"{self.prefix}{number}"

    def acquire(
        self,
        session: Session,
        *,
        holder: str,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
        needed: Callable[[], bool] | None = None,
    ) -> Slot:
        """Take a free slot, else wait for a release (see the module docs).

        The first try is one slot (the one this session held last, else one picked from its ID);
        when it is refused the prefix is read once and only slots that look free are tried, in
        random order, so contenders spread instead of colliding on slot 0.

        ``holder`` names the holder in the slot's value (e.g. ``"web-03 alloc 1f2e..."``). Raises
        LockTimeout after ``timeout`` cluster seconds (None: wait forever), LockLost when the
        session is lost or ``cancel`` is set while waiting. ``needed`` is asked before a slot
        that came free after a wait is taken: when it says no (someone else did the work meanwhile)
        :class:`SlotNotNeeded` is raised instead, and nothing is taken.
        """

        def attempt(view: list[KVEntry] | None) -> Slot | None:
            if view is not None and needed is not None and not needed():
                raise SlotNotNeeded(f"restart slot under {self.prefix}: {holder} no longer needs one")
            for number in self._candidates(session, view):
                slot = Slot(
                    self.key(number), number, session.id, self._clock.time(), session.lost, holder=holder
                )
                value = json.dumps({"holder": holder, "session": session.id, "acquired_at": slot.acquired_at})
                index = _acquire_claimed(self._consul, slot.key, value, session, slot, token=True)
                if index is not None:
                    self._log.info(
                        "restart slot %s acquired by %s", slot.key, holder, extra={"event": "slot_acquired"}
                    )
                    _HINTS.remember(session.lost, self.prefix, number)
                    return self._tokened(slot, session, index)
            return None

        return _acquire_loop(
            self._consul,
            session,
            what=f"restart slot under {self.prefix} (size {self.size}) for {holder}",
            watch_key=self.prefix,
            recurse=True,
            attempt=attempt,
            looks_free=lambda view: bool(self._free(view)),
            timeout=timeout,
            cancel=cancel,
            clock=self._clock,
            max_wait=self._max_wait,
        )

    def _candidates(self, session: Session, view: list[KVEntry] | None) -> list[int]:
        """Slots to try, in order: before any read, one guess; then every slot that looks free, shuffled.

        The guess is the slot this session held last (a worker that just released it finds it free
        unless someone was faster), else one picked from the session ID, so contenders spread over
        the slots instead of all trying slot 0 first. After a refused guess the caller reads the
        prefix (a blocking view it keeps), so the refused attempts per restart stay about one.
        """
        if view is None:
            last = _HINTS.last(session.lost, self.prefix)
            if last is None or last >= self.size:
                last = zlib.crc32(session.id.encode("utf-8")) % self.size
            return [last]
        free = self._free(view)
        _RNG.shuffle(free)
        return free

    def _tokened(self, slot: Slot, session: Session, index: int) -> Slot:
        """``slot`` with its fencing token: the key's ModifyIndex right after the acquire.

        ``index`` is that ModifyIndex when the acquire's txn result carried it; otherwise it is read
        (consistently). Only the holder's session changes a held slot, so it is this acquisition's.
        """
        if index > 0:
            tokened = replace(slot, index=index)
            _CLAIMS.swap(slot.lost, slot.key, slot, tokened)
            return tokened
        try:
            entry = self._consul.get(slot.key, consistent=True)
        except BaseException:
            self.release(slot)
            raise
        if entry is None or entry.session != session.id:
            self.release(slot)
            raise LockLost(f"restart slot {slot.key}: lost right after it was acquired")
        tokened = replace(slot, index=entry.modify_index)
        _CLAIMS.swap(slot.lost, slot.key, slot, tokened)
        return tokened

    def unlock_op(self, slot: Slot) -> TxnOp:
        """The txn op releasing ``slot`` with another write (a finish); then :meth:`released`."""
        return TxnOp(TxnVerb.UNLOCK, slot.key, value=b"", session=slot.session_id)

    def released(self, slot: Slot) -> None:
        """``slot`` was released by a transaction carrying :meth:`unlock_op`."""
        if _CLAIMS.drop(slot.lost, slot.key, slot):
            self._log.info("restart slot %s released", slot.key, extra={"event": "slot_released"})

    def release(self, slot: Slot) -> None:
        """Release ``slot`` (idempotent). A failure is logged: the slot then ends with the session."""
        if not _CLAIMS.drop(slot.lost, slot.key, slot):
            return
        try:
            self._consul.release(slot.key, slot.session_id)
        except ShepardError as exc:
            self._log.warning(
                "restart slot %s: release failed, it is freed when its session ends: %s", slot.key, exc
            )
        else:
            self._log.info("restart slot %s released", slot.key, extra={"event": "slot_released"})

    @contextmanager
    def hold(
        self,
        session: Session,
        *,
        holder: str,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Slot]:
        """``with slots.hold(session, holder=...) as slot:`` acquire a slot and release it on exit."""
        slot = self.acquire(session, holder=holder, timeout=timeout, cancel=cancel)
        try:
            yield slot
        finally:
            self.release(slot)

    def holders(self) -> dict[int, str]:
        """Slot number -> holder text of every held slot (any number), from a consistent read."""
        held: dict[int, str] = {}
        for entry in self._consul.get_tree(self.prefix, consistent=True):
            number = self._number(entry.key)
            if number is not None and entry.session is not None:
                held[number] = _holder_text(entry)
        return held

    def _number(self, key: str) -> int | None:
        suffix = key[len(self.prefix) :] if key.startswith(self.prefix) else ""
        return int(suffix) if suffix.isdigit() else None

    def _free(self, view: Sequence[KVEntry]) -> list[int]:
        """Slots 0..size-1 not held in ``view`` (a missing key is free)."""
        taken = {self._number(e.key) for e in view if e.session is not None}
        return [n for n in range(self.size) if n not in taken]


def _acquire_claimed(
    consul: ConsulAPI, key: str, value: bytes | str, session: Session, owner: object, *, token: bool = False
) -> int | None:
    """Take ``key`` for ``owner``, unless another holder of ``session`` has it in this process.

    Returns None when refused. With ``token`` the key is taken by a txn ``lock`` op, whose result
    carries the key's new ModifyIndex (the acquisition's fencing token), returned; otherwise by
    ``?acquire``, and 0 is returned.
    """
    if not _CLAIMS.claim(session.lost, key, owner):
        return None
    try:
        acquired = (
            _lock(consul, key, value, session.id)
            if token
            else (0 if consul.acquire(key, value, session.id) else None)
        )
    except BaseException:
        _CLAIMS.drop(session.lost, key, owner)
        # The acquire may have applied with its answer lost: release, or a long-lived session keeps the key.
        with contextlib.suppress(ShepardError):
            consul.release(key, session.id)
        raise
    if acquired is None:
        _CLAIMS.drop(session.lost, key, owner)
    return acquired


def _lock(consul: ConsulAPI, key: str, value: bytes | str, session_id: str) -> int | None:
    """A txn ``lock`` of ``key``: its new ModifyIndex, or None when Consul refused it (held, lock-delay).

    Consul refuses a lock with an unknown session too (as ``?acquire`` answers it with a 500): that
    is raised as a :class:`ConsulError`, so the caller asks whether its session is gone.
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    result = consul.txn([TxnOp(TxnVerb.LOCK, key, value=data, session=session_id)])
    if result.ok:
        entry = next((e for e in result.results if e.key == key), None)
        return entry.modify_index if entry is not None else 0
    reasons = "; ".join(what for _, what in result.errors)
    if "invalid session" in reasons.lower():
        raise ConsulError(f"txn lock {key}", reasons, status=409)
    return None


def _holder_text(entry: KVEntry) -> str:
    """The ``holder`` of a slot's JSON value, or the raw text when it is not Shepard's JSON."""
    text = entry.text()
    try:
        data = json.loads(text)
    except ValueError:
        return text
    return str(data.get("holder", text)) if isinstance(data, dict) else text
