"""PlanStore: the CAS read-modify-write of plans, against an in-memory KV (no sockets)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from shepard_lib.clock import Clock
from shepard_lib.errors import ConsulError, PlanError
from shepard_lib.model import KVEntry, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import (
    MemberSpec,
    MemberUnavailable,
    Plan,
    PlanSettings,
    PlanStore,
    claim,
    new_plan,
    register,
)

KEY = "shepard/locks/web/app/server/task_lock"
A = MemberSpec("alloc-a", "node-1", 0)
B = MemberSpec("alloc-b", "node-2", 1)
FAST = Clock(scale=10_000)


class MemoryKV:
    """The slice of ConsulAPI that PlanStore uses, with CAS semantics and hooks to interfere."""

    def __init__(self) -> None:
        self.entries: dict[str, KVEntry] = {}
        self.index = 10
        self.puts = 0
        self.gets = 0
        self.lose_answers = 0
        self.before_put: Callable[[], None] | None = None
        self.fail_puts = 0

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        self.gets += 1
        return self.entries.get(key)

    def write(self, key: str, value: bytes) -> None:
        self.index += 1
        old = self.entries.get(key)
        self.entries[key] = KVEntry(key, value, old.create_index if old else self.index, self.index)

    def put(self, key: str, value: bytes | str, *, cas: int | None = None, flags: int | None = None) -> bool:
        if self.fail_puts:
            self.fail_puts -= 1
            raise ConsulError(f"kv.put {key}", "Internal Server Error", status=500, transient=True)
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook()
        self.puts += 1
        current = self.entries.get(key)
        if cas is not None and (current.modify_index if current else 0) != cas:
            return False
        self.write(key, value.encode() if isinstance(value, str) else value)
        return True

    def txn(self, ops: list[TxnOp]) -> TxnResult:
        """A one-operation ``cas`` txn, as PlanStore writes: the same hooks as ``put``."""
        [op] = ops
        assert op.verb == TxnVerb.CAS and op.value is not None and op.index is not None
        if not self.put(op.key, op.value, cas=op.index):
            return TxnResult(ok=False, errors=((0, f'failed index check for key "{op.key}"'),))
        if self.lose_answers:
            self.lose_answers -= 1
            raise ConsulError(f"txn {op.key}", "connection reset after the write applied", transient=False)
        entry = self.entries[op.key]
        return TxnResult(ok=True, results=(KVEntry(op.key, None, entry.create_index, entry.modify_index),))

    def watch(self, key: str, index: int, wait: float, *, recurse: bool = False) -> tuple[int, list[KVEntry]]:
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
