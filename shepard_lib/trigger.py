"""Restart one task, fenced by the restart slot its caller holds.

Two methods (``restart_method`` in the configuration):

- ``consul_key`` (the seed's): write a fresh random value to the task's trigger key; the task's
  ``shepard.tpl`` template reads that key, so Nomad re-renders it and restarts the task
  (``change_mode = "restart"``). The write is one Consul transaction of ``check-session`` and
  ``check-index`` on the slot key plus ``set`` of the trigger key: Consul applies it only while the
  slot is held by the caller's session *and* by the same acquisition (the slot's ModifyIndex is
  the fencing token, :attr:`~shepard_lib.locks.Slot.index`), so neither a holder that lost its slot
  nor a write of an earlier acquisition applied late can restart anything.
- ``nomad_api``: ``POST /v1/client/allocation/<id>/restart`` with the task name, after a
  consistent read shows the slot still held by the caller's acquisition (session and index).
  Nomad cannot check a Consul lock, so this fence has a gap of one request between the check
  and the restart; ``consul_key`` has none.
"""

from __future__ import annotations

import logging
import secrets

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.config import RestartMethod
from shepard_lib.errors import LockLost
from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.locks import Slot
from shepard_lib.model import TxnOp, TxnVerb

log = logging.getLogger(__name__)


def describe(ref: TaskRef) -> str:
    """``node/job/group/task[alloc_index]``: how a task is named in logs and messages."""
    return f"{ref.node}/{ref.job}/{ref.group}/{ref.task}[{ref.alloc_index}]"


class Trigger:
    """Restarts a task by ``method``, only while the caller holds its restart slot."""

    def __init__(self, consul: ConsulAPI, nomad: NomadAPI, keyspace: Keyspace, method: RestartMethod) -> None:
        self._consul = consul
        self._nomad = nomad
        self._keyspace = keyspace
        self.method = RestartMethod(method)

    def __repr__(self) -> str:
        return f"Trigger(method={self.method.value!r})"

    def fire(self, ref: TaskRef, alloc_id: str, slot: Slot) -> None:
        """Restart task ``ref`` of allocation ``alloc_id``; raise LockLost if ``slot`` is no longer held.

        When LockLost is raised nothing was written and nothing was restarted. A
        :class:`~shepard_lib.errors.BackendError` with ``transient`` set proves the same (these calls
        are not repeatable, so only answers that say nothing was applied are transient: 429, 503,
        "No cluster leader", a request never sent); any other BackendError leaves it unknown.
        """
        if slot.lost.is_set():
            raise LockLost(
                f"restart of {describe(ref)} not triggered: the session holding {slot.key} is lost"
            )
        if self.method is RestartMethod.CONSUL_KEY:
            self._write_trigger_key(ref, slot)
        else:
            self._restart_through_nomad(ref, alloc_id, slot)

    def ops(self, ref: TaskRef, slot: Slot) -> list[TxnOp]:
        """Method consul_key's restart as txn ops, fenced by ``slot``: ``check-session`` and
        ``check-index`` on the slot key, then ``set`` of a fresh value on the trigger key.

        The coordinator sends them in the claim's transaction, so a claimed member was triggered.
        """
        return [
            TxnOp(TxnVerb.CHECK_SESSION, slot.key, session=slot.session_id),
            TxnOp(TxnVerb.CHECK_INDEX, slot.key, index=slot.index),
            TxnOp(TxnVerb.SET, self._keyspace.trigger_key(ref), value=secrets.token_hex(16).encode("ascii")),
        ]

    def _write_trigger_key(self, ref: TaskRef, slot: Slot) -> None:
        result = self._consul.txn(self.ops(ref, slot))
        if not result.ok:
            reasons = "; ".join(what for _, what in result.errors) or "transaction rolled back"
            raise LockLost(
                f"restart of {describe(ref)} not triggered: {slot.key} is no longer held by this acquisition "
                f"({reasons})"
            )
        log.info(
            "%s: restart triggered through %s (fenced by %s)",
            describe(ref),
            self._keyspace.trigger_key(ref),
            slot.key,
        )

    def _restart_through_nomad(self, ref: TaskRef, alloc_id: str, slot: Slot) -> None:
        entry = self._consul.get(slot.key, consistent=True)
        if entry is None or entry.session != slot.session_id or entry.modify_index != slot.index:
            raise LockLost(
                f"restart of {describe(ref)} not requested: {slot.key} is no longer held by this session"
            )
        self._nomad.restart_task(alloc_id, ref.task)
        log.info(
            "%s: restart of allocation %s requested from Nomad (slot %s)", describe(ref), alloc_id, slot.key
        )
