"""Session against a scripted Consul (no sockets): what it sends, when it renews, when it counts as lost.

The stand-in records every session call with the cluster time it was made and answers as the test
says (renewed, unknown, or an error), so each test pins one decision of the renew loop or the
watchdog exactly. The same behaviour over HTTP against the Consul sim is in
``tests/integration/test_session.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.errors import ConsulError, LockLost
from shepard_lib.model import SessionBehavior
from shepard_lib.session import RETRY_FRACTION, Session

SCALE = 10.0  # cluster seconds per real second: a 10 s TTL is one real second
TTL = 10.0


class ScriptedConsul:
    """The session calls of ConsulAPI, recorded as ``(call, cluster time)``; renewals fail while ``down``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []
        self.created: dict[str, object] = {}
        self.down = False  # renewals raise ConsulError (Consul unreachable)
        self.known = True  # renewals answer True (False: Consul answered 404)
        self._lock = threading.Lock()

    def _record(self, call: str) -> None:
        with self._lock:
            self.calls.append((call, self.clock.monotonic()))

    def times(self, call: str) -> list[float]:
        with self._lock:
            return [t for c, t in self.calls if c == call]

    def session_create(
        self,
        name: str,
        ttl: float,
        *,
        behavior: SessionBehavior,
        lock_delay: float,
        node: str | None,
        node_checks: Sequence[str] | None,
    ) -> str:
        self._record("create")
        self.created = {
            "name": name,
            "ttl": ttl,
            "behavior": behavior,
            "lock_delay": lock_delay,
            "node": node,
            "node_checks": node_checks,
        }
        return "5e55-1011"

    def session_renew(self, session: str, *, cancel: CancelEvent | None = None) -> bool:
        self._record("renew")
        if self.down:
            raise ConsulError("session.renew", "connection refused")
        return self.known

    def session_destroy(self, session: str) -> None:
        self._record("destroy")

    def session_info(self, session: str) -> object | None:
        self._record("info")
        return object() if self.known else None


@pytest.fixture
def clock() -> Clock:
    return Clock(scale=SCALE)


@pytest.fixture
def consul(clock: Clock) -> ScriptedConsul:
    return ScriptedConsul(clock)


def _session(consul: ScriptedConsul, clock: Clock, **kwargs: object) -> Session:
    return Session(consul, "agent web-03", clock=clock, **kwargs)  # type: ignore[arg-type]


def _wait_until(what: str, predicate: object, real_seconds: float = 5.0) -> None:
    deadline = time.monotonic() + real_seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_create_sends_the_sessions_settings(consul: ScriptedConsul, clock: Clock) -> None:
    session = _session(
        consul,
        clock,
        ttl=30,
        lock_delay=5,
        behavior=SessionBehavior.DELETE,
        node="web-03",
        node_checks=["serfHealth", "service:web"],
    )
    assert (session.id, session.lost_reason) == ("", None)
    with session:
        assert session.id == "5e55-1011"
    assert consul.created == {
        "name": "agent web-03",
        "ttl": 30.0,
        "behavior": SessionBehavior.DELETE,
        "lock_delay": 5.0,
        "node": "web-03",
        "node_checks": ("serfHealth", "service:web"),
    }


def test_defaults_are_consuls_ttl_and_lock_delay_bound_to_the_agents_node(
    consul: ScriptedConsul, clock: Clock
) -> None:
    with _session(consul, clock):
        pass
    assert consul.created["ttl"] == 15.0 and consul.created["lock_delay"] == 15.0
    assert consul.created["behavior"] is SessionBehavior.RELEASE
    assert consul.created["node"] is None and consul.created["node_checks"] is None


def test_a_ttl_must_be_positive(consul: ScriptedConsul, clock: Clock) -> None:
    with pytest.raises(ValueError, match="session ttl must be > 0, got 0"):
        _session(consul, clock, ttl=0)
    assert _session(consul, clock, ttl=1).ttl == 1.0


def test_renewals_come_every_half_ttl(consul: ScriptedConsul, clock: Clock) -> None:
    with _session(consul, clock, ttl=TTL):
        _wait_until("two renewals", lambda: len(consul.times("renew")) >= 2)
    [created] = consul.times("create")
    first, second = consul.times("renew")[:2]
    assert TTL / 2 - 0.01 <= first - created <= TTL / 2 + 2, f"first renew {first - created:.2f}s in"
    assert TTL / 2 - 0.01 <= second - first <= TTL / 2 + 2, f"renewals {second - first:.2f}s apart"


def test_a_failed_renew_is_retried_every_ttl_fraction_until_it_succeeds(
    consul: ScriptedConsul, clock: Clock
) -> None:
    consul.down = True
    with _session(consul, clock, ttl=TTL) as session:
        _wait_until("a failed renew and its retry", lambda: len(consul.times("renew")) >= 2)
        consul.down = False
        _wait_until("a renew after the outage", lambda: len(consul.times("renew")) >= 3)
        failed, retried = consul.times("renew")[:2]
        retry = TTL / RETRY_FRACTION
        assert retry - 0.01 <= retried - failed <= retry + 2, f"retried {retried - failed:.2f}s later"
        clock.sleep(TTL)  # well past the TTL counted from the create: the retry renewed it
        assert not session.lost.is_set(), f"lost after an outage shorter than the TTL: {session.lost_reason}"


def test_lost_is_set_a_ttl_after_the_last_good_renew_was_sent_not_before(
    consul: ScriptedConsul, clock: Clock
) -> None:
    with _session(consul, clock, ttl=TTL) as session:
        _wait_until("a good renew", lambda: len(consul.times("renew")) >= 1)
        consul.down = True
        assert clock.wait(session.lost, 3 * TTL), "lost not set although no renew succeeds"
        lost_at = clock.monotonic()
        last_good = consul.times("renew")[0]
        assert lost_at - last_good >= TTL - 0.01, f"lost {lost_at - last_good:.2f}s after the last good renew"
        assert "no successful renew for 10s" in (session.lost_reason or "")
        with pytest.raises(LockLost, match="agent web-03"):
            session.check()


def test_a_renew_answered_404_marks_the_session_lost_at_once(consul: ScriptedConsul, clock: Clock) -> None:
    consul.known = False
    with _session(consul, clock, ttl=TTL) as session:
        assert clock.wait(session.lost, TTL), "lost not set after a 404"
        assert consul.times("renew")[0] - consul.times("create")[0] < TTL, "marked lost by the watchdog"
        assert "renew answered 404" in (session.lost_reason or "")


def test_verify_marks_a_session_consul_forgot_lost(consul: ScriptedConsul, clock: Clock) -> None:
    with _session(consul, clock, ttl=60) as session:
        session.verify()
        consul.known = False
        with pytest.raises(LockLost, match="Consul no longer knows it"):
            session.verify()
        assert session.lost.is_set()


def test_destroy_sends_one_destroy_then_nothing_and_never_sets_lost(
    consul: ScriptedConsul, clock: Clock
) -> None:
    session = _session(consul, clock, ttl=TTL)
    session.create()
    _wait_until("a renew", lambda: len(consul.times("renew")) >= 1)
    session.destroy()
    session.destroy()
    clock.sleep(1.5 * TTL)  # past the TTL: a watchdog still running would mark it lost
    assert [c for c, _ in consul.calls] == ["create", "renew", "destroy"]
    assert not session.lost.is_set(), session.lost_reason


def test_destroy_of_a_session_never_created_sends_nothing(consul: ScriptedConsul, clock: Clock) -> None:
    _session(consul, clock).destroy()
    assert consul.calls == []


def test_an_abandoned_session_sends_nothing_more_and_is_lost_after_its_ttl(
    consul: ScriptedConsul, clock: Clock
) -> None:
    with _session(consul, clock, ttl=TTL) as session:
        session.abandon()
        assert clock.wait(session.lost, 2 * TTL), "an abandoned session must count as lost after its TTL"
    assert [c for c, _ in consul.calls] == ["create"]


def test_the_sessions_threads_end_with_it_at_once(consul: ScriptedConsul, clock: Clock) -> None:
    session = _session(consul, clock, ttl=600)  # a watchdog sleeping until its deadline would live 60 s
    session.create()
    names = {f"shepard-session-renew[{session.name}]", f"shepard-session-watchdog[{session.name}]"}
    assert names <= {t.name for t in threading.enumerate()}
    session.destroy()
    _wait_until("the threads to end", lambda: not names & {t.name for t in threading.enumerate()}, 2.0)
