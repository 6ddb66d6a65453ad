"""Blocking queries: wake on a change of what they read (not on any index move), time out after the
wait, one request per change, headers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from consul_contract import ConsulTarget

from shepard_lib.clock import Clock
from shepard_lib.model import CheckStatus
from shepard_lib.sim.blocking import CONSUL_WAIT
from shepard_lib.sim.consul import ConsulServer, ConsulState


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result lands in the returned list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def wait_until_blocked(target: ConsulTarget, count: int = 1) -> None:
    """Return once ``count`` blocking queries wait in the sim; a real Consul shows no such thing, so
    there it waits one real second."""
    if target.sim is None:
        time.sleep(1)
        return
    deadline = time.monotonic() + 30
    while target.state.blocked_reads < count:
        assert time.monotonic() < deadline, f"fewer than {count} queries ever blocked"
        time.sleep(0.005)


def test_blocking_get_returns_when_the_key_changes(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("watched")
    c.kv.put(key, "v1")
    index, _ = c.kv.get(key)
    thread, out = in_thread(lambda: c.kv.get(key, index=index, wait="60s"))
    consul_target.clock.sleep(1)
    assert thread.is_alive(), "returned before any change"
    consul_target.client().kv.put(key, "v2")
    thread.join(timeout=10)
    new_index, entry = out[0]
    assert entry["Value"] == b"v2"
    assert int(new_index) > int(index)


def test_blocking_get_on_a_missing_key_wakes_when_it_is_created(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("later")
    index, value = c.kv.get(key)
    assert value is None
    thread, out = in_thread(lambda: c.kv.get(key, index=index, wait="60s"))
    consul_target.clock.sleep(1)
    consul_target.client().kv.put(key, "now")
    thread.join(timeout=10)
    assert out[0][1]["Value"] == b"now"


def test_blocking_get_of_a_missing_key_sleeps_through_writes_of_other_keys(
    consul_target: ConsulTarget,
) -> None:
    """A missing key's answer carries the KV table's index, so a query whose index is behind returns
    at once; but a blocked one is woken by that key only. In Consul's radix tree the watch of a
    missing key is the node nearest to it (``<p>w/`` here, made by its two neighbours), which writes
    of ``<p>o`` do not touch. A write or delete below that node (``<p>w/b``), or one that reshapes it,
    would wake it and, the index being the table's, answer: the sim does not model that."""
    c, p = consul_target.client(), consul_target.key()
    for name in ("w/a", "w/b", "o"):
        c.kv.put(p + name, "x")
    key = p + "w/missing"
    index, value = c.kv.get(key)
    assert value is None
    thread, out = in_thread(lambda: c.kv.get(key, index=index, wait="60s"))
    wait_until_blocked(consul_target)
    writer = consul_target.client()
    writer.kv.put(p + "o", "y")
    writer.kv.put(p + "o", "z")
    behind_index, behind = writer.kv.get(key, index=index, wait="60s")
    assert behind is None and int(behind_index) > int(index), "an index behind the table's returns at once"
    assert thread.is_alive(), "woken by writes of other keys"
    writer.kv.put(key, "now")
    thread.join(timeout=10)
    new_index, entry = out[0]
    assert entry is not None and entry["Value"] == b"now"
    assert int(new_index) > int(behind_index)


def test_a_query_woken_below_its_index_blocks_on_and_answers_the_last_read(sim_consul: ConsulTarget) -> None:
    """Sim-only (the loop of ``blockingQuery``, with an index ahead of the data): a change of the key
    re-runs the query, whose index is still not above the client's, so it blocks on and, at the end of
    the wait, answers what it read last."""
    c, key = sim_consul.client(), sim_consul.key("ahead")
    c.kv.put(key, "v1")
    ahead = int(c.kv.get(key)[0]) + 1000
    start = sim_consul.clock.monotonic()
    thread, out = in_thread(lambda: c.kv.get(key, index=ahead, wait="20s"))
    wait_until_blocked(sim_consul)
    sim_consul.client().kv.put(key, "v2")
    thread.join(timeout=30)
    assert sim_consul.clock.monotonic() - start >= 20, "answered before the wait ended"
    index, entry = out[0]
    assert entry["Value"] == b"v2" and int(index) == entry["ModifyIndex"] < ahead


def test_blocking_recurse_and_keys_sleep_through_writes_beside_the_prefix(
    consul_target: ConsulTarget,
) -> None:
    """``?recurse`` and ``?keys`` watch every entry under the prefix, and only those: ``?keys`` also
    wakes when a value under the prefix changes, with the same names and a new index."""
    c, p = consul_target.client(), consul_target.key()
    prefix = p + "slots/"
    c.kv.put(p + "other", "x")
    c.kv.put(prefix + "0", "held")
    index, _ = c.kv.get(prefix, recurse=True)
    keys_index, _ = c.kv.get(prefix, keys=True)
    recurse, recurse_out = in_thread(lambda: c.kv.get(prefix, recurse=True, index=index, wait="60s"))
    keys, keys_out = in_thread(
        lambda: consul_target.client().kv.get(prefix, keys=True, index=keys_index, wait="60s")
    )
    wait_until_blocked(consul_target, 2)
    writer = consul_target.client()
    writer.kv.put(p + "other", "y")
    writer.kv.put(p + "slots", "beside")  # a key the prefix "slots/" does not cover
    assert recurse.is_alive() and keys.is_alive(), "woken by writes beside the prefix"
    writer.kv.put(prefix + "0", "released")
    recurse.join(timeout=10)
    keys.join(timeout=10)
    (recurse_index, entries), (new_keys_index, names) = recurse_out[0], keys_out[0]
    assert [(e["Key"], e["Value"]) for e in entries] == [(prefix + "0", b"released")]
    assert names == [prefix + "0"] and int(new_keys_index) > int(keys_index)
    assert int(recurse_index) == int(new_keys_index) == entries[0]["ModifyIndex"]


def test_blocking_session_info_sleeps_through_other_sessions(consul_target: ConsulTarget) -> None:
    """Session info reports the sessions table's index but watches only its session."""
    c = consul_target.client()
    session_id = consul_target.session()
    index, _ = c.session.info(session_id)
    thread, out = in_thread(lambda: consul_target.client().session.info(session_id, index=index, wait="60s"))
    wait_until_blocked(consul_target)
    consul_target.session()  # another one
    behind_index, behind = c.session.info(session_id, index=index, wait="60s")
    assert behind is not None and behind["ID"] == session_id and int(behind_index) > int(index)
    assert thread.is_alive(), "woken by another session"
    c.session.destroy(session_id)
    thread.join(timeout=10)
    assert out[0][1] is None and int(out[0][0]) > int(behind_index)


def test_blocking_health_node_wakes_only_for_its_own_checks(sim_consul: ConsulTarget) -> None:
    """Sim-only (checks are driven in-process). ``NodeChecks`` reports the checks table's index, so
    a query whose index is behind returns at once, but a blocked one wakes for its node's checks only
    (Consul's ``catalogListChecksByNode`` watch)."""
    state, c = sim_consul.state, sim_consul.client()
    for node in ("a", "b"):
        state.register_node(node)
        state.register_service(node, f"api-{node}", "api", 9000, check_id=f"api-{node}-http")
    index, checks = c.health.node("a")
    thread, out = in_thread(lambda: c.health.node("a", index=index, wait="60s"))
    wait_until_blocked(sim_consul)
    state.set_check_status("api-b-http", CheckStatus.PASSING, "HTTP 200")
    state.set_node_health("b", CheckStatus.CRITICAL)
    state.register_service("b", "db-b", "db", 5432, check_id="db-b-tcp")
    behind_index, behind = sim_consul.client().health.node("a", index=index, wait="60s")
    assert behind == checks and int(behind_index) > int(index), "an index behind the table's returns at once"
    assert thread.is_alive(), "woken by another node's checks"
    state.set_check_status("api-a-http", CheckStatus.PASSING, "HTTP 200")
    thread.join(timeout=10)
    new_index, new_checks = out[0]
    assert [(ch["CheckID"], ch["Status"]) for ch in new_checks] == [
        ("serfHealth", "passing"),
        ("api-a-http", "passing"),
    ]
    assert int(new_index) > int(behind_index)


def test_a_blocked_health_node_query_that_expires_answers_with_its_own_index(
    sim_consul: ConsulTarget,
) -> None:
    """Sim-only. Woken by nothing it watches, the query answers at the end of its wait what it read
    first, with that index (not above the client's), though the checks table's index moved."""
    state, c = sim_consul.state, sim_consul.client()
    for node in ("a", "b"):
        state.register_node(node)
    index, checks = c.health.node("a")
    thread, out = in_thread(lambda: c.health.node("a", index=index, wait="30s"))
    wait_until_blocked(sim_consul)
    state.set_node_health("b", CheckStatus.CRITICAL)
    thread.join(timeout=30)
    assert out == [(index, checks)]
    assert int(c.health.node("a")[0]) > int(index)


def test_blocking_health_checks_wake_only_for_the_services_checks(sim_consul: ConsulTarget) -> None:
    """Sim-only. ``ServiceChecks`` watches the checks of that service: not another service's on the
    same node, nor the node's own ``serfHealth``."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("n1")
    state.register_service("n1", "api-1", "api", 9000, check_id="api-1-http")
    state.register_service("n1", "db-1", "db", 5432, check_id="db-1-tcp")
    index, checks = c.health.checks("api")
    thread, out = in_thread(lambda: c.health.checks("api", index=index, wait="60s"))
    wait_until_blocked(sim_consul)
    state.set_check_status("db-1-tcp", CheckStatus.PASSING)
    state.set_check_status("serfHealth", CheckStatus.WARNING, node="n1")
    state.deregister_service("db-1")
    behind_index, behind = sim_consul.client().health.checks("api", index=index, wait="60s")
    assert behind == checks and int(behind_index) > int(index), "an index behind the table's returns at once"
    assert thread.is_alive(), "woken by another service's checks"
    state.set_check_status("api-1-http", CheckStatus.PASSING, "HTTP 200")
    thread.join(timeout=10)
    new_index, new_checks = out[0]
    assert [(ch["CheckID"], ch["Status"]) for ch in new_checks] == [("api-1-http", "passing")]
    assert int(new_index) > int(index)


def test_blocking_recurse_and_keys_wake_on_a_new_key_under_the_prefix(consul_target: ConsulTarget) -> None:
    c, prefix = consul_target.client(), consul_target.key("slots/")
    c.kv.put(prefix + "0", "held")
    index, _ = c.kv.get(prefix, recurse=True)
    keys_index, _ = c.kv.get(prefix, keys=True)
    recurse, recurse_out = in_thread(lambda: c.kv.get(prefix, recurse=True, index=index, wait="60s"))
    keys, keys_out = in_thread(
        lambda: consul_target.client().kv.get(prefix, keys=True, index=keys_index, wait="60s")
    )
    consul_target.clock.sleep(1)
    consul_target.client().kv.put(prefix + "1", "held")
    recurse.join(timeout=10)
    keys.join(timeout=10)
    assert [e["Key"] for e in recurse_out[0][1]] == [prefix + "0", prefix + "1"]
    assert keys_out[0][1] == [prefix + "0", prefix + "1"]


def test_blocking_get_times_out_with_the_same_index(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("quiet")
    c.kv.put(key, "v")
    index, _ = c.kv.get(key)
    start = consul_target.clock.monotonic()
    new_index, entry = c.kv.get(key, index=index, wait="2s")
    elapsed = consul_target.clock.monotonic() - start
    assert new_index == index and entry["Value"] == b"v"
    assert 2 <= elapsed < 2 * (1 + 1 / CONSUL_WAIT.jitter_fraction) + consul_target.clock.cluster(0.5)


def test_every_read_answer_carries_the_query_meta_headers(consul_target: ConsulTarget) -> None:
    key = consul_target.key("meta")
    consul_target.client().kv.put(key, "v")
    for path in (
        f"/v1/kv/{key}",
        f"/v1/kv/{key}x",
        f"/v1/kv/{key}?recurse",
        f"/v1/kv/{key}?keys",
        "/v1/session/list",
        "/v1/health/service/consul",
        "/v1/catalog/nodes",
    ):
        resp = consul_target.http("GET", path)
        assert int(resp.headers["X-Consul-Index"]) >= 1, path
        assert resp.headers["X-Consul-KnownLeader"] == "true", path
        assert resp.headers["X-Consul-LastContact"].isdigit(), path


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ("index=abc", "Invalid index"),
        ("index=1&wait=forever", "Invalid wait time"),
        ("stale&consistent", "Cannot specify ?stale with ?consistent, conflicting semantics."),
    ],
)
def test_bad_query_options_are_400(consul_target: ConsulTarget, query: str, text: str) -> None:
    resp = consul_target.http("GET", f"/v1/kv/{consul_target.key('x')}?{query}")
    assert resp.status_code == 400 and resp.text == text


def test_consistent_and_stale_reads_are_accepted(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("modes")
    c.kv.put(key, "v")
    assert c.kv.get(key, consistency="consistent")[1]["Value"] == b"v"
    assert c.kv.get(key, consistency="stale")[1]["Value"] == b"v"


def test_a_waiting_client_makes_one_request_per_change(sim_consul: ConsulTarget) -> None:
    """Sim-only (request counts): a watch loop issues exactly one GET per change, no busy loop."""
    c, key = sim_consul.client(), sim_consul.key("counted")
    c.kv.put(key, "0")
    index, _ = c.kv.get(key)
    seen: list[bytes] = []

    def watch() -> None:
        nonlocal index
        while len(seen) < 3:
            index, entry = c.kv.get(key, index=index, wait="300s")
            seen.append(entry["Value"])

    before = sim_consul.requests_count("/v1/kv", "GET")
    thread, _ = in_thread(watch)
    writer = sim_consul.client()
    for n in (1, 2, 3):
        sim_consul.clock.sleep(5)
        writer.kv.put(sim_consul.key("unrelated"), str(n))  # must not wake the watch
        writer.kv.put(key, str(n))
    thread.join(timeout=10)
    assert seen == [b"1", b"2", b"3"]
    assert sim_consul.requests_count("/v1/kv", "GET") - before == 3


def test_a_wait_that_expires_costs_exactly_one_request(sim_consul: ConsulTarget) -> None:
    """Sim-only (request counts)."""
    c, key = sim_consul.client(), sim_consul.key("idle")
    c.kv.put(key, "v")
    index, _ = c.kv.get(key)
    before = sim_consul.requests_count("/v1/kv", "GET")
    c.kv.put(sim_consul.key("other"), "x")
    assert c.kv.get(key, index=index, wait="3s")[0] == index
    assert sim_consul.requests_count("/v1/kv", "GET") - before == 1


def test_sim_wait_rule_defaults_caps_and_jitters_by_at_most_a_sixteenth(sim_consul: ConsulTarget) -> None:
    """A test of the sim, not of Consul: the sim's copy of ``blockingQuery``'s timeout rule, read from
    its internals. What a client sees over HTTP (sim and real) is
    ``test_blocking_get_times_out_with_the_same_index``."""
    ctx = sim_consul.sim._ctx  # type: ignore[union-attr]
    scale = sim_consul.clock.scale
    assert (CONSUL_WAIT.default, CONSUL_WAIT.maximum, CONSUL_WAIT.jitter_fraction) == (300.0, 600.0, 16)
    for wait, base in ((0.0, 300.0), (-1.0, 300.0), (30.0, 30.0), (3600.0, 600.0)):
        samples = [ctx.query_timeout_real(wait) * scale for _ in range(200)]
        assert all(base <= s <= base * (1 + 1 / 16) + 1e-6 for s in samples), wait
        assert max(samples) > base  # the stagger is really applied


def test_sim_wait_staggers_are_reproducible_from_the_server_seed() -> None:
    """A test of the sim: two servers with one seed draw the same staggers, another seed draws others."""

    def staggers(seed: int) -> list[float]:
        server = ConsulServer(ConsulState(Clock(), seed=seed), seed=seed)
        try:
            return [server._ctx.query_timeout_real(60.0) for _ in range(8)]
        finally:
            server.stop()

    assert staggers(11) == staggers(11)
    assert staggers(11) != staggers(12)


def test_session_info_blocks_until_the_session_is_destroyed(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    session_id = consul_target.session()
    index, _ = c.session.info(session_id)
    thread, out = in_thread(lambda: consul_target.client().session.info(session_id, index=index, wait="60s"))
    consul_target.clock.sleep(1)
    c.session.destroy(session_id)
    thread.join(timeout=10)
    assert out[0][1] is None and int(out[0][0]) > int(index)


def test_health_service_blocks_until_a_check_changes(sim_consul: ConsulTarget) -> None:
    """Sim-only: checks are driven in-process."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("w1")
    state.register_service("w1", "api-1", "api", 9000, check_id="api-1-http")
    index, nodes = c.health.service("api", passing=True)
    assert nodes == []
    thread, out = in_thread(lambda: c.health.service("api", index=index, wait="60s", passing=True))
    sim_consul.clock.sleep(1)
    assert thread.is_alive()
    state.set_check_status("api-1-http", CheckStatus.PASSING, "HTTP 200")
    thread.join(timeout=10)
    assert [n["Service"]["ID"] for n in out[0][1]] == ["api-1"]


def test_in_process_wait_for_change_wakes_on_a_write_and_times_out(sim_consul: ConsulTarget) -> None:
    """Sim-only: the in-process hook the Nomad sim's template watcher uses."""
    state = sim_consul.state
    index = state.index
    start = time.monotonic()
    assert state.wait_for_change(index, 0.05) == index
    assert time.monotonic() - start >= 0.05
    thread, out = in_thread(lambda: state.wait_for_change(index, 10))
    state.kv_put("tpl/key", b"v")
    thread.join(timeout=5)
    assert out == [index + 1]
    state.register_node("n1")
    index = state.index
    thread, out = in_thread(lambda: state.wait_for_change(index, 10))
    wait_until_blocked(sim_consul)
    state.set_node_health("n1", CheckStatus.CRITICAL)  # not a KV write: it watches every commit
    thread.join(timeout=5)
    assert out == [index + 1]
