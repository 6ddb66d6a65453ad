"""Lock and RestartSlots against the Consul sim over HTTP.

Sim-only: these tests need the sim's time scale, its request counts (``/_sim/requests``) and its
in-process state.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import requests
from support import Background

from shepard_lib.backends.consul import ConsulBackend, RetryPolicy
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig
from shepard_lib.errors import ConsulError, LockLost, LockTimeout
from shepard_lib.locks import Lock, RestartSlots, Slot, SlotNotNeeded
from shepard_lib.model import KVEntry, SessionBehavior, TxnOp, TxnResult, TxnVerb
from shepard_lib.session import Session
from shepard_lib.sim.consul import ConsulServer, ConsulState

SCALE = 50.0
TTL = 10.0  # Consul's minimum TTL, for the tests about expiry
LONG_TTL = 60.0  # elsewhere: renewals of many sessions on a busy machine must not be late by ttl/2


@dataclass
class Sim:
    clock: Clock
    server: ConsulServer
    consul: ConsulBackend

    def session(self, name: str, *, ttl: float = LONG_TTL, lock_delay: float = 15.0) -> Session:
        return Session(self.consul, name, ttl=ttl, lock_delay=lock_delay, clock=self.clock)

    def kv_requests(self) -> dict[str, int]:
        """Counts of ``/v1/kv`` requests by method since the last reset, from ``/_sim/requests``."""
        counts = requests.get(f"{self.server.address}/_sim/requests", timeout=5).json()
        return dict(counts.get("/v1/kv", {}))

    def txn_requests(self) -> int:
        """``PUT /v1/txn`` requests since the last reset (a slot is taken with a txn ``lock``)."""
        counts = requests.get(f"{self.server.address}/_sim/requests", timeout=5).json()
        return int(counts.get("/v1/txn", {}).get("PUT", 0))

    def reset_requests(self) -> None:
        requests.delete(f"{self.server.address}/_sim/requests", timeout=5).raise_for_status()

    def until_kv_gets(self, n: int) -> None:
        """Wait until ``n`` KV reads were made since the last reset."""
        self.until(f"{n} KV reads", lambda: self.kv_requests().get("GET") == n)

    def until(self, what: str, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Test-side wait (real seconds) for something the code under test does."""
        deadline = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.005)


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sim]:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    clock = Clock(scale=SCALE)
    server = ConsulServer(ConsulState(clock)).start()
    consul = ConsulBackend(ConsulConfig(address=server.address), clock, retry=RetryPolicy(attempts=2))
    try:
        yield Sim(clock, server, consul)
    finally:
        consul.close()
        server.stop()


# --- Lock ----------------------------------------------------------------------------------------


def test_lock_is_exclusive_and_the_context_manager_releases_it(sim: Sim) -> None:
    with sim.session("a") as a, sim.session("b") as b:
        with Lock(sim.consul, "t/mutex", a, value="owner a", timeout=0, clock=sim.clock) as lock:
            assert lock.held
            entry = sim.consul.get("t/mutex", consistent=True)
            assert entry is not None and entry.session == a.id and entry.text() == "owner a"
            with pytest.raises(LockTimeout, match="t/mutex"):
                Lock(sim.consul, "t/mutex", b, clock=sim.clock).acquire(timeout=0)
        assert not lock.held
        lock.release()  # idempotent
        # An explicit release hands the lock over without lock-delay.
        Lock(sim.consul, "t/mutex", b, clock=sim.clock).acquire(timeout=0)


def test_lock_waiter_takes_the_lock_as_soon_as_it_is_released(sim: Sim) -> None:
    with sim.session("a") as a, sim.session("b") as b:
        first = Lock(sim.consul, "t/handover", a, clock=sim.clock)
        first.acquire(timeout=0)
        second = Lock(sim.consul, "t/handover", b, clock=sim.clock, max_wait=10_000)
        call = Background(lambda: second.acquire(timeout=1_000))
        sim.clock.sleep(5)
        assert call.thread.is_alive() and not second.held
        released = sim.clock.monotonic()
        first.release()
        call.join()
        assert call.error is None, call.error
        assert second.held
        assert sim.clock.monotonic() - released <= 4, "the waiter did not wake on the release"


def test_lock_held_turns_false_when_the_session_is_lost(sim: Sim) -> None:
    with sim.session("doomed") as session:
        lock = Lock(sim.consul, "t/doomed", session, clock=sim.clock)
        lock.acquire(timeout=0)
        sim.consul.session_destroy(session.id)
        assert sim.clock.wait(lock.lost, LONG_TTL)
        assert not lock.held


def test_acquire_with_a_session_consul_no_longer_knows_raises_lock_lost(sim: Sim) -> None:
    with sim.session("gone") as session:
        sim.consul.session_destroy(session.id)  # before the next renew could notice
        with pytest.raises(LockLost, match="gone"):
            Lock(sim.consul, "t/gone", session, clock=sim.clock).acquire(timeout=0)
        assert session.lost.is_set()


# --- RestartSlots -------------------------------------------------------------------------------


def test_slot_value_names_holder_session_and_time_and_holders_reads_it(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/value/restart_lock", 3, clock=sim.clock)
    with sim.session("a") as a, sim.session("b") as b:
        asked_at = sim.clock.time()
        first = slots.acquire(a, holder="web-01 alloc 1")
        assert asked_at <= first.acquired_at <= sim.clock.time()
        second = slots.acquire(b, holder="web-02 alloc 2")
        assert first.number != second.number and {first.number, second.number} <= {0, 1, 2}
        assert first.key == f"t/value/restart_lock/{first.number}"
        entry = sim.consul.get(first.key, consistent=True)
        assert entry is not None and entry.session == a.id
        assert json.loads(entry.text()) == {
            "holder": "web-01 alloc 1",
            "session": a.id,
            "acquired_at": first.acquired_at,
        }
        assert first.lost is a.lost and first.holder == "web-01 alloc 1"
        assert slots.holders() == {first.number: "web-01 alloc 1", second.number: "web-02 alloc 2"}
        slots.release(first)
        slots.release(first)  # idempotent
        assert slots.holders() == {second.number: "web-02 alloc 2"}
        with slots.hold(a, holder="web-03") as third:
            assert third.number == first.number, "a session tries the slot it held last first"
        assert slots.holders() == {second.number: "web-02 alloc 2"}


def test_contending_threads_never_exceed_the_slot_count(sim: Sim) -> None:
    size, workers, rounds = 2, 6, 4
    slots = RestartSlots(sim.consul, "t/contend/restart_lock/", size, clock=sim.clock)
    guard = threading.Lock()
    inside: list[int] = []
    peak = 0
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        nonlocal peak
        try:
            with sim.session(f"worker-{n}") as session:
                for r in range(rounds):
                    with slots.hold(session, holder=f"worker-{n} round {r}", timeout=300) as slot:
                        with guard:
                            inside.append(slot.number)
                            peak = max(peak, len(inside))
                            assert len(inside) <= size, f"{len(inside)} holders of {size} slots"
                            assert len(set(inside)) == len(inside), f"slot held twice: {inside}"
                        assert len(slots.holders()) <= size
                        sim.clock.sleep(1.0)
                        with guard:
                            inside.remove(slot.number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert peak == size, f"peak {peak}: the slots were never all used"
    assert slots.holders() == {}


def test_holders_sharing_one_session_neither_share_a_slot_nor_free_each_others(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/shared/restart_lock/", 1, clock=sim.clock, max_wait=5)
    with sim.session("shared") as session:
        first = slots.acquire(session, holder="thread 1")
        # Consul itself would answer this acquire with true: the session already holds the key.
        with pytest.raises(LockTimeout):
            slots.acquire(session, holder="thread 2", timeout=2)
        call = Background(lambda: slots.acquire(session, holder="thread 2", timeout=100))
        sim.clock.sleep(2)
        assert call.thread.is_alive(), "a second holder with the same session got the only slot"
        slots.release(first)
        call.join()
        second = call.result
        assert isinstance(second, Slot) and second.number == 0
        slots.release(first)  # a late, repeated release must not free the new holder's slot
        assert slots.holders() == {0: "thread 2"}
        lock = Lock(sim.consul, "t/shared/mutex", session, clock=sim.clock)
        lock.acquire(timeout=0)
        with pytest.raises(LockTimeout):
            Lock(sim.consul, "t/shared/mutex", session, clock=sim.clock).acquire(timeout=1)


def test_waiter_makes_one_request_per_change_and_takes_the_released_slot(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/count/restart_lock/", 1, clock=sim.clock, max_wait=10_000)
    with sim.session("holder") as holder, sim.session("waiter") as waiter:
        held = slots.acquire(holder, holder="holder")
        sim.reset_requests()
        call = Background(lambda: slots.acquire(waiter, holder="waiter"))
        # refused acquire (a txn lock), then a read (index 0) and the first blocking query
        sim.until("the waiter to block", lambda: sim.kv_requests() == {"GET": 2} and sim.txn_requests() == 1)
        time.sleep(0.05)
        sim.reset_requests()
        for change in range(1, 6):
            sim.server.state.kv_put("t/count/restart_lock/note", f"unrelated {change}".encode())
            sim.until_kv_gets(change)
            time.sleep(0.02)
        assert sim.kv_requests() == {"GET": 5}, "a waiter must make one blocking query per change"
        slots.release(held)
        call.join()
        assert call.error is None, call.error
        slot = call.result
        assert isinstance(slot, Slot) and slot.session_id == waiter.id and slot.number == 0
        # the holder's release, then the waiter's query wakes and its one acquire succeeds; the
        # lock's txn result carries the slot's fencing token (its ModifyIndex): no read for it
        assert sim.kv_requests() == {"GET": 5, "PUT": 1}
        assert sim.txn_requests() == 1
        assert slot.index == sim.server.state.kv_get(slot.key).modify_index  # type: ignore[union-attr]


def test_acquire_raises_lock_timeout_after_the_timeout_without_polling(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/timeout/restart_lock/", 1, clock=sim.clock)
    with sim.session("holder") as holder, sim.session("waiter") as waiter:
        slots.acquire(holder, holder="holder")
        sim.reset_requests()
        start = sim.clock.monotonic()
        with pytest.raises(LockTimeout, match=r"restart slot .* within 10s"):
            slots.acquire(waiter, holder="waiter", timeout=10)
        waited = sim.clock.monotonic() - start
        assert 10 <= waited <= 14, f"gave up after {waited:.1f}s"
        assert sim.kv_requests() == {"GET": 2}
        assert sim.txn_requests() == 1, "one refused lock"


def test_cancel_stops_a_waiting_acquire(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/cancel/restart_lock/", 1, clock=sim.clock, max_wait=5)
    cancel = threading.Event()
    with sim.session("holder") as holder, sim.session("waiter") as waiter:
        slots.acquire(holder, holder="holder")
        call = Background(lambda: slots.acquire(waiter, holder="waiter", cancel=cancel))
        sim.clock.sleep(3)
        assert call.thread.is_alive()
        cancelled_at = sim.clock.monotonic()
        cancel.set()
        call.join()
        assert isinstance(call.error, LockLost) and "cancelled" in str(call.error)
        assert sim.clock.monotonic() - cancelled_at <= 5 + 4, "cancel noticed later than max_wait"
        assert slots.holders() == {0: "holder"}


def test_waiter_raises_lock_lost_when_its_own_session_is_lost(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/lost/restart_lock/", 1, clock=sim.clock, max_wait=5)
    with sim.session("holder") as holder, sim.session("waiter") as waiter:
        slots.acquire(holder, holder="holder")
        call = Background(lambda: slots.acquire(waiter, holder="waiter"))
        sim.clock.sleep(1)
        sim.consul.session_destroy(waiter.id)
        destroyed = sim.clock.monotonic()
        call.join()
        assert isinstance(call.error, LockLost) and "waiter" in str(call.error)
        assert sim.clock.monotonic() - destroyed <= LONG_TTL / 2 + 5 + 4


def test_losing_the_session_ends_a_slot_waiters_blocking_query_at_once(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/lost-now/restart_lock/", 1, clock=sim.clock, max_wait=10_000)
    with sim.session("holder") as holder, sim.session("waiter") as waiter:
        slots.acquire(holder, holder="holder")
        sim.reset_requests()
        call = Background(lambda: slots.acquire(waiter, holder="waiter"))
        sim.until("the waiter to block", lambda: sim.kv_requests() == {"GET": 2})
        sim.consul.session_destroy(waiter.id)
        with pytest.raises(LockLost):
            waiter.verify()  # the session is lost now (the renew thread would tell within TTL/2)
        lost_at = sim.clock.monotonic()
        call.join()
        assert isinstance(call.error, LockLost) and "waiter" in str(call.error)
        assert sim.clock.monotonic() - lost_at <= 5, "the query waited on instead of ending with the session"
        assert slots.holders() == {0: "holder"}


def test_slot_of_an_abandoned_holder_is_taken_only_after_ttl_and_lock_delay(sim: Sim) -> None:
    lock_delay = 15.0
    slots = RestartSlots(sim.consul, "t/delay/restart_lock/", 1, clock=sim.clock, max_wait=100)
    crashed = sim.session("crashed", ttl=TTL, lock_delay=lock_delay)
    created = sim.clock.monotonic()  # before the create: the server's TTL starts after this
    crashed.create()
    slots.acquire(crashed, holder="crashed")
    crashed.abandon()
    with sim.session("successor", lock_delay=lock_delay) as successor:
        sim.reset_requests()
        slot = slots.acquire(successor, holder="successor", timeout=100)
        waited = sim.clock.monotonic() - created
        assert slot.number == 0
        assert waited >= TTL + lock_delay, f"slot taken {waited:.1f}s after the last renew"
        assert waited <= TTL + 2 * lock_delay + 5, f"slot taken only {waited:.1f}s after the last renew"
        # No tight retry under lock-delay: one refused try when the slot was freed, one when it is over.
        counts = sim.kv_requests()
        assert counts.get("PUT", 0) <= 4, counts
        assert counts.get("GET", 0) <= 5, counts
    crashed.destroy()


def test_contenders_try_one_guess_then_only_the_slots_the_prefix_shows_free(sim: Sim) -> None:
    size = 6
    slots = RestartSlots(sim.consul, "t/spread/restart_lock", size, clock=sim.clock)
    sessions = [sim.session(f"s{n}") for n in range(size)]
    for session in sessions:
        session.create()

    def counts() -> tuple[int, int]:
        """(slot locks sent: txns, reads of the prefix)."""
        all_counts = requests.get(f"{sim.server.address}/_sim/requests", timeout=5).json()
        return all_counts.get("/v1/txn", {}).get("PUT", 0), all_counts.get("/v1/kv", {}).get("GET", 0)

    try:
        sim.reset_requests()
        held = [slots.acquire(session, holder=session.name) for session in sessions]
        assert sorted(slot.number for slot in held) == list(range(size))
        assert all(slot.index > 0 for slot in held), "each acquisition has its fencing token"
        locks, reads = counts()
        # Each contender: one guess, and when it is refused one read of the prefix and one try of a
        # slot that looks free (nobody else acquires meanwhile); the token comes with the lock's answer.
        refused = locks - size
        assert reads == refused, (locks, reads)
        assert refused <= size - 1, (locks, reads)
        for slot in held:
            slots.release(slot)
        sim.reset_requests()
        again = slots.acquire(sessions[0], holder="s0 again")
        assert again.number == held[0].number, "a session first tries the slot it held last"
        assert counts() == (1, 0), "one request when the guess is free"
        slots.release(again)
    finally:
        for session in sessions:
            session.destroy()


class LostAcquireAnswers:
    """The Consul backend, where the answer of each ``acquire`` (or txn ``lock``, as slots are taken)
    is lost after Consul applied it."""

    def __init__(self, consul: ConsulBackend) -> None:
        self._consul = consul
        self.lose = True

    def __getattr__(self, name: str) -> object:
        return getattr(self._consul, name)

    def acquire(self, key: str, value: bytes | str, session: str) -> bool:
        applied = self._consul.acquire(key, value, session)
        if self.lose:
            raise ConsulError(f"kv.acquire {key}", "connection reset after the request was sent")
        return applied

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        result = self._consul.txn(ops)
        if self.lose and any(op.verb == TxnVerb.LOCK for op in ops):
            raise ConsulError(f"txn ({len(ops)} ops)", "connection reset after the request was sent")
        return result


def _holder(sim: Sim, key: str) -> str | None:
    entry = sim.consul.get(key, consistent=True)
    return entry.session if entry else None


@pytest.mark.parametrize("kind", ["lock", "slot"])
def test_an_acquire_whose_answer_was_lost_is_released_and_its_claim_dropped(sim: Sim, kind: str) -> None:
    lossy = LostAcquireAnswers(sim.consul)
    key = "t/lost-answer/mutex" if kind == "lock" else "t/lost-answer/restart_lock/0"
    with sim.session("holder") as session:
        slots = RestartSlots(lossy, "t/lost-answer/restart_lock/", 1, clock=sim.clock)  # type: ignore[arg-type]
        failed = Lock(lossy, key, session, clock=sim.clock)  # type: ignore[arg-type]  # kept alive
        with pytest.raises(ConsulError):
            if kind == "lock":
                failed.acquire(timeout=0)
            else:
                slots.acquire(session, holder="lossy", timeout=0)
        assert _holder(sim, key) is None, "an acquire that applied with its answer lost must be released"
        lossy.lose = False
        # The failed holder's in-process claim is gone too: another holder of the session gets the key.
        if kind == "lock":
            Lock(lossy, key, session, clock=sim.clock).acquire(timeout=0)  # type: ignore[arg-type]
        else:
            assert slots.acquire(session, holder="next", timeout=0).number == 0
        assert _holder(sim, key) == session.id


def test_a_lock_used_as_a_context_manager_waits_its_configured_timeout(sim: Sim) -> None:
    with sim.session("a") as a, sim.session("b") as b:
        Lock(sim.consul, "t/ctx-timeout", a, clock=sim.clock).acquire(timeout=0)
        start = sim.clock.monotonic()
        with (
            pytest.raises(LockTimeout, match="within 5s"),
            Lock(sim.consul, "t/ctx-timeout", b, timeout=5, clock=sim.clock),
        ):
            pass
        assert 5 <= sim.clock.monotonic() - start <= 5 + 4


def test_a_waiting_lock_stops_on_cancel(sim: Sim) -> None:
    cancel = threading.Event()
    with sim.session("a") as a, sim.session("b") as b:
        Lock(sim.consul, "t/lock-cancel", a, clock=sim.clock).acquire(timeout=0)
        waiter = Lock(sim.consul, "t/lock-cancel", b, clock=sim.clock, max_wait=5)
        call = Background(lambda: waiter.acquire(timeout=1_000, cancel=cancel))
        sim.clock.sleep(2)
        assert call.thread.is_alive()
        cancel.set()
        call.join()
        assert isinstance(call.error, LockLost) and "cancelled" in str(call.error)
        assert not waiter.held


def test_keys_under_the_slot_prefix_that_are_not_slot_numbers_are_ignored(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/odd/restart_lock/", 1, clock=sim.clock)
    with sim.session("holder") as holder, sim.session("other") as other:
        assert sim.consul.acquire("t/odd/restart_lock/notes", "not a slot", other.id)
        slot = slots.acquire(holder, holder="holder", timeout=0)
        assert slot.number == 0
        assert slots.holders() == {0: "holder"}


def test_a_lock_waiter_takes_the_lock_when_the_holders_key_is_deleted(sim: Sim) -> None:
    # A holder whose session has behavior "delete" leaves no key behind: the waiter sees an empty view.
    delete = SessionBehavior.DELETE
    holder = Session(sim.consul, "deleter", ttl=LONG_TTL, lock_delay=0, behavior=delete, clock=sim.clock)
    with holder, sim.session("waiter") as waiter:
        Lock(sim.consul, "t/deleted", holder, clock=sim.clock).acquire(timeout=0)
        lock = Lock(sim.consul, "t/deleted", waiter, clock=sim.clock, max_wait=10_000)
        call = Background(lambda: lock.acquire(timeout=1_000))
        sim.clock.sleep(2)
        assert call.thread.is_alive()
        holder.destroy()
        call.join()
        assert call.error is None, call.error
        assert lock.held and _holder(sim, "t/deleted") == waiter.id


def test_a_refused_acquire_leaves_no_claim_behind(sim: Sim) -> None:
    with sim.session("t") as t, sim.session("s") as s:
        held = Lock(sim.consul, "t/refused", t, clock=sim.clock)
        held.acquire(timeout=0)
        refused = Lock(sim.consul, "t/refused", s, clock=sim.clock)  # kept alive below
        with pytest.raises(LockTimeout):
            refused.acquire(timeout=0)
        held.release()
        other = Lock(sim.consul, "t/refused", s, clock=sim.clock)
        other.acquire(timeout=0)  # the refused holder of the same session left no claim in the way
        assert other.held and not refused.held


def test_restart_slots_need_a_size_of_at_least_one(sim: Sim) -> None:
    with pytest.raises(ValueError, match="restart slots: size must be >= 1, got 0"):
        RestartSlots(sim.consul, "t/none/restart_lock/", 0, clock=sim.clock)


def test_holders_shows_a_slot_value_that_is_not_shepards_json_as_it_is(sim: Sim) -> None:
    prefix = "t/foreign/restart_lock/"
    slots = RestartSlots(sim.consul, prefix, 3, clock=sim.clock)
    with sim.session("other") as other:
        for number, value in enumerate(['{"owner": "ops"}', "42", "held by hand"]):
            assert sim.consul.acquire(f"{prefix}{number}", value, other.id)
        assert slots.holders() == {0: '{"owner": "ops"}', 1: "42", 2: "held by hand"}


# --- a slot's fencing token, hints, `needed`, the finish's unlock op, the log -----------------------


class LockAnswersWithoutResults:
    """The Consul backend, where a txn ``lock`` is applied but its answer carries no result (so the
    slot's token is read), recording each ``get`` as ``(key, consistent)``; ``before_read`` runs
    before each read (it may change the key, or raise as a failed read)."""

    def __init__(self, consul: ConsulBackend) -> None:
        self._consul = consul
        self.reads: list[tuple[str, bool]] = []
        self.before_read: Callable[[str], None] = lambda key: None

    def __getattr__(self, name: str) -> object:
        return getattr(self._consul, name)

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        result = self._consul.txn(ops)
        if result.ok and any(op.verb == TxnVerb.LOCK for op in ops):
            return TxnResult(ok=True)
        return result

    def get(self, key: str, *, consistent: bool = False) -> object:
        self.reads.append((key, consistent))
        self.before_read(key)
        return self._consul.get(key, consistent=consistent)


def _entry(sim: Sim, key: str) -> KVEntry:
    entry = sim.consul.get(key, consistent=True)
    assert entry is not None, key
    return entry


def test_a_slot_whose_lock_answer_lacks_the_index_reads_its_token_consistently(sim: Sim) -> None:
    answers = LockAnswersWithoutResults(sim.consul)
    slots = RestartSlots(answers, "t/token-read/restart_lock/", 1, clock=sim.clock)  # type: ignore[arg-type]
    with sim.session("holder") as session:
        slot = slots.acquire(session, holder="holder", timeout=0)
        key = "t/token-read/restart_lock/0"
        assert answers.reads == [(key, True)], "the token is read once, with a consistent read"
        assert slot.key == key and slot.session_id == session.id
        assert slot.index == _entry(sim, key).modify_index > 0, "the token of this acquisition"
        slots.release(slot)  # the slot with its token holds the claim: its release goes out
        assert _holder(sim, key) is None


def test_a_slot_whose_key_is_gone_before_its_token_is_read_is_given_up(sim: Sim) -> None:
    answers = LockAnswersWithoutResults(sim.consul)
    slots = RestartSlots(answers, "t/token-gone/restart_lock/", 1, clock=sim.clock)  # type: ignore[arg-type]
    key = "t/token-gone/restart_lock/0"
    answers.before_read = lambda k: sim.consul.delete(k)  # e.g. an operator's `consul kv delete`
    with sim.session("holder") as session:
        with pytest.raises(LockLost, match=f"restart slot {key}: lost right after it was acquired"):
            slots.acquire(session, holder="holder", timeout=0)
        answers.before_read = lambda k: None
        # no token, and no claim left behind: the next holder of the same session takes the slot
        again = slots.acquire(session, holder="next", timeout=0)
        assert again.number == 0 and again.index == _entry(sim, key).modify_index
        assert slots.holders() == {0: "next"}


def test_a_slot_whose_token_read_failed_is_released_and_the_error_raised(sim: Sim) -> None:
    answers = LockAnswersWithoutResults(sim.consul)
    slots = RestartSlots(answers, "t/token-fail/restart_lock/", 1, clock=sim.clock)  # type: ignore[arg-type]
    key = "t/token-fail/restart_lock/0"

    def fail(k: str) -> None:
        raise ConsulError(f"kv.get {k}", "connection reset")

    answers.before_read = fail
    with sim.session("holder") as session:
        with pytest.raises(ConsulError, match="connection reset"):
            slots.acquire(session, holder="holder", timeout=0)
        assert _holder(sim, key) is None, "a slot without a token must not stay held"
        answers.before_read = lambda k: None
        assert slots.acquire(session, holder="next", timeout=0).number == 0  # no claim left behind


def test_a_slot_acquire_with_a_session_consul_no_longer_knows_raises_lock_lost(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/gone-slot/restart_lock/", 1, clock=sim.clock)
    with sim.session("gone") as session:
        sim.consul.session_destroy(session.id)  # before the next renew could notice
        with pytest.raises(LockLost, match="gone"):
            slots.acquire(session, holder="holder", timeout=0)
        assert session.lost.is_set()
        assert slots.holders() == {}


def test_a_session_first_tries_the_slot_it_held_last_under_that_prefix(sim: Sim) -> None:
    prefix = "t/hint/restart_lock/"
    slots = RestartSlots(sim.consul, prefix, 2, clock=sim.clock)
    with sim.session("a") as a, sim.session("other") as other:
        guess = slots.acquire(a, holder="a")  # the first guess: picked from the session's ID
        slots.release(guess)
        assert sim.consul.acquire(f"{prefix}{guess.number}", "other", other.id)
        held = slots.acquire(a, holder="a", timeout=10)  # the guess is refused: the prefix is read
        assert held.number == 1 - guess.number
        slots.release(held)
        assert sim.consul.release(f"{prefix}{guess.number}", other.id)
        sim.reset_requests()
        again = slots.acquire(a, holder="a", timeout=0)
        assert again.number == held.number, "the slot held last, not the guess from the ID"
        assert sim.txn_requests() == 1 and sim.kv_requests() == {}, "one request: the guess was free"
        slots.release(again)


def test_a_last_slot_beyond_a_smaller_size_is_not_tried(sim: Sim) -> None:
    prefix = "t/shrunk/restart_lock/"
    with sim.session("a") as a, sim.session("other") as other:
        for number in (0, 1):
            assert sim.consul.acquire(f"{prefix}{number}", "other", other.id)
        wide = RestartSlots(sim.consul, prefix, 3, clock=sim.clock)
        last = wide.acquire(a, holder="a", timeout=10)
        assert last.number == 2
        wide.release(last)
        for number in (0, 1):
            assert sim.consul.release(f"{prefix}{number}", other.id)
        # the concurrency went down to 2: slot 2 is no slot any more, whatever the session held last
        slot = RestartSlots(sim.consul, prefix, 2, clock=sim.clock).acquire(a, holder="a", timeout=0)
        assert slot.number in (0, 1)
        assert _holder(sim, f"{prefix}2") is None


def test_needed_is_asked_only_before_taking_a_slot_that_came_free_after_a_wait(sim: Sim) -> None:
    prefix = "t/needed/restart_lock/"
    slots = RestartSlots(sim.consul, prefix, 1, clock=sim.clock, max_wait=10_000)
    asked: list[str] = []

    def needed(who: str, answer: bool) -> Callable[[], bool]:
        def ask() -> bool:
            asked.append(who)
            return answer

        return ask

    def wait_then_release(waiter: Session, who: str, answer: bool, held: Slot) -> Background:
        sim.reset_requests()
        call = Background(lambda: slots.acquire(waiter, holder=who, needed=needed(who, answer)))
        sim.until("the waiter to block", lambda: sim.kv_requests() == {"GET": 2})
        assert who not in asked, "asked before the slot came free"
        slots.release(held)
        call.join()
        assert asked[-1] == who
        return call

    with sim.session("holder") as holder, sim.session("waiter") as waiter:
        # a free slot is taken at once, without asking
        held = slots.acquire(holder, holder="holder", timeout=0, needed=needed("free", False))
        assert asked == []
        call = wait_then_release(waiter, "not needed", False, held)
        assert isinstance(call.error, SlotNotNeeded), call.error
        assert str(call.error) == f"restart slot under {prefix}: not needed no longer needs one"
        assert slots.holders() == {}, "a slot no longer needed is not taken"
        held = slots.acquire(holder, holder="holder", timeout=0)
        call = wait_then_release(waiter, "needed", True, held)
        assert isinstance(call.result, Slot) and call.result.holder == "needed"
        assert slots.holders() == {0: "needed"}


def test_a_slot_released_by_a_transaction_with_its_unlock_op(sim: Sim) -> None:
    slots = RestartSlots(sim.consul, "t/unlock/restart_lock/", 1, clock=sim.clock)
    with sim.session("a") as a:
        slot = slots.acquire(a, holder="first", timeout=0)
        result = sim.consul.txn([TxnOp(TxnVerb.SET, "t/unlock/plan", value=b"done"), slots.unlock_op(slot)])
        assert result.ok, result.errors
        entry = _entry(sim, slot.key)
        assert entry.session is None and entry.text() == "", "free, and naming no holder"
        slots.released(slot)
        # its claim went with it: the next holder of the same session takes the slot ...
        nxt = slots.acquire(a, holder="next", timeout=0)
        assert nxt.number == 0
        # ... and a late release of the first one neither frees it nor logs a release
        slots.release(slot)
        slots.released(slot)
        assert slots.holders() == {0: "next"}


def test_slots_log_acquired_and_released_to_their_logger_with_events(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test.locks.member")
    failing = FailingReleases(sim.consul)
    slots = RestartSlots(failing, "t/log/restart_lock/", 1, clock=sim.clock, logger=logger)  # type: ignore[arg-type]
    key = "t/log/restart_lock/0"

    def lines() -> list[tuple[str, int, str, str | None]]:
        got = [(r.name, r.levelno, r.getMessage(), getattr(r, "event", None)) for r in caplog.records]
        caplog.clear()
        return got

    with sim.session("a") as a, caplog.at_level(logging.INFO):
        caplog.clear()
        slot = slots.acquire(a, holder="web-01 alloc 1", timeout=0)
        assert lines() == [
            (logger.name, logging.INFO, f"restart slot {key} acquired by web-01 alloc 1", "slot_acquired")
        ]
        slots.release(slot)
        assert lines() == [(logger.name, logging.INFO, f"restart slot {key} released", "slot_released")]
        slot = slots.acquire(a, holder="web-01 alloc 1", timeout=0)
        assert sim.consul.txn([slots.unlock_op(slot)]).ok
        lines()
        slots.released(slot)
        assert lines() == [(logger.name, logging.INFO, f"restart slot {key} released", "slot_released")]
        slot = slots.acquire(a, holder="web-01 alloc 1", timeout=0)
        lines()
        failing.fail = True
        slots.release(slot)
        assert lines() == [
            (
                logger.name,
                logging.WARNING,
                f"restart slot {key}: release failed, it is freed when its session ends: "
                f"consul kv.release {key} failed: connection reset",
                None,
            )
        ]
        assert _holder(sim, key) == a.id


class FailingReleases:
    """The Consul backend, where ``release`` fails once ``fail`` is set."""

    def __init__(self, consul: ConsulBackend) -> None:
        self._consul = consul
        self.fail = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._consul, name)

    def release(self, key: str, session: str, value: bytes | str | None = None) -> bool:
        if self.fail:
            raise ConsulError(f"kv.release {key}", "connection reset")
        return self._consul.release(key, session, value)
