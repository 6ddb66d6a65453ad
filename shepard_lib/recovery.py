"""Recovery in the restart flow: what the happy path of :mod:`shepard_lib.coordinator` hands off.

What can leave a member's restart in doubt is decided here from facts Consul or Nomad answer,
never from elapsed time or clocks:

- **An ambiguous restart** (:func:`trigger_outcome`, method nomad_api). Nomad's restart call
  failed: an answer that proves nothing was applied (429, 503, a request never sent) gives the
  member back; any other may have restarted the task, and only its health decides. (Method
  consul_key has no such case: its trigger is written in the claim's own transaction, see
  :mod:`shepard_lib.coordinator`, so a claimed member was triggered and an unclaimed one was not.)
- **An allocation Nomad stopped, replaced or forgot** (:func:`gone_reason`): such a member is
  skipped, never failed; a replacement Nomad placed after the change was seen already renders the
  new config and is not restarted.
- **A member left ``restarting``** whose claim nobody drives any more (:class:`Holders`): its
  holder's session is gone (a consistent read says so), or the holder token is not held by any
  coordinator of this process although the member is under this process's session; whoever
  reclaims it triggers again only if the claim did not carry its trigger and the task did not
  restart (:func:`reclaim_decision`);
- **A failed member that no longer counts as down** (:func:`no_longer_down`): its task is
  healthy again, or its allocation is gone.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Mapping, Sequence

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.errors import BackendError, LockLost, NotFound
from shepard_lib.health import HealthGate, restarted
from shepard_lib.model import Allocation, AllocClientStatus, TaskState
from shepard_lib.perbackend import PerBackend
from shepard_lib.plan import Member, MemberState
from shepard_lib.session import Session, live_here

__all__ = [
    "GC_REASON",
    "Holders",
    "TriggerOutcome",
    "gone_reason",
    "heartbeats_seen",
    "no_longer_down",
    "reclaim_decision",
    "stopped_reason",
    "trigger_outcome",
]

_TERMINAL = {AllocClientStatus.COMPLETE, AllocClientStatus.FAILED, AllocClientStatus.LOST}


GC_REASON = "stopped: its allocation no longer exists (garbage-collected)"


def gone_reason(nomad: NomadAPI, alloc_id: str) -> str | None:
    """Why ``alloc_id`` needs no restart any more (stopped, replaced, garbage-collected), or None if it runs.

    A NomadError other than "not found" propagates: it proves nothing.
    """
    try:
        alloc = nomad.allocation(alloc_id)
    except NotFound:
        return GC_REASON
    return stopped_reason(alloc)


def stopped_reason(alloc: Allocation) -> str | None:
    """Why Nomad no longer runs ``alloc`` (stopped or replaced), or None while it does."""
    if alloc.desired_status in ("run", "") and alloc.client_status not in _TERMINAL:
        return None
    if alloc.next_allocation:
        return f"replaced: Nomad replaced its allocation by {alloc.next_allocation}"
    return f"stopped: its allocation is {alloc.client_status} (desired status {alloc.desired_status})"


def reclaim_decision(dead: Member, now: TaskState, *, triggered: bool) -> tuple[TaskState, bool]:
    """For a member reclaimed from ``dead``'s claim: the baseline its health is judged from, and
    whether to trigger it again.

    ``triggered``: the claim carried its trigger (method consul_key writes both in one
    transaction), so it is never triggered again. Otherwise (method nomad_api, whose restart
    call comes after the claim) it is triggered again unless ``now``, the task's state read
    after the reclaim, shows it restarted since the claim.
    """
    restarts = dead.restarts_before if dead.restarts_before is not None else now.restarts
    before = TaskState(state="running", restarts=restarts, started_at=dead.started_before)
    return before, not triggered and not restarted(before, now)


def no_longer_down(
    nomad: NomadAPI, gate: HealthGate, busy: Mapping[str, Member], task: str, services: Sequence[str]
) -> list[str]:
    """The failed members among ``busy`` that no longer count as down: healthy again, or gone."""
    return [
        alloc_id
        for alloc_id, m in busy.items()
        if m.state == MemberState.FAILED
        and (gone_reason(nomad, alloc_id) is not None or gate.healthy_now(alloc_id, task, services))
    ]


class TriggerOutcome(enum.Enum):
    """What a trigger that raised an error did."""

    NOT_APPLIED = "not applied"  # proven: the member can be given back
    MAY_HAVE_APPLIED = "may have applied"  # the health gate decides; never trigger it again


def trigger_outcome(error: Exception) -> TriggerOutcome:
    """Decide a failed restart call of method nomad_api (see the module docs)."""
    if isinstance(error, LockLost):
        return TriggerOutcome.NOT_APPLIED
    if isinstance(error, BackendError) and error.transient:
        # The restart call is not repeatable: only answers proving nothing applied are transient.
        return TriggerOutcome.NOT_APPLIED
    return TriggerOutcome.MAY_HAVE_APPLIED


class Holders:
    """Tells whether a ``restarting`` member's claim is still driven by someone.

    ``session`` is the caller's session: a member held under it is driven only while a
    coordinator of this process holds its claim token (:meth:`Session.holds`), since several
    coordinators may share one session. For any other session, a consistent session read decides.

    A session a read found alive counts as alive for half its TTL without another read, for every
    coordinator on the same Consul backend in the process: remembering "alive" can only delay a
    reclaim, never cause one, and it saves a session read per restart in flight on every step of
    every other coordinator. So does a session that holds an agent's heartbeat key in the last
    answer of the agent's watch on the heartbeat prefix (:func:`heartbeats_seen`): Consul releases
    a session's locks in the same write that invalidates it, so a key held by a session shows it
    alive at that answer's index, and the watch answers again as soon as it is released.
    """

    def __init__(self, consul: ConsulAPI, session: Session, *, clock: Clock = REAL_CLOCK) -> None:
        self._consul = consul
        self._clock = clock
        self.session = session
        self._alive = _seen_alive(consul)

    def wait_bound(self, member: Member) -> float | None:
        """Cluster seconds to wait for ``member``'s holder at most (its TTL); None: nobody drives it."""
        if member.session is None:
            return None
        if member.session == self.session.id:
            return self.session.ttl if self.session.holds(member.holder) else None
        local = live_here(self._consul, member.session)
        if local is not None:  # another worker of this process, alive: no read needed
            return local.ttl
        now = self._clock.monotonic()
        if self._alive.until(member.session) > now:
            return self.session.ttl
        info = self._consul.session_info(member.session)
        if info is None:
            return None
        ttl = info.ttl or self.session.ttl
        self._alive.seen(member.session, now + ttl / 2, now)
        return ttl


def heartbeats_seen(consul: ConsulAPI, sessions: Iterable[str], until: float) -> None:
    """The sessions holding heartbeat keys in the latest answer of a watch on the heartbeat prefix
    through ``consul``: alive for every :class:`Holders` on that backend until ``until`` (cluster
    monotonic time) or the watch's next answer, which replaces them (a session that is no longer
    in it is read again when it matters)."""
    _seen_alive(consul).heartbeats(set(sessions), until)


class _SeenAlive:
    """Sessions a consistent read found alive, and until when that is trusted (cluster monotonic time);
    and the sessions of the last heartbeat view, trusted until the view's bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}
        self._heartbeats: frozenset[str] = frozenset()
        self._heartbeats_until = 0.0

    def until(self, session_id: str) -> float:
        with self._lock:
            if session_id in self._heartbeats:
                return max(self._heartbeats_until, self._until.get(session_id, 0.0))
            return self._until.get(session_id, 0.0)

    def heartbeats(self, sessions: set[str], until: float) -> None:
        with self._lock:
            self._heartbeats, self._heartbeats_until = frozenset(sessions), until

    def seen(self, session_id: str, until: float, now: float) -> None:
        with self._lock:
            self._until = {k: v for k, v in self._until.items() if v > now}
            self._until[session_id] = until


_seen_alive = PerBackend(_SeenAlive)
