"""A Consul session that keeps itself alive and says when it is lost.

Every lock Shepard holds belongs to one :class:`Session`. The session is created with a TTL and
renewed every ``ttl / 2`` by a background thread; Consul releases (or deletes) the session's locks
when it is destroyed or expires. The holder must learn that it lost them rather than assume it still
has them (Consul's ``api/lock.go`` closes a *lost* channel for the same reason), so the session sets
:attr:`Session.lost` when

- a renew answers 404: Consul no longer knows the session (it expired, or was destroyed behind
  our back), or
- no renew has succeeded for ``ttl`` since the last good one was *sent* (Consul unreachable).
  A watchdog thread measures this, so the event is set on time even while a renew request hangs.
  Consul resets its TTL timer only when it receives a renew, which is after we sent it, so the
  event is set no later than Consul could invalidate the session.

Usage::

    with Session(consul, "shepard-agent web-03", ttl=15) as session:
        ...                  # session.lost is set if the session dies; session.check() raises LockLost
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from types import TracebackType

from shepard_lib.backends import ConsulAPI
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.errors import Cancelled, ConsulError, LockLost, ShepardError
from shepard_lib.model import SessionBehavior

log = logging.getLogger(__name__)

CREATE_ATTEMPTS = 3
"""Creates tried when Consul's answer is lost (the backend retries only answers proving nothing applied)."""
RETRY_FRACTION = 5
"""After a failed renew, retry every ``ttl / RETRY_FRACTION`` until the session counts as lost."""
THREAD_JOIN = 30.0
"""Real seconds :meth:`Session.destroy` waits for its threads, which end at once when told (a
renew in flight is cancelled); the bound only keeps a backend that cannot cancel from hanging it."""


class Session:
    """One Consul session, renewed in the background; a context manager (create on enter, destroy on exit).

    ``name`` identifies the holder in Consul and in logs (it is not a secret). ``ttl`` and
    ``lock_delay`` are cluster seconds of ``clock``. ``node`` and ``node_checks`` bind the session to
    a Consul node's health (Consul's defaults, the agent's node and ``serfHealth``, when None).
    """

    def __init__(
        self,
        consul: ConsulAPI,
        name: str,
        *,
        ttl: float = 15,
        lock_delay: float = 15,
        behavior: SessionBehavior = SessionBehavior.RELEASE,
        node: str | None = None,
        node_checks: Sequence[str] | None = None,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"session ttl must be > 0, got {ttl!r}")
        self.name = name
        self.ttl = float(ttl)
        self.lock_delay = float(lock_delay)
        self.behavior = behavior
        self.node = node
        self.node_checks = None if node_checks is None else tuple(node_checks)
        self.id = ""
        """The Consul session ID; empty until :meth:`create`."""
        self.lost = CancelEvent()
        """Set once the session (and so every lock it holds) is lost. Never cleared; a
        :class:`~shepard_lib.cancel.CancelEvent`, so a blocking call given it as ``cancel`` ends then."""
        self.lost_reason: str | None = None
        """Why :attr:`lost` was set."""
        self._consul = consul
        self._clock = clock
        self._state = threading.Condition()
        self._last_renew = 0.0  # clock.monotonic() when the last successful renew was sent
        self._stop_renewing = CancelEvent()  # also aborts a renew in flight
        self._threads: list[threading.Thread] = []
        self._ended = False  # destroy() was called: the watchdog stops too
        self._abandoned = False
        self._claims: set[str] = set()  # holder tokens of the claims coordinators drive under this session

    def __repr__(self) -> str:
        return f"Session(name={self.name!r}, id={self.id!r}, ttl={self.ttl}, lost={self.lost.is_set()})"

    # --- lifecycle -----------------------------------------------------------------------------

    def create(self) -> str:
        """Create the session in Consul and start renewing it every ``ttl / 2``; returns its ID."""
        if self.id:
            raise RuntimeError(f"session {self.name!r} was already created")
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            sent = self._clock.monotonic()  # Consul starts the TTL when it gets the request, not before
            try:
                self.id = self._consul.session_create(
                    self.name,
                    self.ttl,
                    behavior=self.behavior,
                    lock_delay=self.lock_delay,
                    node=self.node,
                    node_checks=self.node_checks,
                )
                break
            except ConsulError as exc:
                # An answer lost after Consul created the session leaves a session that holds
                # nothing and ends at its TTL: creating another one is safe.
                if attempt == CREATE_ATTEMPTS or not (exc.status is None or exc.status >= 500):
                    raise
                log.warning("session %r: create failed (%s), trying again", self.name, exc)
        self._last_renew = sent
        _register(self._consul, self)
        log.debug("session %r created (ttl %ss, lock-delay %ss)", self.name, self.ttl, self.lock_delay)
        for target, role in ((self._renew_loop, "renew"), (self._watchdog, "watchdog")):
            thread = threading.Thread(target=target, name=f"shepard-session-{role}[{self.name}]", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.id

    def destroy(self) -> None:
        """Stop renewing and destroy the session in Consul, which releases its locks.

        Idempotent. A failure to reach Consul is logged, not raised: the session then ends by its
        TTL. After :meth:`abandon` nothing is sent to Consul. A clean destroy does not set :attr:`lost`.
        Consul puts locks still held at destroy under the lock-delay, as for any invalidation:
        release them first to hand them over at once. The renewal and watchdog threads have ended
        when it returns (a renew in flight is cancelled).
        """
        with self._state:
            if self._ended:
                return
            self._ended = True
            self._state.notify_all()
        self._stop_renewing.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(THREAD_JOIN)  # both wait only on what was just set: they return at once
                if thread.is_alive():
                    log.warning("session %r: %s did not end within %gs", self.name, thread.name, THREAD_JOIN)
        if not self.id or self._abandoned:
            return
        try:
            self._consul.session_destroy(self.id)
        except ShepardError as exc:
            log.warning(
                "session %r: destroy failed, its locks are freed when its TTL runs out: %s", self.name, exc
            )
        else:
            log.debug("session %r destroyed", self.name)

    def abandon(self) -> None:
        """Crash simulation (tests, chaos): stop renewing WITHOUT destroying the session.

        Consul frees the session's locks only when its TTL runs out. The watchdog keeps running, so
        :attr:`lost` is set ``ttl`` after the last good renew, as it would be for a client whose
        renewals stopped reaching Consul. A later :meth:`destroy` (or leaving the ``with`` block)
        sends nothing to Consul.
        """
        self._abandoned = True
        self._stop_renewing.set()
        log.info("session %r abandoned: no more renewals, Consul frees its locks after the TTL", self.name)

    def invalidate(self, reason: str) -> None:
        """Mark the session lost now, without asking Consul, so its holders stop acting on its locks.

        For a holder that is shutting down: every wait that watches :attr:`lost` ends, the holders
        release what they hold (the session still exists in Consul), then :meth:`destroy` ends it.
        """
        self._mark_lost(reason)

    def hold(self, token: str) -> None:
        """Record that a coordinator of this process drives the plan claim ``token`` under this session.

        Several coordinators may share one session; a member held under it is theirs only while
        its claim token is held here (see :meth:`holds`), otherwise it was left behind.
        """
        with self._state:
            self._claims.add(token)

    def drop(self, token: str) -> None:
        """Forget claim ``token`` (its coordinator finished, gave it back, or stopped)."""
        with self._state:
            self._claims.discard(token)

    def holds(self, token: str | None) -> bool:
        """Whether a coordinator of this process is driving claim ``token`` under this session."""
        with self._state:
            return token is not None and token in self._claims

    def check(self) -> None:
        """Raise :class:`LockLost` if the session is lost."""
        if self.lost.is_set():
            raise LockLost(
                f"session {self.name!r} is lost ({self.lost_reason}); its locks are no longer held"
            )

    def verify(self) -> None:
        """Ask Consul (now) whether the session still exists; if not, mark it lost and raise LockLost.

        For a caller whose request was refused in a way that may mean the session is gone (Consul
        answers ``?acquire`` with an invalid session by HTTP 500), before the next renew would tell.
        """
        self.check()
        if self.id and self._consul.session_info(self.id) is None:
            self._mark_lost("Consul no longer knows it")
        self.check()

    def __enter__(self) -> Session:
        self.create()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    # --- background threads --------------------------------------------------------------------

    def _mark_lost(self, reason: str) -> None:
        with self._state:
            if self.lost.is_set():
                return
            self.lost_reason = reason
            self.lost.set()
            self._state.notify_all()
        log.warning("session %r lost: %s", self.name, reason)

    def _renew_loop(self) -> None:
        """Renew every ``ttl / 2``; after a failure retry sooner, until renewed or lost."""
        interval = self.ttl / 2
        while not self._clock.wait(self._stop_renewing, interval) and not self.lost.is_set():
            sent = self._clock.monotonic()
            try:
                known = self._consul.session_renew(self.id, cancel=self._stop_renewing)
            except Cancelled:
                return
            except Exception as exc:  # this thread must survive anything the backend raises
                if self._stop_renewing.is_set():
                    return
                left = self._last_renew + self.ttl - self._clock.monotonic()
                log.warning(
                    "session %r: renew failed (%s); it counts as lost in %.1fs without a successful renew",
                    self.name,
                    exc,
                    max(left, 0.0),
                )
                interval = self.ttl / RETRY_FRACTION
                continue
            if self._stop_renewing.is_set():
                return
            if not known:
                self._mark_lost("Consul no longer knows it (renew answered 404): it expired or was destroyed")
                return
            with self._state:
                self._last_renew = max(self._last_renew, sent)
            interval = self.ttl / 2

    def _watchdog(self) -> None:
        """Set :attr:`lost` once ``ttl`` has passed since the last successful renew was sent."""
        with self._state:
            while not self._ended and not self.lost.is_set():
                left = self._last_renew + self.ttl - self._clock.monotonic()
                if left <= 0:
                    break
                self._clock.wait_for(self._state, lambda: self._ended or self.lost.is_set(), left)
            else:
                return
        self._mark_lost(f"no successful renew for {self.ttl:g}s (Consul unreachable?)")


_LOCAL: weakref.WeakKeyDictionary[object, weakref.WeakValueDictionary[str, Session]] = (
    weakref.WeakKeyDictionary()
)
_LOCAL_LOCK = threading.Lock()


def _register(consul: ConsulAPI, session: Session) -> None:
    with _LOCAL_LOCK, contextlib.suppress(TypeError):  # a backend not weakly referenceable: not known here
        _LOCAL.setdefault(consul, weakref.WeakValueDictionary())[session.id] = session


def live_here(consul: ConsulAPI, session_id: str) -> Session | None:
    """The session ``session_id`` on ``consul`` when this process holds it and it is alive by its own account.

    Alive means created here, not destroyed or abandoned, and :attr:`Session.lost` not set, which
    the watchdog sets no later than Consul could invalidate the session: so Consul still knows it,
    and a caller can skip a consistent read. None means "not known here": ask Consul.
    """
    with _LOCAL_LOCK:
        try:
            by_id = _LOCAL.get(consul)
        except TypeError:
            return None
        session = by_id.get(session_id) if by_id is not None else None
    if session is None or session.lost.is_set() or session._ended or session._abandoned:
        return None
    return session
