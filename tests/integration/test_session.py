"""Session: renewals, loss detection, destroy and abandon, against the Consul sim over HTTP.

Sim-only: these tests need the sim's time scale (a 10 s TTL passes in 0.2 real seconds), its fault
controls and its in-process state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shepard_lib.backends.consul import ConsulBackend, RetryPolicy
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig
from shepard_lib.errors import ConsulError, LockLost, LockTimeout
from shepard_lib.locks import Lock
from shepard_lib.session import Session
from shepard_lib.sim.consul import ConsulServer, ConsulState

SCALE = 20.0  # a 10 s TTL is 0.5 real seconds: renewals due every 0.25 s survive a busy machine
TTL = 10.0  # Consul's minimum TTL
TOKEN = "s3cret-management-token"


@dataclass
class Sim:
    clock: Clock
    server: ConsulServer
    consul: ConsulBackend

    def holder(self, key: str) -> str | None:
        entry = self.consul.get(key, consistent=True)
        return entry.session if entry else None


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sim]:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    clock = Clock(scale=SCALE)
    server = ConsulServer(ConsulState(clock), acl_token=TOKEN).start()
    consul = ConsulBackend(
        ConsulConfig(address=server.address, token=TOKEN),
        clock,
        retry=RetryPolicy(attempts=2, initial=0.2, maximum=0.5, jitter=0.1),
    )
    try:
        yield Sim(clock, server, consul)
    finally:
        consul.close()
        server.stop()


def test_renewals_keep_the_session_and_its_lock_past_several_ttls(sim: Sim) -> None:
    with Session(sim.consul, "renewer", ttl=TTL, clock=sim.clock) as session:
        lock = Lock(sim.consul, "t/renew/lock", session, clock=sim.clock)
        lock.acquire(timeout=0)
        sim.clock.sleep(3 * TTL)
        assert not session.lost.is_set(), f"session lost: {session.lost_reason}"
        assert sim.consul.session_info(session.id) is not None, "Consul expired a renewed session"
        assert sim.holder("t/renew/lock") == session.id
        assert lock.held


def test_destroy_releases_the_locks_without_setting_lost_and_is_idempotent(sim: Sim) -> None:
    with Session(sim.consul, "clean", ttl=TTL, lock_delay=15, clock=sim.clock) as session:
        Lock(sim.consul, "t/clean/lock", session, clock=sim.clock).acquire(timeout=0)
        assert sim.holder("t/clean/lock") == session.id
    assert sim.holder("t/clean/lock") is None
    assert sim.consul.session_info(session.id) is None
    session.destroy()
    assert not session.lost.is_set()


def test_locks_of_a_destroyed_session_are_under_lock_delay_unless_released_first(sim: Sim) -> None:
    with Session(sim.consul, "holder", ttl=TTL, lock_delay=15, clock=sim.clock) as session:
        Lock(sim.consul, "t/delay/destroyed", session, clock=sim.clock).acquire(timeout=0)
        released = Lock(sim.consul, "t/delay/released", session, clock=sim.clock)
        released.acquire(timeout=0)
        released.release()
    with Session(sim.consul, "next", ttl=TTL, clock=sim.clock) as other:
        Lock(sim.consul, "t/delay/released", other, clock=sim.clock).acquire(timeout=0)
        with pytest.raises(LockTimeout):
            Lock(sim.consul, "t/delay/destroyed", other, clock=sim.clock).acquire(timeout=0)
        Lock(sim.consul, "t/delay/destroyed", other, clock=sim.clock).acquire(timeout=20)


def test_abandoned_session_keeps_its_lock_until_the_ttl_then_frees_it_after_lock_delay(sim: Sim) -> None:
    lock_delay = 15.0
    crashed = Session(sim.consul, "crashed", ttl=TTL, lock_delay=lock_delay, clock=sim.clock)
    crashed.create()
    created = sim.clock.monotonic()  # the last good "renew" is the creation
    Lock(sim.consul, "t/abandon/lock", crashed, clock=sim.clock).acquire(timeout=0)
    crashed.abandon()

    sim.clock.sleep(0.7 * TTL)
    assert sim.holder("t/abandon/lock") == crashed.id, "the lock was freed before the TTL ran out"

    with Session(sim.consul, "successor", ttl=TTL, clock=sim.clock) as successor:
        Lock(sim.consul, "t/abandon/lock", successor, clock=sim.clock).acquire(timeout=4 * (TTL + lock_delay))
        waited = sim.clock.monotonic() - created
    assert waited >= TTL + lock_delay, f"acquired {waited:.1f}s after the last renew, before TTL + lock-delay"
    assert waited <= TTL + 2 * lock_delay + 5, f"acquired only {waited:.1f}s after the last renew"
    assert crashed.lost.is_set(), "the abandoned session should count itself lost after its TTL"
    crashed.destroy()  # sends nothing: the session is already gone in Consul, and must stay abandoned


def test_lost_is_set_when_the_session_is_destroyed_behind_its_back(sim: Sim) -> None:
    with Session(sim.consul, "victim", ttl=TTL, clock=sim.clock) as session:
        sim.consul.session_destroy(session.id)
        destroyed = sim.clock.monotonic()
        assert sim.clock.wait(session.lost, TTL), "lost not set although renewals answer 404"
        noticed = sim.clock.monotonic() - destroyed
        assert noticed <= TTL / 2 + 2.5, f"loss noticed only after {noticed:.1f}s (renew interval is ttl/2)"
        assert "404" in (session.lost_reason or "")
        with pytest.raises(LockLost, match="victim"):
            session.check()


@pytest.mark.parametrize("fault", ["renewals paused", "every request fails", "no leader"])
def test_lost_is_set_when_consul_fails_past_the_ttl(sim: Sim, fault: str) -> None:
    with Session(sim.consul, "partitioned", ttl=TTL, clock=sim.clock) as session:
        sim.clock.sleep(TTL / 4)  # between two renewals
        if fault == "renewals paused":
            sim.server.faults.pause_session_renewals(session.id)
        elif fault == "every request fails":
            sim.server.faults.error_rate = 1.0
        else:
            sim.server.faults.leader_lost = True
        failing_since = sim.clock.monotonic()
        assert sim.clock.wait(session.lost, 3 * TTL), "lost not set although no renew succeeds"
        after = sim.clock.monotonic() - failing_since
        # The last good renew was at most ttl/2 before the fault began, and lost is due ttl after it.
        assert TTL / 2 - 1 <= after <= TTL + 2.5, f"lost set {after:.1f}s after renewals began to fail"
        assert "renew" in (session.lost_reason or "")
        sim.server.faults.reset()


def test_renewals_survive_an_outage_shorter_than_the_ttl(sim: Sim) -> None:
    with Session(sim.consul, "resilient", ttl=TTL, clock=sim.clock) as session:
        sim.server.faults.error_rate = 1.0
        sim.clock.sleep(TTL / 3)
        sim.server.faults.error_rate = 0.0
        sim.clock.sleep(3 * TTL)
        assert not session.lost.is_set(), f"session lost after a short outage: {session.lost_reason}"
        assert sim.consul.session_info(session.id) is not None


def test_renew_failures_are_logged_with_the_session_name_and_never_the_token(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Session(sim.consul, "agent web-03", ttl=TTL, clock=sim.clock) as session:
        sim.server.faults.pause_session_renewals(session.id)
        assert sim.clock.wait(session.lost, 3 * TTL)
        sim.server.faults.reset()
    failures = [
        r for r in caplog.records if r.name == "shepard_lib.session" and "renew failed" in r.getMessage()
    ]
    assert failures, "no renew failure was logged"
    assert all("agent web-03" in r.getMessage() for r in failures)
    assert not [r for r in caplog.records if TOKEN in r.getMessage()], "a log line contains the token"


def test_renew_and_watchdog_threads_are_named_daemons_that_end_with_the_session(sim: Sim) -> None:
    def mine() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if "[threaded-one]" in t.name]

    with Session(sim.consul, "threaded-one", ttl=TTL, clock=sim.clock):
        threads = mine()
        assert sorted(t.name for t in threads) == [
            "shepard-session-renew[threaded-one]",
            "shepard-session-watchdog[threaded-one]",
        ]
        assert all(t.daemon for t in threads)
    for thread in threads:
        thread.join(sim.clock.real(TTL))
    assert not mine(), "session threads still running after destroy"


def test_check_raises_only_once_lost_and_create_twice_is_refused(sim: Sim) -> None:
    session = Session(sim.consul, "twice", ttl=TTL, clock=sim.clock)
    session.create()
    try:
        session.check()
        session.verify()
        with pytest.raises(RuntimeError, match="already created"):
            session.create()
        sim.consul.session_destroy(session.id)
        with pytest.raises(LockLost, match="no longer knows"):
            session.verify()
        assert session.lost.is_set()
    finally:
        session.destroy()


class LateReplies:
    """The Consul backend with a late reply: the request applies at once, its answer comes ``delay`` later.

    Consul starts (or resets) a session's TTL when it receives the request, so a session's clock
    must count from when the request was sent; counting from the reply would trust the session
    ``delay`` longer than Consul does. After ``fail_renewals`` every renew fails (Consul unreachable).
    """

    def __init__(self, consul: ConsulBackend, clock: Clock, *, delay: float) -> None:
        self._consul = consul
        self._clock = clock
        self.delay = delay
        self.late_create = False
        self.late_renewals = 0  # how many renewals still answer late
        self.fail_renewals = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._consul, name)

    def session_create(self, *args: object, **kwargs: object) -> str:
        session_id = self._consul.session_create(*args, **kwargs)  # type: ignore[arg-type]
        if self.late_create:
            self._clock.sleep(self.delay)
        return session_id

    def session_renew(self, session: str, *, cancel: CancelEvent | None = None) -> bool:
        if self.fail_renewals:
            raise ConsulError("Consul unreachable (test)")
        known = self._consul.session_renew(session, cancel=cancel)
        if self.late_renewals:
            self.late_renewals -= 1
            self.fail_renewals = True  # the late renew is the last one that reaches Consul
            self._clock.sleep(self.delay)
        return known


def test_the_session_counts_its_ttl_from_when_the_create_was_sent_not_answered(sim: Sim) -> None:
    # Created at 0 and answered at 8; no renew ever succeeds. Consul's TTL runs from 0, so lost is due
    # at 10 (at 18 if counted from the answer).
    late = LateReplies(sim.consul, sim.clock, delay=8)
    late.late_create = late.fail_renewals = True
    session = Session(late, "late create", ttl=TTL, clock=sim.clock)  # type: ignore[arg-type]
    sent = sim.clock.monotonic()
    session.create()
    try:
        assert sim.clock.wait(session.lost, sent + 14 - sim.clock.monotonic()), (
            "lost not set 14s after the create was sent, with no renew since: "
            "the TTL was counted from the answer"
        )
        assert sim.clock.monotonic() - sent >= TTL - 0.5, "lost set before the TTL could have run out"
    finally:
        session.destroy()


def test_the_session_counts_its_ttl_from_when_the_last_good_renew_was_sent_not_answered(sim: Sim) -> None:
    # TTL 30: the first renew is sent at 15 and answered at 27, before the TTL counted from the create
    # ran out; every later renew fails. Consul reset its TTL at 15, so lost is due at 45 (at 57 if
    # counted from the answer).
    ttl = 30.0
    late = LateReplies(sim.consul, sim.clock, delay=12)
    late.late_renewals = 1
    session = Session(late, "late renew", ttl=ttl, clock=sim.clock)  # type: ignore[arg-type]
    created = sim.clock.monotonic()
    session.create()
    try:
        assert sim.clock.wait(session.lost, created + 51 - sim.clock.monotonic()), (
            "lost not set 36s after the last good renew was sent: the TTL was counted from its answer"
        )
        assert sim.clock.monotonic() - created >= ttl / 2 + ttl - 1, "lost set before the renewed TTL ran out"
        assert late.fail_renewals, "the late renew never happened"
    finally:
        session.destroy()
