"""ACL tokens, fault injection and the simulator's own endpoints (sim only)."""

from __future__ import annotations

import time

import pytest
import requests
from nomad.api.exceptions import URLNotAuthorizedNomadException
from nomad_contract import SIM_SCALE, SIM_TOKEN, NomadTarget, python_nomad


def test_without_a_token_every_v1_request_is_denied(sim_acl_target: NomadTarget) -> None:
    with pytest.raises(URLNotAuthorizedNomadException) as err:
        python_nomad(sim_acl_target.address, None).nodes.get_nodes()
    assert err.value.nomad_resp.text == "Permission denied"


def test_a_wrong_token_is_not_found(sim_acl_target: NomadTarget) -> None:
    resp = requests.get(sim_acl_target.address + "/v1/jobs", headers={"X-Nomad-Token": "wrong"}, timeout=10)
    assert (resp.status_code, resp.text) == (403, "ACL token not found")
    assert "wrong" not in resp.text


def test_the_token_works_in_either_header(sim_acl_target: NomadTarget) -> None:
    assert python_nomad(sim_acl_target.address, SIM_TOKEN).jobs.get_jobs()
    bearer = {"Authorization": f"Bearer {SIM_TOKEN}"}
    assert requests.get(sim_acl_target.address + "/v1/nodes", headers=bearer, timeout=10).status_code == 200
    # Nomad's parseToken: the scheme in any case, only the first word after it is the token.
    bearer = {"Authorization": f"bearer {SIM_TOKEN} trailing-words"}
    assert requests.get(sim_acl_target.address + "/v1/nodes", headers=bearer, timeout=10).status_code == 200
    # Nomad reads no ?token= (that is Consul's), so this request has no token at all.
    resp = requests.get(sim_acl_target.address + "/v1/nodes", params={"token": SIM_TOKEN}, timeout=10)
    assert (resp.status_code, resp.text) == (403, "Permission denied")


def test_error_rate_fails_requests_with_500(sim_target: NomadTarget) -> None:
    sim_target.cluster().nomad_faults.error_rate = 1.0
    resp = sim_target.get("/v1/nodes")
    assert resp.status_code == 500
    sim_target.cluster().nomad_faults.reset()
    assert sim_target.get("/v1/nodes").status_code == 200


def test_leader_loss_answers_no_cluster_leader(sim_target: NomadTarget) -> None:
    sim_target.cluster().nomad_faults.leader_lost = True
    resp = sim_target.get("/v1/allocations")
    assert (resp.status_code, resp.text) == (500, "No cluster leader")


def test_latency_delays_each_request_in_cluster_seconds(sim_target: NomadTarget) -> None:
    sim_target.cluster().nomad_faults.latency = 10.0
    started = time.monotonic()
    assert sim_target.get("/v1/nodes").status_code == 200
    assert time.monotonic() - started >= 10.0 / SIM_SCALE * 0.9


def test_node_down_marks_node_and_loses_its_allocations(sim_target: NomadTarget) -> None:
    sim = sim_target.cluster()
    node_id = sim.nomad.node("n2").id
    before = sim_target.client.node.get_node(node_id)
    sim.clock.sleep(2)  # StatusUpdatedAt is in whole seconds: 2 cluster seconds make it strictly later
    down_from = sim.clock.time()
    sim.nomad.set_node_down("n2")
    down_by = sim.clock.time()
    after = sim_target.client.node.get_node(node_id)
    assert after["Status"] == "down" and after["ModifyIndex"] > before["ModifyIndex"]
    assert after["StatusUpdatedAt"] > before["StatusUpdatedAt"]
    assert int(down_from) <= after["StatusUpdatedAt"] <= down_by, "StatusUpdatedAt is not when it went down"
    lost = [a for a in sim_target.client.node.get_allocations(node_id)]
    assert lost and {a["ClientStatus"] for a in lost} == {"lost"}
    assert {a["DesiredStatus"] for a in lost} == {"stop"}
    checks = requests.get(f"{sim.consul_addr}/v1/health/node/n2", timeout=10).json()
    assert [c["Status"] for c in checks if c["CheckID"] == "serfHealth"] == ["critical"]


def test_stopping_a_job_completes_its_allocations(sim_target: NomadTarget) -> None:
    sim = sim_target.cluster()
    sim.nomad.stop_job("web")
    job = sim_target.client.job.get_job("web")
    assert job["Stop"] is True and job["Status"] == "dead"
    allocs = sim_target.client.job.get_allocations("web")
    assert {a["ClientStatus"] for a in allocs} == {"complete"}
    assert {a["DesiredStatus"] for a in allocs} == {"stop"}
    states = allocs[0]["TaskStates"]["server"]
    assert states["State"] == "dead" and not states["Failed"] and states["FinishedAt"]
    services = requests.get(f"{sim.consul_addr}/v1/health/checks/web", timeout=10).json()
    assert services == [], "stopped tasks deregister their services"


def test_killing_an_allocation_fails_it(sim_target: NomadTarget) -> None:
    sim = sim_target.cluster()
    alloc_id = sim_target.client.job.get_allocations("web")[0]["ID"]
    sim.nomad.kill_allocation(alloc_id)
    alloc = sim_target.client.allocation.get_allocation(alloc_id)
    assert alloc["ClientStatus"] == "failed"
    assert all(s["State"] == "dead" and s["Failed"] for s in alloc["TaskStates"].values())


def test_stop_allocation_endpoint_completes_it(sim_target: NomadTarget) -> None:
    alloc_id = sim_target.client.job.get_allocations("web")[0]["ID"]
    resp = sim_target.client.allocation.stop_allocation(alloc_id)
    assert {"EvalID", "Index"} <= resp.keys()
    assert sim_target.client.allocation.get_allocation(alloc_id)["ClientStatus"] == "complete"


def test_request_counts_by_method_and_endpoint(sim_target: NomadTarget) -> None:
    alloc_id = sim_target.client.job.get_allocations("web")[0]["ID"]
    sim_target.client.allocation.get_allocation(alloc_id)
    sim_target.client.allocation.get_allocation(alloc_id)
    counts = sim_target.get("/_sim/requests").json()
    assert counts["GET /v1/allocation/:id"] == 2
    assert counts["GET /v1/job/:id/allocations"] == 1
    assert not any(k.startswith("GET /_sim") for k in counts)


def test_sim_endpoints_need_no_token(sim_acl_target: NomadTarget) -> None:
    assert requests.get(sim_acl_target.address + "/_sim/restarts", timeout=10).json() == []
