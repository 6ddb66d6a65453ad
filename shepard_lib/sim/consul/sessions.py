"""The session table of the simulated Consul: records, validation and TTL deadlines.

Validation and messages follow ``agent/consul/session_endpoint.go`` (``Session.Apply``) and
``agent/consul/state/session.go`` (``sessionCreateTxn``, ``validateSessionChecksTxn``).
What an invalidation does to the KV store lives in :mod:`~shepard_lib.sim.consul.state`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from shepard_lib.durations import format_go_duration, parse_go_duration
from shepard_lib.model import SessionBehavior
from shepard_lib.sim.consul.catalog import SERF_CHECK_ID

SESSION_TTL_MAX = 24 * 3600.0
"""``structs.SessionTTLMax``."""
MAX_LOCK_DELAY = 60.0
"""``structs.MaxLockDelay``: a longer LockDelay is stored but enforced as 60 s."""
DEFAULT_LOCK_DELAY = 15.0


class SessionError(Exception):
    """A session request was rejected (Consul answers 500 with this text)."""


@dataclass(frozen=True)
class ServiceCheckRef:
    """A service check a session is bound to (``ServiceChecks`` entries)."""

    id: str
    namespace: str = ""


@dataclass(frozen=True)
class Session:
    """One session as Consul stores it."""

    id: str
    name: str
    node: str
    lock_delay: float
    behavior: SessionBehavior
    ttl: str
    node_checks: tuple[str, ...]
    service_checks: tuple[ServiceCheckRef, ...]
    create_index: int
    modify_index: int

    @property
    def ttl_seconds(self) -> float:
        """The TTL in seconds (0: no TTL)."""
        return parse_go_duration(self.ttl) if self.ttl else 0.0

    def to_json(self) -> dict[str, object]:
        """The session as ``/v1/session/info`` shows it (LockDelay in nanoseconds)."""
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": round(self.lock_delay * 1e9),
            "Behavior": str(self.behavior),
            "TTL": self.ttl,
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": [{"ID": c.id, "Namespace": c.namespace} for c in self.service_checks] or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(frozen=True)
class SessionRequest:
    """A validated ``PUT /v1/session/create`` body, before it is given an ID and index."""

    node: str
    name: str = ""
    lock_delay: float = DEFAULT_LOCK_DELAY
    behavior: SessionBehavior = SessionBehavior.RELEASE
    ttl: str = ""
    node_checks: tuple[str, ...] = (SERF_CHECK_ID,)
    service_checks: tuple[ServiceCheckRef, ...] = ()


def validate_request(
    node: str,
    behavior: str,
    ttl: str,
    ttl_min: float,
    *,
    name: str = "",
    lock_delay: float = DEFAULT_LOCK_DELAY,
    node_checks: Sequence[str] = (SERF_CHECK_ID,),
    service_checks: Sequence[ServiceCheckRef] = (),
) -> SessionRequest:
    """Check the request as ``Session.Apply`` does; SessionError with Consul's message if invalid."""
    if not node:
        raise SessionError("Must provide Node")
    if behavior not in ("", SessionBehavior.RELEASE, SessionBehavior.DELETE):
        raise SessionError(f"Invalid Behavior setting '{behavior}'")
    if ttl:
        try:
            seconds = parse_go_duration(ttl)
        except ValueError as exc:
            raise SessionError(f"Session TTL '{ttl}' invalid: {exc}") from None
        if seconds != 0 and not ttl_min <= seconds <= SESSION_TTL_MAX:
            raise SessionError(
                f"Invalid Session TTL '{round(seconds * 1e9)}', must be between "
                f"[{format_go_duration(ttl_min, go_string=True)}="
                f"{format_go_duration(SESSION_TTL_MAX, go_string=True)}]"
            )
    return SessionRequest(
        node=node,
        name=name,
        lock_delay=lock_delay,
        behavior=SessionBehavior(behavior or SessionBehavior.RELEASE),
        ttl=ttl,
        node_checks=tuple(node_checks),
        service_checks=tuple(service_checks),
    )


@dataclass
class SessionTable:
    """Live sessions and their TTL deadlines (cluster-monotonic seconds)."""

    ttl_multiplier: float = 1.0
    table_index: int = 0
    _sessions: dict[str, Session] = field(default_factory=dict)
    _deadlines: dict[str, float] = field(default_factory=dict)
    _heap: list[tuple[float, str]] = field(default_factory=list)
    _expired_at: dict[str, float] = field(default_factory=dict)

    def get(self, session_id: str) -> Session | None:
        """The live session with this ID."""
        return self._sessions.get(session_id)

    def all(self) -> list[Session]:
        """Every live session, ordered by ID (as memdb iterates them)."""
        return [self._sessions[k] for k in sorted(self._sessions)]

    def for_node(self, node: str) -> list[Session]:
        """Live sessions of ``node``."""
        return [s for s in self.all() if s.node == node]

    def bound_to_check(self, node: str, check_id: str) -> list[Session]:
        """Sessions invalidated when ``check_id`` of ``node`` goes critical or away."""
        return [
            s
            for s in self.all()
            if s.node == node
            and (check_id in s.node_checks or any(c.id == check_id for c in s.service_checks))
        ]

    def insert(self, idx: int, session_id: str, req: SessionRequest, now: float) -> Session:
        """Store a new session created at raft index ``idx``; arms its TTL timer."""
        session = Session(
            id=session_id,
            name=req.name,
            node=req.node,
            lock_delay=req.lock_delay,
            behavior=req.behavior,
            ttl=req.ttl,
            node_checks=req.node_checks,
            service_checks=req.service_checks,
            create_index=idx,
            modify_index=idx,
        )
        self._sessions[session_id] = session
        self.table_index = idx
        self.renew(session_id, now)
        return session

    def renew(self, session_id: str, now: float) -> Session | None:
        """Reset the TTL timer (``resetSessionTimer``); None when the session is gone."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        ttl = session.ttl_seconds
        if ttl > 0:
            deadline = now + ttl * self.ttl_multiplier
            self._deadlines[session_id] = deadline
            heapq.heappush(self._heap, (deadline, session_id))
        return session

    def remove(self, idx: int, session_id: str) -> Session | None:
        """Delete a session at raft index ``idx``; None when it did not exist."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._deadlines.pop(session_id, None)
            self.table_index = idx
        return session

    def expired(self, now: float) -> list[str]:
        """IDs whose TTL deadline has passed (and which were not renewed since)."""
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, session_id = heapq.heappop(self._heap)
            if self._deadlines.get(session_id) == deadline:
                del self._deadlines[session_id]
                self._expired_at[session_id] = deadline
                out.append(session_id)
        return out

    def expired_at(self, session_id: str) -> float | None:
        """The TTL deadline at which ``session_id`` expired (when Consul's timer fires; the sim
        applies expiries at the next read or write after it), or None if it did not expire."""
        return self._expired_at.get(session_id)

    def next_deadline(self) -> float | None:
        """The earliest armed TTL deadline."""
        while self._heap and self._deadlines.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None
