"""Sessions and locks: create/renew/destroy/info, acquire/release, invalidation, lock-delay, TTL."""

from __future__ import annotations

import time
from typing import Any

import pytest
from consul_contract import ConsulException, ConsulTarget, make_client

from shepard_lib.clock import Clock
from shepard_lib.model import CheckStatus
from shepard_lib.sim.consul import ConsulServer, ConsulState


def test_session_defaults_match_consul(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    session_id = consul_target.session()
    _, info = c.session.info(session_id)
    node = c.agent.self()["Config"]["NodeName"]
    assert info["ID"] == session_id
    assert info["Node"] == node
    assert info["Behavior"] == "release"
    assert info["LockDelay"] == 15 * 10**9
    assert info["NodeChecks"] == ["serfHealth"]
    assert info["TTL"] == ""
    assert info["CreateIndex"] == info["ModifyIndex"] > 0


def test_lowercase_fields_from_python_consul2_are_honoured(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    session_id = consul_target.session(
        name="shepard-test", ttl=30, lock_delay=2, behavior="delete", checks=[]
    )
    _, info = c.session.info(session_id)
    assert info["Name"] == "shepard-test"
    assert info["TTL"] == "30s"
    assert info["LockDelay"] == 2 * 10**9
    assert info["Behavior"] == "delete"
    assert not info["NodeChecks"]


def test_lock_delay_as_small_number_is_seconds_and_as_large_number_nanoseconds(
    consul_target: ConsulTarget,
) -> None:
    ids = []
    for lock_delay in (5, 3 * 10**9):
        resp = consul_target.http("PUT", "/v1/session/create", json={"LockDelay": lock_delay})
        assert resp.status_code == 200, resp.text
        ids.append(resp.json()["ID"])
        consul_target._sessions.append(ids[-1])
    infos = [consul_target.client().session.info(i)[1] for i in ids]
    assert [i["LockDelay"] for i in infos] == [5 * 10**9, 3 * 10**9]


@pytest.mark.parametrize("ttl", ["5s", "25h"])
def test_ttl_outside_10s_to_24h_is_rejected(consul_target: ConsulTarget, ttl: str) -> None:
    resp = consul_target.http("PUT", "/v1/session/create", json={"TTL": ttl})
    assert resp.status_code == 500
    assert resp.text.startswith("Invalid Session TTL")


def test_invalid_behavior_and_unparsable_ttl_are_rejected(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("PUT", "/v1/session/create", json={"Behavior": "explode"})
    assert resp.status_code == 500 and resp.text == "Invalid Behavior setting 'explode'"
    resp = consul_target.http("PUT", "/v1/session/create", json={"TTL": "ten"})
    assert resp.status_code == 500 and resp.text.startswith("Session TTL 'ten' invalid")


def test_bad_json_body_is_400(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("PUT", "/v1/session/create", data=b"{not json")
    assert resp.status_code == 400 and resp.text.startswith("Request decode failed")


def test_session_on_unknown_node_or_check_is_rejected(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("PUT", "/v1/session/create", json={"Node": "no-such-node-shepard"})
    assert resp.status_code == 500 and resp.text == "Missing node registration"
    resp = consul_target.http("PUT", "/v1/session/create", json={"NodeChecks": ["no-such-check"]})
    assert resp.status_code == 500 and resp.text == "Missing check 'no-such-check' registration"


def test_renew_returns_the_session_list_and_404_for_an_unknown_session(consul_target: ConsulTarget) -> None:
    session_id = consul_target.session(ttl=15)
    resp = consul_target.http("PUT", f"/v1/session/renew/{session_id}")
    assert resp.status_code == 200
    assert [s["ID"] for s in resp.json()] == [session_id]
    unknown = "00000000-0000-4000-8000-000000000000"
    resp = consul_target.http("PUT", f"/v1/session/renew/{unknown}")
    assert resp.status_code == 404
    assert resp.text == f"Session id '{unknown}' not found"


def test_destroy_is_idempotent_and_info_of_unknown_session_is_empty(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    session_id = consul_target.session()
    assert c.session.destroy(session_id) is True
    assert c.session.destroy(session_id) is True
    resp = consul_target.http("GET", f"/v1/session/info/{session_id}")
    assert resp.status_code == 200 and resp.json() == []
    assert int(resp.headers["X-Consul-Index"]) >= 1


def test_list_and_node_sessions(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    a, b = consul_target.session(name="a"), consul_target.session(name="b")
    node = c.agent.self()["Config"]["NodeName"]
    _, listed = c.session.list()
    assert {a, b} <= {s["ID"] for s in listed}
    _, on_node = c.session.node(node)
    assert {a, b} <= {s["ID"] for s in on_node}


def test_acquire_and_release_return_booleans_and_lock_index_counts_acquisitions(
    consul_target: ConsulTarget,
) -> None:
    c, key = consul_target.client(), consul_target.key("lock")
    s1, s2 = consul_target.session(), consul_target.session()
    assert c.kv.put(key, "one", acquire=s1) is True
    entry = c.kv.get(key)[1]
    assert entry["Session"] == s1 and entry["LockIndex"] == 1
    assert c.kv.put(key, "again", acquire=s1) is True  # re-acquire by the holder: no increment
    assert c.kv.get(key)[1]["LockIndex"] == 1
    assert c.kv.put(key, "two", acquire=s2) is False
    assert c.kv.put(key, "x", release=s2) is False
    assert c.kv.put(key, "released", release=s1) is True
    entry = c.kv.get(key)[1]
    assert "Session" not in entry and entry["Value"] == b"released" and entry["LockIndex"] == 1
    assert c.kv.put(key, "two", acquire=s2) is True  # a clean release sets no lock-delay
    assert c.kv.get(key)[1]["LockIndex"] == 2


def test_plain_put_and_cas_on_a_held_key_keep_its_session(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("held")
    session_id = consul_target.session()
    c.kv.put(key, "v", acquire=session_id)
    c.kv.put(key, "overwritten")
    entry = c.kv.get(key)[1]
    assert entry["Session"] == session_id and entry["Value"] == b"overwritten"
    assert c.kv.put(key, "cas", cas=entry["ModifyIndex"]) is True
    assert c.kv.get(key)[1]["Session"] == session_id


def test_acquire_with_an_unknown_session_is_500_invalid_session(consul_target: ConsulTarget) -> None:
    unknown = "00000000-0000-4000-8000-000000000001"
    resp = consul_target.http("PUT", f"/v1/kv/{consul_target.key('l')}?acquire={unknown}", data=b"v")
    assert resp.status_code == 500
    assert resp.text.endswith(f'invalid session "{unknown}"')


def test_destroy_releases_locks_and_lock_delay_refuses_reacquire(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("delayed")
    holder = consul_target.session(lock_delay=5)
    other = consul_target.session()
    assert c.kv.put(key, "v", acquire=holder) is True
    c.session.destroy(holder)
    entry = c.kv.get(key)[1]
    assert "Session" not in entry and entry["Value"] == b"v"
    assert c.kv.put(key, "w", acquire=other) is False
    consul_target.clock.sleep(5.2)
    assert c.kv.put(key, "w", acquire=other) is True


def test_lock_delay_zero_lets_another_session_acquire_at_once(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("nodelay")
    holder, other = consul_target.session(lock_delay=0), consul_target.session()
    c.kv.put(key, "v", acquire=holder)
    c.session.destroy(holder)
    assert c.kv.put(key, "w", acquire=other) is True


def test_behavior_delete_deletes_held_keys_on_invalidation(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("ephemeral")
    holder = consul_target.session(behavior="delete", lock_delay=0)
    c.kv.put(key, "v", acquire=holder)
    c.kv.put(consul_target.key("unlocked"), "stays")
    c.session.destroy(holder)
    assert c.kv.get(key)[1] is None
    assert c.kv.get(consul_target.key("unlocked"))[1]["Value"] == b"stays"


def _released_at(c: Any, clock: Clock, key: str, holder: str) -> float:
    """Follow ``key`` with blocking queries until ``holder`` no longer holds it; the cluster time then.

    The time is read after the answer that shows the key free, so it is never before the release:
    a release before the TTL shows as an early time and fails the caller's check.
    """
    index, entry = c.kv.get(key)
    for _ in range(50):
        if entry is None or entry.get("Session") != holder:
            return clock.monotonic()
        index, entry = c.kv.get(key, index=index, wait="5s")
    raise AssertionError(f"{key} still held by {holder} after 50 blocking queries")


def test_ttl_expiry_releases_locks_not_before_the_ttl(sim_consul: ConsulTarget) -> None:
    """Sim-only (time-scaled TTL): a 10 s TTL passes in 0.2 real seconds."""
    c, key, clock = sim_consul.client(), sim_consul.key("ttl"), sim_consul.clock
    other = sim_consul.session()
    start = clock.monotonic()
    holder = sim_consul.session(ttl=10, lock_delay=10)
    c.kv.put(key, "v", acquire=holder)
    released = _released_at(c, clock, key, holder) - start
    assert 10 <= released <= 10 + 3, f"the lock was released {released:.1f}s after a 10s-TTL session began"
    assert c.session.info(holder)[1] is None
    resp = sim_consul.http("PUT", f"/v1/session/renew/{holder}")
    assert resp.status_code == 404
    assert c.kv.put(key, "w", acquire=other) is False  # lock-delay after an invalidation
    clock.sleep(10.2)
    assert c.kv.put(key, "w", acquire=other) is True


def test_renewal_keeps_a_ttl_session_alive(sim_consul: ConsulTarget) -> None:
    """Sim-only (time-scaled TTL)."""
    c, key = sim_consul.client(), sim_consul.key("renewed")
    holder = sim_consul.session(ttl=10)
    c.kv.put(key, "v", acquire=holder)
    for _ in range(10):
        sim_consul.clock.sleep(3)
        assert c.session.renew(holder) is not None
    assert c.kv.get(key)[1]["Session"] == holder


def test_ttl_expiry_with_behavior_delete_deletes_the_key(sim_consul: ConsulTarget) -> None:
    """Sim-only (time-scaled TTL)."""
    c, key = sim_consul.client(), sim_consul.key("gone")
    holder = sim_consul.session(ttl=10, behavior="delete")
    c.kv.put(key, "v", acquire=holder)
    sim_consul.clock.sleep(10.5)
    assert c.kv.get(key)[1] is None


def test_sim_ttl_multiplier_two_expires_between_one_and_two_ttls() -> None:
    """Sim-only: the sim's ``session_ttl_multiplier=2`` reproduces Consul's up-to-2x TTL grace (over HTTP)."""
    clock = Clock(scale=20)
    with ConsulServer(ConsulState(clock, session_ttl_multiplier=2.0)) as server:
        c = make_client(server.address)
        start = clock.monotonic()
        holder = c.session.create(ttl=10, lock_delay=0)
        c.kv.put("grace", "v", acquire=holder)
        released = _released_at(c, clock, "grace", holder) - start
        assert 10 <= released <= 20 + 3, f"released {released:.1f}s after a 10s-TTL session began"
        assert released >= 20 - 0.5, "the sim's multiplier 2 grants the whole 2x grace"


def test_sim_records_when_a_session_ttl_ran_out_not_when_the_expiry_was_applied() -> None:
    """Sim-only: expiries apply at the next read or write; ``session_expired_at`` is the TTL deadline."""
    clock = Clock(scale=20)
    state = ConsulState(clock, session_ttl_multiplier=2.0)
    with ConsulServer(state) as server:
        c = make_client(server.address)
        holder = c.session.create(ttl=10, lock_delay=0)
        before = clock.monotonic()
        c.session.renew(holder)
        after = clock.monotonic()
        clock.sleep(25.0)  # past the deadline, with no request meanwhile
        assert state.session_expired_at(holder) is not None  # this read applies the expiry
        expired = state.session_expired_at(holder) or 0.0
        assert before <= expired - 20 <= after, (before, expired, after)  # the renewal's deadline, 2 x TTL
        assert state.session_expired_at(c.session.create(ttl=10)) is None


def test_critical_serf_health_invalidates_the_nodes_sessions(sim_consul: ConsulTarget) -> None:
    """Sim-only: node health is driven in-process."""
    c, key, state = sim_consul.client(), sim_consul.key("node-lock"), sim_consul.state
    state.register_node("worker-1", "10.0.0.1")
    resp = sim_consul.http("PUT", "/v1/session/create", json={"Node": "worker-1", "LockDelay": "0s"})
    holder = resp.json()["ID"]
    c.kv.put(key, "v", acquire=holder)
    state.set_node_health("worker-1", CheckStatus.WARNING)
    assert c.kv.get(key)[1]["Session"] == holder
    state.set_node_health("worker-1", CheckStatus.CRITICAL, "Agent not live or unreachable")
    assert "Session" not in c.kv.get(key)[1]
    assert c.session.info(holder)[1] is None
    resp = sim_consul.http("PUT", "/v1/session/create", json={"Node": "worker-1"})
    assert resp.status_code == 500 and resp.text == "Check 'serfHealth' is in critical state"


def test_critical_or_removed_service_check_invalidates_bound_sessions(sim_consul: ConsulTarget) -> None:
    """Sim-only: services are registered in-process."""
    c, state = sim_consul.client(), sim_consul.state
    state.register_node("worker-2")
    state.register_service(
        "worker-2", "web-1", "web", 8080, check_id="web-1-check", status=CheckStatus.PASSING
    )
    body = {"Node": "worker-2", "NodeChecks": ["serfHealth"], "ServiceChecks": [{"ID": "web-1-check"}]}
    first = sim_consul.http("PUT", "/v1/session/create", json=body).json()["ID"]
    second = sim_consul.http("PUT", "/v1/session/create", json=body).json()["ID"]
    state.set_check_status("web-1-check", CheckStatus.CRITICAL)
    assert c.session.info(first)[1] is None
    state.set_check_status("web-1-check", CheckStatus.PASSING)
    third = sim_consul.http("PUT", "/v1/session/create", json=body).json()["ID"]
    assert c.session.info(second)[1] is None
    state.deregister_service("web-1")
    assert c.session.info(third)[1] is None


def test_paused_renewals_fail_and_the_session_expires(sim_consul: ConsulTarget) -> None:
    """Sim-only fault: a partitioned holder cannot renew and loses its lock after the TTL."""
    c, key = sim_consul.client(), sim_consul.key("partitioned")
    holder = sim_consul.session(ttl=10)
    c.kv.put(key, "v", acquire=holder)
    sim_consul.sim.faults.pause_session_renewals(holder)  # type: ignore[union-attr]
    with pytest.raises(ConsulException, match="500"):
        c.session.renew(holder)
    deadline = time.monotonic() + 2
    while "Session" in c.kv.get(key)[1] and time.monotonic() < deadline:
        sim_consul.clock.sleep(2)
    assert "Session" not in c.kv.get(key)[1]
    sim_consul.sim.faults.resume_session_renewals(holder)  # type: ignore[union-attr]
    assert sim_consul.http("PUT", f"/v1/session/renew/{holder}").status_code == 404
