"""PlanStore: the CAS read-modify-write of plans, against an in-memory KV (no sockets)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

import pytest

from shepard_lib.clock import Clock
from shepard_lib.errors import ConsulError, LockLost, PlanError
from shepard_lib.model import KVEntry, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import (
    MemberSpec,
    MemberState,
    MemberUnavailable,
    Plan,
    PlanSettings,
    PlanStore,
    claim,
    finish,
    new_plan,
    register,
)

KEY = "shepard/locks/web/app/server/task_lock"
A = MemberSpec("alloc-a", "node-1", 0)
B = MemberSpec("alloc-b", "node-2", 1)
FAST = Clock(scale=10_000)


class MemoryKV:
    """The slice of ConsulAPI that PlanStore uses, with Consul's txn semantics and hooks to interfere.

    A txn is applied all or none at one new index, as Consul does: ``cas``, ``check-index``,
    ``check-session``, ``set`` and ``unlock`` are evaluated against the entries, and a refused
    txn reports every refused operation with its ``OpIndex`` and Consul's words. ``txns`` records
    the operations of every txn sent.
    """

    def __init__(self) -> None:
        self.entries: dict[str, KVEntry] = {}
        self.index = 10
        self.puts = 0
        self.gets = 0
        self.txns: list[list[TxnOp]] = []
        self.lose_answers = 0
        self.before_put: Callable[[], None] | None = None
        self.fail_puts = 0
        self.fail_gets: list[ConsulError] = []

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        self.gets += 1
        if self.fail_gets:
            raise self.fail_gets.pop(0)
        return self.entries.get(key)

    def write(self, key: str, value: bytes, *, session: str | None = None) -> None:
        """Another writer's change (``session``: the key is locked by it)."""
        self.index += 1
        old = self.entries.get(key)
        self.entries[key] = KVEntry(
            key, value, old.create_index if old else self.index, self.index, session=session
        )

    def txn(self, ops: list[TxnOp]) -> TxnResult:
        self.txns.append(list(ops))
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook()
        if self.fail_puts:
            self.fail_puts -= 1
            raise ConsulError("txn", "Internal Server Error", status=500, transient=True)
        self.puts += 1
        errors = tuple((number, why) for number, op in enumerate(ops) if (why := self.refusal(op)))
        if errors:
            return TxnResult(ok=False, errors=errors)
        self.index += 1
        for op in ops:
            old = self.entries.get(op.key)
            if op.verb in (TxnVerb.CAS, TxnVerb.SET, TxnVerb.UNLOCK):
                session = None if op.verb == TxnVerb.UNLOCK else (old.session if old else None)
                created = old.create_index if old else self.index
                self.entries[op.key] = KVEntry(op.key, op.value, created, self.index, session=session)
        if self.lose_answers:
            self.lose_answers -= 1
            raise ConsulError("txn", "connection reset after the write applied", transient=False)
        return TxnResult(ok=True, results=tuple(replace(self.entries[op.key], value=None) for op in ops))

    def refusal(self, op: TxnOp) -> str | None:
        """Why Consul refuses ``op`` as the entries are now (its words), or None."""
        entry = self.entries.get(op.key)
        index = entry.modify_index if entry else 0
        session = entry.session if entry else None
        if op.verb in (TxnVerb.CAS, TxnVerb.CHECK_INDEX) and index != op.index:
            return f'failed index check for key "{op.key}", current modify index {index} != {op.index}'
        if op.verb == TxnVerb.CHECK_SESSION and session != op.session:
            current = session or ""
            return f'failed session check for key "{op.key}", current session "{current}" != "{op.session}"'
        if op.verb == TxnVerb.UNLOCK and session != op.session:
            return f'failed to unlock key "{op.key}", lock isn\'t held, or is held by another session'
        return None

    def watch(
        self, key: str, index: int, wait: float, *, recurse: bool = False, cancel: object = None
    ) -> tuple[int, list[KVEntry]]:
        entry = self.entries.get(key)
        return self.index, [entry] if entry else []


def start(plan: Plan | None) -> Plan:
    base = plan or new_plan(
        "web", "app", "server", None, instance_count=2, settings=PlanSettings(2, 1), now=1.0
    )
    return register(base, [A], now=1.0)


def store(kv: MemoryKV, attempts: int = 30) -> PlanStore:
    return PlanStore(kv, clock=FAST, attempts=attempts)  # type: ignore[arg-type]


def claiming(alloc_id: str) -> Callable[[Plan | None], Plan]:
    """The update that claims ``alloc_id`` for holder ``h`` of session ``s`` at time 3."""

    def update(p: Plan | None) -> Plan:
        assert p is not None, "plan vanished"
        return claim(
            p,
            alloc_id,
            holder="h",
            session="s",
            holder_name="me",
            restarts_before=0,
            started_before=None,
            now=3.0,
        )

    return update


claim_a = claiming(A.alloc_id)


def test_update_creates_the_plan_with_cas_zero() -> None:
    kv = MemoryKV()
    plan = store(kv).update(KEY, start)
    assert Plan.decode(kv.entries[KEY].value) == plan
    assert list(plan.members) == [A.alloc_id]


def test_update_retries_on_a_cas_conflict_and_keeps_the_other_writers_change() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)

    def concurrent_writer() -> None:
        current = Plan.decode(kv.entries[KEY].value)
        kv.write(KEY, register(current, [B], now=2.0).encode())

    kv.before_put = concurrent_writer
    plan = plans.update(KEY, claim_a)
    assert set(plan.members) == {A.alloc_id, B.alloc_id}
    assert Plan.decode(kv.entries[KEY].value) == plan


def test_unchanged_plan_is_not_written() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    puts = kv.puts
    plans.update(KEY, lambda p: register(p, [A], now=5.0) if p else pytest.fail("no plan"))
    assert kv.puts == puts


def test_refused_transition_writes_nothing_and_propagates() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    puts = kv.puts
    with pytest.raises(MemberUnavailable):
        plans.update(KEY, claiming("alloc-unknown"))
    assert kv.puts == puts


def test_corrupt_value_is_logged_with_its_key_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    kv = MemoryKV()
    kv.write(KEY, b"locked by the old Go shepard")
    with caplog.at_level(logging.WARNING, logger="shepard_lib.plan"):
        plan = store(kv).update(KEY, start)
    assert Plan.decode(kv.entries[KEY].value) == plan
    assert KEY in caplog.text
    assert "corrupt or foreign" in caplog.text


def test_transient_consul_errors_are_retried() -> None:
    kv = MemoryKV()
    kv.fail_puts = 3
    plan = store(kv).update(KEY, start)
    assert Plan.decode(kv.entries[KEY].value) == plan


def test_persistent_consul_errors_give_up_with_a_plan_error_naming_the_key() -> None:
    kv = MemoryKV()
    kv.fail_puts = 100
    with pytest.raises(PlanError, match=f"plan {KEY}: Consul kept failing"):
        store(kv, attempts=4).update(KEY, start)


def test_endless_cas_conflicts_give_up_after_the_attempts() -> None:
    kv = MemoryKV()
    plans = store(kv, attempts=5)
    plans.update(KEY, start)

    def always_conflict(p: Plan | None) -> Plan:
        assert p is not None
        kv.write(KEY, p.encode())  # someone else always writes between our read and our put
        return register(p, [B], now=9.0)

    with pytest.raises(PlanError, match="won the CAS race"):
        plans.update(KEY, always_conflict)


def test_an_update_after_a_write_starts_from_the_written_plan_without_a_read() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    gets, puts = kv.gets, kv.puts
    plan = plans.update(KEY, claim_a)
    assert (kv.gets, kv.puts) == (gets, puts + 1), "one CAS write, no read"
    assert Plan.decode(kv.entries[KEY].value) == plan


def test_another_store_on_the_same_backend_shares_what_is_known() -> None:
    kv = MemoryKV()
    store(kv).update(KEY, start)
    gets = kv.gets
    store(kv).update(KEY, claim_a)
    assert kv.gets == gets


def test_a_refusal_on_a_stale_known_plan_is_decided_again_on_a_fresh_read() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    current = Plan.decode(kv.entries[KEY].value)
    kv.write(KEY, register(current, [B], now=2.0).encode())  # another writer; the known plan lacks B
    gets = kv.gets
    plan = plans.update(KEY, claiming(B.alloc_id))
    assert kv.gets == gets + 1
    assert plan.members[B.alloc_id].holder == "h"


def test_a_write_whose_answer_was_lost_but_applied_is_not_written_again() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    kv.lose_answers = 1
    puts = kv.puts
    plan = plans.update(KEY, claim_a)
    assert kv.puts == puts + 1, "the applied write was recognised on the next read"
    assert Plan.decode(kv.entries[KEY].value) == plan


# --- ops sent with the plan (section 4, steps 5 and 8) -----------------------------------------

SLOT = "shepard/locks/web/app/server/restart_lock/0"
TRIGGER = "shepard/keys/node-1/web/app/server/0"


def claiming_at(alloc_id: str, holder: str = "h") -> Callable[[Plan | None, int], Plan]:
    """The claim of ``alloc_id`` by ``holder``, applied at the index the store passes."""

    def update(p: Plan | None, index: int) -> Plan:
        assert p is not None, "plan vanished"
        return claim(
            p,
            alloc_id,
            holder=holder,
            session="s",
            holder_name=f"worker {holder}",
            restarts_before=0,
            started_before=None,
            now=3.0,
            index=index,
        )

    return update


def trigger_ops(kv: MemoryKV) -> list[TxnOp]:
    """Slot 0 locked by session ``s`` now; the claim's fence on that acquisition and its trigger."""
    kv.write(SLOT, b"", session="s")
    return [
        TxnOp(TxnVerb.CHECK_SESSION, SLOT, session="s"),
        TxnOp(TxnVerb.CHECK_INDEX, SLOT, index=kv.index),
        TxnOp(TxnVerb.SET, TRIGGER, value=b"fresh"),
    ]


def cas(plan: Plan, index: int) -> TxnOp:
    return TxnOp(TxnVerb.CAS, KEY, value=plan.encode(), index=index)


def test_the_ops_are_sent_after_the_plans_cas_in_the_same_txn() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    index = kv.entries[KEY].modify_index
    ops = trigger_ops(kv)
    plan = plans.update_at(KEY, claiming_at(A.alloc_id), ops=ops)
    assert kv.txns[-1] == [cas(plan, index), *ops]
    assert (kv.entries[KEY].value, kv.entries[TRIGGER].value) == (plan.encode(), b"fresh")
    assert kv.entries[KEY].modify_index == kv.entries[TRIGGER].modify_index, "one txn"


def test_the_index_passed_to_the_change_is_the_one_the_write_is_based_on() -> None:
    kv = MemoryKV()
    kv.write(KEY, start(None).encode())  # written by another process: nothing known here
    plans = store(kv)
    read_at = kv.index
    plan = plans.update_at(KEY, claiming_at(A.alloc_id))
    assert plan.members[A.alloc_id].claim_index == read_at
    assert kv.txns[-1] == [cas(plan, read_at)]
    written_at = kv.index
    plan = plans.update_at(KEY, lambda p, index: register(p, [B], now=4.0, index=index))  # from what is known
    assert kv.gets == 1
    assert kv.txns[-1] == [cas(plan, written_at)]


def test_a_refused_fence_raises_lock_lost_with_consuls_reasons_and_writes_nothing() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    before = kv.entries[KEY]
    ops = trigger_ops(kv)
    kv.write(SLOT, b"", session="s2")  # the slot was lost and taken by another session
    with pytest.raises(LockLost) as lost:
        plans.update_at(KEY, claiming_at(A.alloc_id), ops=ops)
    assert str(lost.value) == (
        f"plan {KEY} not written: "
        f'failed session check for key "{SLOT}", current session "s2" != "s"; '
        f'failed index check for key "{SLOT}", current modify index {kv.index} != {kv.index - 1}'
    )
    assert len(kv.txns) == 2, "not retried"
    assert kv.entries[KEY] == before
    assert TRIGGER not in kv.entries


def test_a_finish_whose_unlock_is_refused_raises_lock_lost_and_can_then_be_written_alone() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    plans.update_at(KEY, claiming_at(A.alloc_id), ops=trigger_ops(kv))
    kv.write(SLOT, b"", session=None)  # the session ended: Consul released the slot
    unlock = TxnOp(TxnVerb.UNLOCK, SLOT, value=b"", session="s")
    claimed_plan = kv.entries[KEY]

    def done(p: Plan | None) -> Plan:
        assert p is not None
        return finish(p, A.alloc_id, holder="h", ok=True, now=9.0)

    with pytest.raises(LockLost) as lost:
        plans.update_at(KEY, lambda p, _index: done(p), ops=[unlock])
    assert str(lost.value) == (
        f'plan {KEY} not written: failed to unlock key "{SLOT}", '
        "lock isn't held, or is held by another session"
    )
    assert kv.entries[KEY] == claimed_plan
    txns = len(kv.txns)
    plan = plans.update(KEY, done)
    assert plan.members[A.alloc_id].state == MemberState.DONE
    assert len(kv.txns) == txns + 1


def test_a_refused_cas_alone_is_a_conflict_read_again_and_retried_with_the_same_ops() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    ops = trigger_ops(kv)

    def concurrent_writer() -> None:
        kv.write(KEY, register(Plan.decode(kv.entries[KEY].value), [B], now=2.0).encode())

    kv.before_put = concurrent_writer
    txns, gets = len(kv.txns), kv.gets
    plan = plans.update_at(KEY, claiming_at(A.alloc_id), ops=ops)
    other_at = kv.entries[KEY].modify_index - 1  # our txn came right after the other writer's
    assert set(plan.members) == {A.alloc_id, B.alloc_id}
    assert plan.members[A.alloc_id].claim_index == other_at
    assert [t[1:] for t in kv.txns[txns:]] == [ops, ops]
    assert kv.txns[-1][0] == cas(plan, other_at)
    assert kv.gets == gets + 1
    assert kv.entries[TRIGGER].value == b"fresh"


def test_a_refused_cas_with_a_refused_fence_is_lock_lost_naming_only_the_fence() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    ops = [TxnOp(TxnVerb.CHECK_INDEX, SLOT, index=trigger_ops(kv)[1].index)]

    def slot_lost_and_plan_moved() -> None:
        kv.write(SLOT, b"", session="s2")
        kv.write(KEY, register(Plan.decode(kv.entries[KEY].value), [B], now=2.0).encode())

    kv.before_put = slot_lost_and_plan_moved
    txns = len(kv.txns)
    with pytest.raises(LockLost) as lost:
        plans.update_at(KEY, claiming_at(A.alloc_id), ops=ops)
    slot_at = kv.entries[SLOT].modify_index
    assert str(lost.value) == (
        f'plan {KEY} not written: failed index check for key "{SLOT}", '
        f"current modify index {slot_at} != {ops[0].index}"
    )
    assert len(kv.txns) == txns + 1, "not retried"
    assert Plan.decode(kv.entries[KEY].value).members[A.alloc_id].state == MemberState.PENDING


def test_the_retry_after_a_lost_answer_sends_the_same_ops_on_the_same_cas_index() -> None:
    """Of the two txns at most one can ever apply, however late the first arrives."""
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    index = kv.entries[KEY].modify_index
    ops = trigger_ops(kv)
    kv.fail_puts = 1  # a 500: the first txn did not apply
    txns = len(kv.txns)
    plan = plans.update_at(KEY, claiming_at(A.alloc_id), ops=ops)
    assert kv.txns[txns:] == [[cas(plan, index), *ops], [cas(plan, index), *ops]]
    assert Plan.decode(kv.entries[KEY].value) == plan


def test_a_lost_answer_whose_write_applied_is_taken_as_done_without_deciding_again() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    ops = trigger_ops(kv)
    decided: list[int] = []

    def bump(p: Plan | None, index: int) -> Plan:
        """A change that is not idempotent: applied twice, it would write twice."""
        assert p is not None
        decided.append(index)
        return replace(p, updated_at=p.updated_at + 1)

    kv.lose_answers = 1
    txns, gets = len(kv.txns), kv.gets
    plan = plans.update_at(KEY, bump, ops=ops)
    assert (len(decided), len(kv.txns), kv.gets) == (1, txns + 1, gets + 1)
    assert plan.updated_at == 2.0
    assert Plan.decode(kv.entries[KEY].value) == plan


def test_a_lost_answer_whose_write_did_not_apply_is_decided_again_on_what_is_there() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    ops = trigger_ops(kv)
    theirs: list[bytes] = []

    def another_claim() -> None:
        current = Plan.decode(kv.entries[KEY].value)
        theirs.append(claiming_at(A.alloc_id, holder="h2")(current, kv.entries[KEY].modify_index).encode())
        kv.write(KEY, theirs[0])

    kv.before_put, kv.fail_puts = another_claim, 1  # another coordinator claims A; our txn gets a 500
    with pytest.raises(MemberUnavailable) as refused:
        plans.update_at(KEY, claiming_at(A.alloc_id), ops=ops)
    assert (refused.value.alloc_id, refused.value.reason) == (A.alloc_id, "restarting, held by worker h2")
    assert kv.entries[KEY].value == theirs[0]
    assert TRIGGER not in kv.entries


# --- errors, and what is known after a write --------------------------------------------------


def test_a_write_error_that_proves_nothing_applied_propagates_at_once() -> None:
    kv = MemoryKV()
    plans = store(kv)
    plans.update(KEY, start)
    before, txns = kv.entries[KEY], len(kv.txns)

    def denied() -> None:
        raise ConsulError("txn", "Permission denied", status=403)

    kv.before_put = denied
    with pytest.raises(ConsulError, match="Permission denied"):
        plans.update(KEY, claim_a)
    assert (len(kv.txns), kv.entries[KEY]) == (txns + 1, before)


def test_a_read_error_propagates_unless_it_is_transient() -> None:
    kv = MemoryKV()
    kv.fail_gets = [ConsulError(f"kv.get {KEY}", "Permission denied", status=403)]
    with pytest.raises(ConsulError, match="Permission denied"):
        store(kv).update(KEY, start)
    assert (kv.gets, kv.txns) == (1, [])
    kv.fail_gets = [ConsulError(f"kv.get {KEY}", "No cluster leader", status=500, transient=True)]
    plan = store(kv).update(KEY, start)
    assert kv.gets == 3
    assert Plan.decode(kv.entries[KEY].value) == plan


def test_reads_that_keep_failing_give_up_naming_the_last_consul_error() -> None:
    kv = MemoryKV()
    errors = [ConsulError(f"kv.get {KEY}", "No cluster leader", status=500, transient=True) for _ in range(3)]
    kv.fail_gets = list(errors)
    with pytest.raises(PlanError) as gave_up:
        store(kv, attempts=3).update(KEY, start)
    assert str(gave_up.value) == f"plan {KEY}: Consul kept failing ({errors[-1]}); giving up after 3 attempts"
    assert gave_up.value.__cause__ is errors[-1]
    assert kv.txns == []


def test_attempts_spent_on_stale_known_plans_give_up_as_a_race_not_a_consul_failure() -> None:
    kv = MemoryKV()
    plans = store(kv, attempts=1)
    plans.update(KEY, start)
    kv.write(KEY, register(Plan.decode(kv.entries[KEY].value), [B], now=2.0).encode())  # not seen here
    with pytest.raises(PlanError) as gave_up:
        plans.update(KEY, claiming(B.alloc_id))  # refused on the known plan, which lacks B
    assert str(gave_up.value) == f"plan {KEY}: 1 concurrent updates in a row won the CAS race; giving up"


class NoResultsKV(MemoryKV):
    """A Consul whose accepted txn answer carries no results (so no new ModifyIndex)."""

    def txn(self, ops: list[TxnOp]) -> TxnResult:
        result = super().txn(ops)
        return replace(result, results=()) if result.ok else result


def test_a_write_answered_without_its_index_is_not_remembered() -> None:
    kv = NoResultsKV()
    kv.write(KEY, start(None).encode())
    plans = store(kv)
    plans.read(KEY)
    plan = plans.update(KEY, claim_a)
    assert Plan.decode(kv.entries[KEY].value) == plan
    gets, txns = kv.gets, len(kv.txns)
    plan = plans.update(KEY, lambda p: register(p, [B], now=4.0) if p else pytest.fail("no plan"))
    assert (kv.gets, len(kv.txns)) == (gets + 1, txns + 1), "one read, one accepted write"
    assert plan.members[A.alloc_id].holder == "h"


def test_a_writer_of_one_key_never_waits_for_a_writer_of_another() -> None:
    kv = MemoryKV()
    plans = store(kv)
    entered, release, other_done = threading.Event(), threading.Event(), threading.Event()

    def slow_start(p: Plan | None) -> Plan:
        entered.set()
        release.wait(60)
        return start(p)

    first = threading.Thread(target=plans.update, args=(KEY, slow_start))
    second = threading.Thread(target=lambda: (plans.update(KEY + "-other", start), other_done.set()))
    first.start()
    try:
        assert entered.wait(30)
        second.start()
        assert other_done.wait(30), "the writer of another key waited for this one"
    finally:
        release.set()
        first.join(30)
        second.join(30)
    assert {KEY, KEY + "-other"} <= set(kv.entries)
