"""What GC relies on in Nomad's answers: leader headers, ``Date``, all-namespace lists, purges."""

from __future__ import annotations

import email.utils
import time

import pytest
from nomad_contract import NomadTarget

LISTS = ("/v1/nodes", "/v1/jobs?namespace=*", "/v1/allocations?namespace=*")


@pytest.mark.parametrize("path", LISTS)
def test_lists_say_whether_the_answering_server_knows_the_leader(
    nomad_target: NomadTarget, path: str
) -> None:
    base, _, query = path.partition("?")
    params = dict(p.split("=") for p in query.split("&")) if query else {}
    response = nomad_target.get(base, **params)
    assert response.status_code == 200
    assert response.headers.get("X-Nomad-KnownLeader") == "true"
    assert int(response.headers["X-Nomad-Index"]) >= 1


def test_node_reads_carry_the_leader_header_too(nomad_target: NomadTarget) -> None:
    node_id = nomad_target.client.nodes.get_nodes()[0]["ID"]
    for path in (f"/v1/node/{node_id}", f"/v1/node/{node_id}/allocations"):
        assert nomad_target.get(path).headers.get("X-Nomad-KnownLeader") == "true", path


def test_the_date_header_is_the_answering_agents_clock(nomad_target: NomadTarget) -> None:
    date = email.utils.parsedate_to_datetime(nomad_target.get("/v1/nodes").headers["Date"]).timestamp()
    if nomad_target.sim is None:
        assert abs(date - time.time()) < 300, "the Nomad agent's clock is far from this host's"
    else:  # the sim's agents run on the cluster clock, as fast as it runs
        assert abs(date - nomad_target.sim.clock.time()) < 1 + nomad_target.sim.clock.cluster(2.0)


def test_lists_of_every_namespace_hold_jobs_and_allocations_of_all(sim_target: NomadTarget) -> None:
    jobs = sim_target.get("/v1/jobs", namespace="*").json()
    assert {(j["Namespace"], j["ID"]) for j in jobs} == {("default", "web"), ("batch", "reports")}
    allocs = sim_target.get("/v1/allocations", namespace="*").json()
    assert {a["Namespace"] for a in allocs} == {"default", "batch"}


@pytest.mark.parametrize(("value", "expected"), [("false", "false"), (None, None)])
def test_sim_can_answer_without_a_known_leader(
    sim_target: NomadTarget, value: str | None, expected: str | None
) -> None:
    sim_target.cluster().nomad_faults.known_leader = value
    response = sim_target.get("/v1/nodes")
    assert response.status_code == 200
    assert response.headers.get("X-Nomad-KnownLeader") == expected


def test_a_purged_job_is_gone_while_its_allocations_stay_listed_complete(sim_target: NomadTarget) -> None:
    sim = sim_target.cluster()
    sim.nomad.purge_job("web")
    assert "web" not in {j["ID"] for j in sim_target.get("/v1/jobs").json()}
    assert sim_target.get("/v1/job/web").status_code == 404
    allocs = [a for a in sim_target.get("/v1/allocations").json() if a["JobID"] == "web"]
    assert len(allocs) == 3
    assert {a["DesiredStatus"] for a in allocs} == {"stop"}


def test_a_stopped_job_is_listed_dead_with_stop_set(sim_target: NomadTarget) -> None:
    sim_target.cluster().nomad.stop_job("web")
    (web,) = [j for j in sim_target.get("/v1/jobs").json() if j["ID"] == "web"]
    assert web["Stop"] is True and web["Status"] == "dead"
