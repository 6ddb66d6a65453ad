"""Recovery in the restart flow: what the happy path of :mod:`shepard_lib.coordinator` hands off.

What can leave a member's restart in doubt is decided here from facts Consul or Nomad answer,
never from elapsed time or clocks:

- **An ambiguous trigger write** (:func:`trigger_outcome`). The answer of the fenced trigger txn
  was lost: Consul may still apply it later (a Raft apply can outlast the client's timeout). An
  answer that proves nothing was applied (429, 503, "No cluster leader", a request never sent)
  settles it at once. Otherwise the slot is *bumped* first (re-acquired, so its ModifyIndex, the
  fencing token the txn checks, moves): from then on the lost txn can never apply, and only then
  does an unmoved trigger key prove that it did not.
- **An allocation Nomad stopped, replaced or forgot** (:func:`gone_reason`): such a member is
  skipped, never failed; a replacement Nomad placed after the change was seen already renders the
  new config and is not restarted.
- **A member left ``restarting``** whose claim nobody drives any more (:class:`Holders`): its
  holder's session is gone (a consistent read says so), or the holder token is not held by any
  coordinator of this process although the member is under this process's session; whoever
  reclaims it triggers again only if the claim's trigger provably never applied
  (:func:`reclaim_decision`);
- **A failed member that no longer counts as down** (:func:`no_longer_down`): its task is
  healthy again, or its allocation is gone.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.errors import BackendError, LockLost, NotFound
from shepard_lib.health import HealthGate, restarted
from shepard_lib.locks import RestartSlots, Slot
from shepard_lib.model import Allocation, AllocClientStatus, TaskState
from shepard_lib.plan import Member, MemberState
from shepard_lib.session import Session

__all__ = [
    "GC_REASON",
    "Holders",
    "TriggerOutcome",
    "gone_reason",
    "no_longer_down",
    "reclaim_decision",
    "settle_with_new_token",
    "stopped_reason",
    "trigger_outcome",
]

log = logging.getLogger(__name__)

_TERMINAL = {AllocClientStatus.COMPLETE, AllocClientStatus.FAILED, AllocClientStatus.LOST}
SETTLE_ATTEMPTS = 3
"""Tries of the bump and of the trigger-key read when deciding an ambiguous trigger."""


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


def reclaim_decision(dead: Member, now: TaskState, trigger_index: int | None) -> tuple[TaskState, bool]:
    """For a member reclaimed from ``dead``'s claim: the baseline its health is judged from, and
    whether to trigger it again.

    The dead claim's slot acquisition ended with its session (or, for one of this process, with
    that slot's release or bump), so its trigger can no longer land: a trigger key that moved
    since the claim was written, one that did not never will be. ``now`` is the task's state and
    ``trigger_index`` the trigger key's ModifyIndex read after the reclaim.
    """
    restarts = dead.restarts_before if dead.restarts_before is not None else now.restarts
    before = TaskState(state="running", restarts=restarts, started_at=dead.started_before)
    written = dead.trigger_index is not None and trigger_index != dead.trigger_index
    return before, not written and not restarted(before, now)


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


def trigger_outcome(
    error: Exception,
    *,
    slots: RestartSlots,
    slot: Slot,
    trigger_index: int | None,
    read_trigger_index: Callable[[], int | None],
) -> tuple[TriggerOutcome, Slot | None]:
    """Decide a trigger ``error``; returns the outcome and the slot to go on with (None: not held).

    ``trigger_index`` is the trigger key's ModifyIndex read before the claim (None for method
    nomad_api, whose restart cannot be disproved), ``read_trigger_index`` a callable reading it now.
    """
    if isinstance(error, LockLost):
        return TriggerOutcome.NOT_APPLIED, slot
    if isinstance(error, BackendError) and error.transient:
        # The trigger calls are not repeatable: only answers proving nothing applied are transient.
        return TriggerOutcome.NOT_APPLIED, slot
    if trigger_index is None:
        return TriggerOutcome.MAY_HAVE_APPLIED, slot
    return settle_with_new_token(slots, slot, trigger_index, read_trigger_index)


def settle_with_new_token(
    slots: RestartSlots,
    slot: Slot,
    trigger_index: int,
    read_trigger_index: Callable[[], int | None],
) -> tuple[TriggerOutcome, Slot | None]:
    """Bump ``slot`` so no trigger fenced by its old token can apply, then read the trigger key.

    Once the token moved the answer is final, so both steps are tried a few times. Returns
    NOT_APPLIED only when the token moved and the trigger key still has ``trigger_index``.
    """
    current: Slot | None = slot
    for attempt in range(1, SETTLE_ATTEMPTS + 1):
        try:
            current = slots.bump(slot)
            break
        except BackendError as exc:
            log.warning("could not move the fencing token of %s (attempt %d): %s", slot.key, attempt, exc)
    else:
        return TriggerOutcome.MAY_HAVE_APPLIED, slot
    for _ in range(SETTLE_ATTEMPTS):
        try:
            moved = read_trigger_index() != trigger_index
        except BackendError:
            continue
        return (TriggerOutcome.MAY_HAVE_APPLIED if moved else TriggerOutcome.NOT_APPLIED), current
    return TriggerOutcome.MAY_HAVE_APPLIED, current


class Holders:
    """Tells whether a ``restarting`` member's claim is still driven by someone.

    ``session`` is the caller's session: a member held under it is driven only while a
    coordinator of this process holds its claim token (:meth:`Session.holds`), since several
    coordinators may share one session. For any other session, a consistent session read decides.
    """

    def __init__(self, consul: ConsulAPI, session: Session) -> None:
        self._consul = consul
        self.session = session

    def wait_bound(self, member: Member) -> float | None:
        """Cluster seconds to wait for ``member``'s holder at most (its TTL); None: nobody drives it."""
        if member.session is None:
            return None
        if member.session == self.session.id:
            return self.session.ttl if self.session.holds(member.holder) else None
        info = self._consul.session_info(member.session)
        if info is None:
            return None
        return info.ttl or self.session.ttl
