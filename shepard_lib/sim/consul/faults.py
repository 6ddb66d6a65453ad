"""Fault injection for the simulated Consul: errors, latency, late writes and replies, leader loss.

Every control is a plain attribute or method, safe to change while the server runs. Errors are
drawn from a seeded RNG, so a seeded chaos run fails the same requests each time it makes the
same requests in the same order.
"""

from __future__ import annotations

import enum
import random
import threading
from collections import Counter

NO_LEADER = "No cluster leader"
"""``structs.ErrNoLeader``: the 500 body when the cluster has no leader."""
RPC_FAILED = "rpc error making call: EOF"
"""The 500 body of an injected error (a server connection dropped mid-RPC)."""


class Fault(enum.StrEnum):
    """A fault the simulated Consul injects into one request."""

    ERROR = "error"  # answered 500, not applied
    LOST_REPLY = "lost_reply"  # applied, answered 500
    LATE_WRITE = "late_write"  # applied after ``late_delay``
    LATE_REPLY = "late_reply"  # applied at once, answered after ``late_delay``


class Faults:
    """Knobs the tests turn.

    - ``error_rate``: fraction (0..1) of ``/v1/`` requests answered ``500`` before anything is applied;
    - ``lost_reply_rate``: fraction of ``/v1/`` requests that are applied but whose answer is lost
      (``500`` all the same): the ambiguous failure of a write whose server connection dropped;
    - ``latency``: cluster seconds added before each ``/v1/`` request is handled;
    - ``late_write_rate``: fraction of writes (PUT, POST, DELETE) held for ``late_delay`` cluster
      seconds *before* they are applied: a client that timed out meanwhile sees an error, and the
      write still lands later (a Raft apply that outlasted the client's timeout);
    - ``late_reply_rate``: fraction of writes applied at once whose answer is held for
      ``late_delay`` cluster seconds: the write took effect, the client may have given up on it;
    - ``leader_lost``: no leader, so requests answer ``500 No cluster leader`` except ``?stale``
      reads, agent and status endpoints (and ``/v1/status/leader`` answers ``""``);
    - :meth:`pause_session_renewals`: renewals of that session fail (``500``), as if the holder
      were partitioned from the servers, so its TTL runs out;
    - :meth:`inject`: one :class:`Fault` into a given later write to an endpoint, whatever the rates
      (a write with a planned fault is never failed by ``error_rate`` instead).

    :meth:`injected` counts the faults injected so far by fault and endpoint (``/v1/txn``), so a
    test can tell that the faults it asked for really happened (:meth:`reset` keeps the counts).
    """

    def __init__(self, seed: int = 0) -> None:
        self.error_rate = 0.0
        self.lost_reply_rate = 0.0
        self.latency = 0.0
        self.late_write_rate = 0.0
        self.late_reply_rate = 0.0
        self.late_delay = 0.0
        self.leader_lost = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._paused: set[str] = set()
        self._planned: dict[str, list[tuple[int, Fault]]] = {}  # endpoint: (writes to go, fault)
        self._injected: Counter[tuple[Fault, str]] = Counter()

    def draw_error(self) -> bool:
        """True when this request should fail unapplied (draws only while error_rate > 0)."""
        return self._draw(self.error_rate)

    def draw_lost_reply(self) -> bool:
        """True when this applied request's answer should be lost (draws only while the rate > 0)."""
        return self._draw(self.lost_reply_rate)

    def draw_late_write(self) -> bool:
        """True when this write should be applied only after ``late_delay``."""
        return self._draw(self.late_write_rate)

    def draw_late_reply(self) -> bool:
        """True when this applied write's answer should wait ``late_delay``."""
        return self._draw(self.late_reply_rate)

    def inject(self, fault: Fault, endpoint: str, after: int = 0) -> None:
        """Inject ``fault`` into the write (PUT, POST, DELETE) to ``endpoint`` (``/v1/txn``) that comes
        after ``after`` more writes to it (0: the next one)."""
        with self._lock:
            self._planned.setdefault(endpoint, []).append((after, fault))

    def planned(self, endpoint: str) -> frozenset[Fault]:
        """The faults :meth:`inject` planned for this write to ``endpoint`` (called once per write)."""
        with self._lock:
            planned = self._planned.get(endpoint)
            if not planned:
                return frozenset()
            now = frozenset(fault for after, fault in planned if after == 0)
            self._planned[endpoint] = [(after - 1, fault) for after, fault in planned if after > 0]
            return now

    def count(self, fault: Fault, endpoint: str) -> None:
        """Record that ``fault`` was injected into a request to ``endpoint``."""
        with self._lock:
            self._injected[(fault, endpoint)] += 1

    def injected(self) -> dict[tuple[Fault, str], int]:
        """How many times each fault was injected, by (fault, endpoint)."""
        with self._lock:
            return dict(self._injected)

    def _draw(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def pause_session_renewals(self, session_id: str) -> None:
        """Fail every renewal of ``session_id`` until :meth:`resume_session_renewals`."""
        with self._lock:
            self._paused.add(session_id)

    def resume_session_renewals(self, session_id: str) -> None:
        """Let renewals of ``session_id`` through again."""
        with self._lock:
            self._paused.discard(session_id)

    def renewals_paused(self, session_id: str) -> bool:
        """Whether renewals of ``session_id`` are being failed."""
        with self._lock:
            return session_id in self._paused

    def reset(self) -> None:
        """Clear every fault (the counts of :meth:`injected` stay)."""
        with self._lock:
            self._planned.clear()
            self.error_rate = 0.0
            self.lost_reply_rate = 0.0
            self.latency = 0.0
            self.late_write_rate = 0.0
            self.late_reply_rate = 0.0
            self.late_delay = 0.0
            self.leader_lost = False
            self._paused.clear()
