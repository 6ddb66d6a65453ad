"""Fault injection for the simulated Consul: errors, latency, late writes and replies, leader loss.

Every control is a plain attribute or method, safe to change while the server runs. Errors are
drawn from a seeded RNG, so a seeded chaos run fails the same requests each time it makes the
same requests in the same order.
"""

from __future__ import annotations

import random
import threading

NO_LEADER = "No cluster leader"
"""``structs.ErrNoLeader``: the 500 body when the cluster has no leader."""
RPC_FAILED = "rpc error making call: EOF"
"""The 500 body of an injected error (a server connection dropped mid-RPC)."""


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
      were partitioned from the servers, so its TTL runs out.
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
        """Clear every fault."""
        with self._lock:
            self.error_rate = 0.0
            self.lost_reply_rate = 0.0
            self.latency = 0.0
            self.late_write_rate = 0.0
            self.late_reply_rate = 0.0
            self.late_delay = 0.0
            self.leader_lost = False
            self._paused.clear()
