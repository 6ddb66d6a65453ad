"""Health, catalog, agent and status endpoints; the sim's faults and counts (ACLs: test_consul_acl)."""

from __future__ import annotations

import time

import pytest
from consul_contract import ConsulTarget, make_client

from shepard_lib.model import CheckStatus
from shepard_lib.sim.consul.catalog import Catalog


def test_agent_self_and_leader(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    me = c.agent.self()
    assert me["Config"]["NodeName"] and me["Config"]["Datacenter"]
    assert me["Member"]["Name"] == me["Config"]["NodeName"]
    assert c.status.leader().endswith(":8300")


def test_health_service_lists_instances_with_node_and_service_checks(sim_consul: ConsulTarget) -> None:
    """Sim-only: services are registered in-process by the Nomad sim."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("n1", "10.0.0.1")
    state.register_node("n2", "10.0.0.2")
    state.register_service(
        "n1", "web-a", "web", 80, tags=("v1",), check_id="web-a-c", status=CheckStatus.PASSING
    )
    state.register_service("n2", "web-b", "web", 80, check_id="web-b-c", status=CheckStatus.WARNING)
    _, nodes = c.health.service("web")
    assert [(n["Node"]["Node"], n["Node"]["Address"], n["Service"]["ID"]) for n in nodes] == [
        ("n1", "10.0.0.1", "web-a"),
        ("n2", "10.0.0.2", "web-b"),
    ]
    assert [ch["CheckID"] for ch in nodes[0]["Checks"]] == ["serfHealth", "web-a-c"]
    assert nodes[0]["Service"]["Tags"] == ["v1"] and nodes[0]["Service"]["Port"] == 80
    _, passing = c.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in passing] == ["web-a"]
    state.set_node_health("n1", CheckStatus.CRITICAL)
    assert c.health.service("web", passing=True)[1] == []


def test_health_checks_and_node_checks(sim_consul: ConsulTarget) -> None:
    """Sim-only."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("n1")
    state.register_service("n1", "db-1", "db", 5432, check_id="db-1-tcp", check_name="tcp")
    _, checks = c.health.checks("db")
    summary = [(ch["CheckID"], ch["Status"], ch["ServiceName"]) for ch in checks]
    assert summary == [("db-1-tcp", "critical", "db")]
    state.set_check_status("db-1-tcp", CheckStatus.PASSING, "connected")
    _, checks = c.health.checks("db")
    assert checks[0]["Status"] == "passing" and checks[0]["Output"] == "connected"
    _, node_checks = c.health.node("n1")
    assert [ch["CheckID"] for ch in node_checks] == ["serfHealth", "db-1-tcp"]
    state.deregister_service("db-1")
    assert c.health.checks("db")[1] == []
    with pytest.raises(ValueError, match="ambiguous"):
        state.set_check_status("serfHealth", CheckStatus.PASSING)


def test_the_sim_builds_a_health_answer_once_per_change_of_what_it_lists(
    sim_consul: ConsulTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sim-only, the simulator's cost: every waiter of a service wakes at each change of it and is
    sent the same answer, built once (at 2,000 instances, building it per waiter was most of the
    sim's CPU); a change elsewhere in the catalog does not rebuild it."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("n1")
    state.register_service("n1", "db-1", "db", 5432, check_id="db-1-tcp", check_name="tcp")
    built: list[str] = []
    real = Catalog.service_checks
    monkeypatch.setattr(Catalog, "service_checks", lambda self, name: built.append(name) or real(self, name))
    answers = [c.health.checks("db")[1] for _ in range(3)]
    assert built == ["db"] and answers[0] == answers[1] == answers[2]
    state.register_node("n2")  # another node, its serfHealth: the same answer, not rebuilt
    state.register_service("n2", "web-1", "web", 80, check_id="web-1-http")
    assert c.health.checks("db")[1] == answers[0] and built == ["db"]
    state.set_check_status("db-1-tcp", CheckStatus.PASSING, "connected")
    assert c.health.checks("db")[1][0]["Status"] == "passing" and built == ["db", "db"]


def test_the_sim_builds_a_node_checks_answer_once_per_change_of_that_nodes_checks(
    sim_consul: ConsulTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sim-only, the simulator's cost: ``/v1/health/node/<n>`` is rebuilt only when one of ``n``'s
    checks changes (a blocked waiter of every node is re-run at every commit of the cluster)."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("n1")
    state.register_node("n2")
    state.register_service("n1", "db-1", "db", 5432, check_id="db-1-tcp")
    state.register_service("n2", "db-2", "db", 5432, check_id="db-2-tcp")
    built: list[str] = []
    real = Catalog.node_checks
    monkeypatch.setattr(Catalog, "node_checks", lambda self, node: built.append(node) or real(self, node))
    first = c.health.node("n1")[1]
    state.set_check_status("db-2-tcp", CheckStatus.PASSING)
    state.deregister_service("db-2")
    state.deregister_node("n2")
    assert c.health.node("n1")[1] == first and built == ["n1"]
    state.set_check_status("db-1-tcp", CheckStatus.PASSING)
    assert [ch["Status"] for ch in c.health.node("n1")[1]] == ["passing", "passing"]
    state.deregister_service("db-1")
    assert [ch["CheckID"] for ch in c.health.node("n1")[1]] == ["serfHealth"]
    state.deregister_node("n1")
    assert c.health.node("n1")[1] == [] and built == ["n1", "n1", "n1", "n1"]


def test_catalog_nodes_and_services(sim_consul: ConsulTarget) -> None:
    """Sim-only."""
    state, c = sim_consul.state, sim_consul.client()
    state.register_node("n1", "10.0.0.1")
    state.register_service("n1", "s1", "cache", 6379, tags=("b", "a"))
    _, nodes = c.catalog.nodes()
    assert {n["Node"] for n in nodes} == {state.server_node, "n1"}
    _, services = c.catalog.services()
    assert services == {"cache": ["a", "b"], "consul": []}
    state.deregister_node("n1")
    assert {n["Node"] for n in c.catalog.nodes()[1]} == {state.server_node}
    with pytest.raises(ValueError, match="not registered"):
        state.register_service("n1", "s1", "cache", 6379)


def test_error_rate_fails_requests_deterministically_by_seed(sim_consul: ConsulTarget) -> None:
    """Sim-only fault."""
    faults = sim_consul.sim.faults  # type: ignore[union-attr]
    faults.error_rate = 1.0
    resp = sim_consul.http("GET", "/v1/kv/k")
    assert (resp.status_code, resp.text) == (500, "rpc error making call: EOF")
    assert sim_consul.http("PUT", "/v1/kv/k", data=b"v").status_code == 500
    faults.error_rate = 0.0
    assert sim_consul.http("GET", "/v1/kv/k").status_code == 404  # the failed PUT applied nothing

    def pattern() -> list[int]:
        from shepard_lib.sim.consul import Faults

        f = Faults(seed=3)
        f.error_rate = 0.5
        return [int(f.draw_error()) for _ in range(32)]

    first = pattern()
    assert first == pattern() and 0 < sum(first) < 32


def test_latency_delays_every_request(sim_consul: ConsulTarget) -> None:
    """Sim-only fault: latency is in cluster seconds."""
    sim_consul.sim.faults.latency = 5.0  # type: ignore[union-attr]  # 0.1 real s at scale 50
    start = time.monotonic()
    sim_consul.http("GET", "/v1/kv/k")
    assert time.monotonic() - start >= sim_consul.clock.real(5.0)


def test_leader_loss_fails_writes_and_consistent_reads_but_serves_stale(sim_consul: ConsulTarget) -> None:
    """Sim-only fault."""
    sim_consul.client().kv.put(sim_consul.key("k"), "v")
    sim_consul.sim.faults.leader_lost = True  # type: ignore[union-attr]
    for method, path in (("PUT", "/v1/kv/x"), ("GET", "/v1/kv/x"), ("PUT", "/v1/session/create")):
        resp = sim_consul.http(method, path)
        assert (resp.status_code, resp.text) == (500, "No cluster leader"), path
    resp = sim_consul.http("GET", f"/v1/kv/{sim_consul.key('k')}?stale")
    assert resp.status_code == 200 and resp.headers["X-Consul-KnownLeader"] == "false"
    assert sim_consul.client().status.leader() == ""
    sim_consul.sim.faults.leader_lost = False  # type: ignore[union-attr]
    assert sim_consul.http("GET", "/v1/kv/x").status_code == 404


def test_sim_request_counts_by_endpoint_and_method_and_reset(sim_consul: ConsulTarget) -> None:
    """Sim-only endpoint ``/_sim/requests``."""
    sim_consul.http("DELETE", "/_sim/requests")
    c = sim_consul.client()
    c.kv.put(sim_consul.key("a"), "1")
    c.kv.get(sim_consul.key("a"))
    c.kv.get(sim_consul.key("a"))
    session_id = sim_consul.session()
    c.session.renew(session_id)
    counts = sim_consul.http("GET", "/_sim/requests").json()
    assert counts == {
        "/v1/kv": {"GET": 2, "PUT": 1},
        "/v1/session/create": {"PUT": 1},
        "/v1/session/renew": {"PUT": 1},
    }
    sim_consul.http("DELETE", "/_sim/requests")
    assert sim_consul.http("GET", "/_sim/requests").json() == {}
    assert sim_consul.http("GET", "/_sim/requests?detail").json() == {}


def test_sim_request_counts_by_shape(sim_consul: ConsulTarget) -> None:
    """Sim-only ``/_sim/requests?detail``: method, key or txn ops, the flags that matter, the status."""
    sim_consul.http("DELETE", "/_sim/requests")
    key = sim_consul.key("a")
    c = sim_consul.client()
    c.kv.put(key, "1")
    _, entry = c.kv.get(key, consistency="consistent")
    c.kv.get(key, index=entry["ModifyIndex"], wait="10ms")
    c.kv.get(sim_consul.key("missing"))
    txn = [{"KV": {"Verb": "cas", "Key": key, "Value": "", "Index": 1}}]
    assert sim_consul.http("PUT", "/v1/txn", json=txn).status_code == 409
    assert sim_consul.http("GET", "/_sim/requests?detail").json() == {
        f"PUT /v1/kv/{key} 200": 1,
        f"GET /v1/kv/{key} ?consistent 200": 1,
        f"GET /v1/kv/{key} ?index 200": 1,
        f"GET /v1/kv/{sim_consul.key('missing')} 404": 1,
        f"PUT /v1/txn [cas {key}] 409": 1,
    }


def test_unknown_endpoint_is_404(consul_target: ConsulTarget) -> None:
    assert consul_target.http("GET", "/v1/no-such-endpoint").status_code == 404


def test_stop_ends_pending_blocking_queries(sim_consul: ConsulTarget) -> None:
    """Sim-only: stopping the server must not leave clients hanging for the whole wait."""
    from shepard_lib.sim.consul import ConsulServer

    server = ConsulServer(sim_consul.state).start()
    client = make_client(server.address)
    index, _ = client.kv.get("k")
    import threading

    errors: list[BaseException] = []

    def wait() -> None:
        try:
            client.kv.get("k", index=index, wait="600s")
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - start < 2


def test_lost_reply_applies_the_write_but_answers_500(sim_consul: ConsulTarget) -> None:
    """Sim-only fault: the ambiguous failure a client must not read as "not applied"."""
    key = sim_consul.key("ambiguous")
    sim_consul.sim.faults.lost_reply_rate = 1.0  # type: ignore[union-attr]
    resp = sim_consul.http("PUT", f"/v1/kv/{key}", data=b"applied")
    assert (resp.status_code, resp.text) == (500, "rpc error making call: EOF")
    sim_consul.sim.faults.lost_reply_rate = 0.0  # type: ignore[union-attr]
    assert sim_consul.client().kv.get(key)[1]["Value"] == b"applied"


def test_another_datacenter_has_no_path(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("GET", f"/v1/kv/{consul_target.key('k')}?dc=no-such-dc-shepard")
    assert (resp.status_code, resp.text) == (500, "No path to datacenter")
