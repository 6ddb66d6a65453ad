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
from shepard_lib.errors import Cancelled, ConsulError, LockLost
from shepard_lib.model import SessionBehavior
from shepard_lib.session import CREATE_ATTEMPTS, RETRY_FRACTION, Session, live_here

SCALE = 10.0  # cluster seconds per real second: a 10 s TTL is one real second
TTL = 10.0


class ScriptedConsul:
    """The session calls of ConsulAPI, recorded as ``(call, cluster time)``; renewals fail while ``down``.

    ``create_failures`` are raised by the next creates, in order; a create answers ``create_delay``
    after it applied; while ``hang`` a renew waits until its ``cancel`` is set (as a request to an
    unresponsive Consul does), then raises Cancelled.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []
        self.created: dict[str, object] = {}
        self.down = False  # renewals raise ConsulError (Consul unreachable)
        self.known = True  # renewals answer True (False: Consul answered 404)
        self.create_failures: list[ConsulError] = []
        self.hang = False
        self.create_delay = 0.0  # cluster seconds between a create applying and its answer
        self.renewing = threading.Event()  # a renew is in flight
        self._sessions = 0
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
        if self.create_failures:
            raise self.create_failures.pop(0)
        self.created = {
            "name": name,
            "ttl": ttl,
            "behavior": behavior,
            "lock_delay": lock_delay,
            "node": node,
            "node_checks": node_checks,
        }
        self.clock.sleep(self.create_delay)
        self._sessions += 1
        return f"5e55-{1010 + self._sessions}"

    def session_renew(self, session: str, *, cancel: CancelEvent | None = None) -> bool:
        self._record("renew")
        if self.hang:
            self.renewing.set()
            if cancel is None or not cancel.wait(5.0):  # a bound only for a renew nobody cancels
                self._record("renew never cancelled")
                return True
            self._record("renew cancelled")
            raise Cancelled("session.renew cancelled")
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
        assert session.lost_reason == "no successful renew for 10s (Consul unreachable?)"
        with pytest.raises(LockLost, match="agent web-03"):
            session.check()


def test_a_renew_answered_404_marks_the_session_lost_at_once(consul: ScriptedConsul, clock: Clock) -> None:
    consul.known = False
    with _session(consul, clock, ttl=TTL) as session:
        assert clock.wait(session.lost, TTL), "lost not set after a 404"
        assert consul.times("renew")[0] - consul.times("create")[0] < TTL, "marked lost by the watchdog"
        assert session.lost_reason == (
            "Consul no longer knows it (renew answered 404): it expired or was destroyed"
        )


def test_verify_marks_a_session_consul_forgot_lost(consul: ScriptedConsul, clock: Clock) -> None:
    with _session(consul, clock, ttl=60) as session:
        session.verify()
        consul.known = False
        with pytest.raises(LockLost, match="Consul no longer knows it"):
            session.verify()
        assert session.lost.is_set() and session.lost_reason == "Consul no longer knows it"


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


def test_a_create_whose_answer_was_lost_or_failed_on_the_server_is_tried_again(
    consul: ScriptedConsul, clock: Clock
) -> None:
    consul.create_failures = [
        ConsulError("session.create", "connection reset"),  # no answer: it may have applied
        ConsulError("session.create", "internal error", status=500),
    ]
    with _session(consul, clock, ttl=60) as session:
        assert session.id == "5e55-1011"
        assert live_here(consul, session.id) is session
    assert [c for c, _ in consul.calls] == ["create", "create", "create", "destroy"]


def test_a_create_failing_on_the_server_is_tried_create_attempts_times_then_raises(
    consul: ScriptedConsul, clock: Clock
) -> None:
    consul.create_failures = [
        ConsulError("session.create", "no leader", status=503) for _ in range(CREATE_ATTEMPTS + 1)
    ]
    session = Session(consul, "never created", ttl=60, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(ConsulError, match="HTTP 503"):
        session.create()
    assert len(consul.times("create")) == CREATE_ATTEMPTS
    assert session.id == "" and not [t for t in threading.enumerate() if t.name.endswith("[never created]")]


def test_a_create_refused_is_not_tried_again(consul: ScriptedConsul, clock: Clock) -> None:
    consul.create_failures = [ConsulError("session.create", "bad request", status=400)]
    session = _session(consul, clock, ttl=60)
    with pytest.raises(ConsulError, match="HTTP 400"):
        session.create()
    assert [c for c, _ in consul.calls] == ["create"] and session.id == ""


def test_live_here_finds_this_processes_live_sessions_of_that_backend_only(
    consul: ScriptedConsul, clock: Clock
) -> None:
    # A wrong "not live" lets another coordinator of this process reclaim a member this session
    # drives (a double restart); a wrong "live" makes a dead holder look alive (a reclaim waits).
    other_backend = ScriptedConsul(clock)
    with _session(consul, clock, ttl=60) as session, _session(consul, clock, ttl=60) as sibling:
        assert live_here(consul, session.id) is session
        assert live_here(consul, sibling.id) is sibling
        assert live_here(consul, "5e55-9999") is None, "a session this process never created"
        assert live_here(other_backend, session.id) is None, "a session of another backend"
    assert live_here(consul, session.id) is None, "a destroyed session"
    assert not session.lost.is_set()  # destroyed cleanly: not "lost", yet no longer live


def test_live_here_drops_a_session_once_it_is_lost_invalidated_or_abandoned(
    consul: ScriptedConsul, clock: Clock
) -> None:
    with (
        _session(consul, clock, ttl=60) as invalidated,
        _session(consul, clock, ttl=60) as abandoned,
        _session(consul, clock, ttl=TTL) as forgotten,
        _session(consul, clock, ttl=60) as live,
    ):
        invalidated.invalidate("agent shutting down")
        assert invalidated.lost.is_set() and invalidated.lost_reason == "agent shutting down"
        with pytest.raises(LockLost, match="agent shutting down"):
            invalidated.check()
        assert live_here(consul, invalidated.id) is None, "an invalidated session"
        abandoned.abandon()
        assert not abandoned.lost.is_set()  # Consul still knows it until its TTL runs out
        assert live_here(consul, abandoned.id) is None, "an abandoned session (its renewals stopped)"
        consul.known = False  # the next renew answers 404
        assert clock.wait(forgotten.lost, TTL), "a renew answered 404 did not mark the session lost"
        assert live_here(consul, forgotten.id) is None, "a session Consul no longer knows"
        assert live_here(consul, live.id) is live


def test_live_here_knows_nothing_of_a_backend_that_cannot_be_weakly_referenced(
    consul: ScriptedConsul, clock: Clock
) -> None:
    class Unreferenceable:
        __slots__ = ("_consul",)  # no __weakref__

        def __init__(self, consul: ScriptedConsul) -> None:
            self._consul = consul

        def __getattr__(self, name: str) -> object:
            return getattr(self._consul, name)

    backend = Unreferenceable(consul)
    with Session(backend, "agent web-03", ttl=60, clock=clock) as session:  # type: ignore[arg-type]
        assert session.id == "5e55-1011"
        assert live_here(backend, session.id) is None  # type: ignore[arg-type]


def test_holds_only_the_claim_tokens_a_coordinator_holds_under_it(
    consul: ScriptedConsul, clock: Clock
) -> None:
    # A wrong False lets another coordinator of this process reclaim a member this one drives.
    session, other = _session(consul, clock), _session(consul, clock)
    assert not session.holds("claim 1") and not session.holds(None)
    session.hold("claim 1")
    session.hold("claim 2")
    assert session.holds("claim 1") and session.holds("claim 2")
    assert not session.holds("claim 3") and not session.holds(None), "a token nobody holds"
    assert not other.holds("claim 1"), "a token held under another session"
    session.drop("claim 1")
    assert not session.holds("claim 1") and session.holds("claim 2")
    session.drop("claim 1")  # dropping twice is harmless
    assert session.holds("claim 2")


def test_destroy_cancels_a_renew_in_flight_and_returns_with_its_threads_ended(
    consul: ScriptedConsul, clock: Clock
) -> None:
    consul.hang = True
    session = Session(consul, "hung renew", ttl=TTL, clock=clock)  # type: ignore[arg-type]
    session.create()
    assert consul.renewing.wait(5.0), "no renew was sent"
    session.destroy()
    assert not [t.name for t in threading.enumerate() if t.name.endswith("[hung renew]")]
    assert [c for c, _ in consul.calls] == ["create", "renew", "renew cancelled", "destroy"]
    assert not session.lost.is_set(), session.lost_reason


def test_lost_is_set_a_ttl_after_the_create_while_the_first_renew_hangs(
    consul: ScriptedConsul, clock: Clock
) -> None:
    consul.hang = True  # Consul unresponsive: the renew neither succeeds nor fails
    with _session(consul, clock, ttl=TTL) as session:
        assert clock.wait(session.lost, 3 * TTL), "lost not set while the renew hangs"
        lost_after = clock.monotonic() - consul.times("create")[0]
        assert TTL - 0.01 <= lost_after <= 2 * TTL, f"lost {lost_after:.2f}s after the create"
        assert session.lost_reason == "no successful renew for 10s (Consul unreachable?)"
        assert [c for c, _ in consul.calls] == ["create", "renew"], "a renew was cancelled or answered"


def test_a_session_created_late_is_lost_a_ttl_after_the_create_was_sent_not_sooner(
    consul: ScriptedConsul, clock: Clock
) -> None:
    # The answer comes half a second before the TTL counted from the request runs out, and no renew
    # ever succeeds: lost is due exactly a TTL after the create was sent, neither at the answer nor later.
    consul.create_delay = TTL - 0.5
    consul.down = True
    session = _session(consul, clock, ttl=TTL)
    session.create()
    answered = clock.monotonic()
    try:
        assert clock.wait(session.lost, 2 * TTL), "lost not set although no renew succeeds"
        lost_at = clock.monotonic()
        sent = consul.times("create")[0]
        assert lost_at - sent >= TTL - 0.01, f"lost {lost_at - sent:.2f}s after the create was sent"
        assert lost_at - answered < TTL / 2, f"lost {lost_at - answered:.2f}s after the late answer"
    finally:
        session.destroy()
