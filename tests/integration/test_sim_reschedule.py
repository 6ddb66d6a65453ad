"""The simulated Nomad stops, replaces and migrates allocations as Nomad does, over its HTTP API.

Sim-only: the behaviours are checked against the API documentation (alloc stop "stops and
reschedules", node drain with a DrainSpec, lost allocations of a down node, destructive job
updates), which a real cluster needs no test of ours to exhibit.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCALE = 25.0

pytestmark = pytest.mark.usefixtures("no_client_env")


def scenario() -> dict[str, Any]:
    return {
        "seed": 5,
        "nodes": ["node-1", "node-2", "node-3"],
        "jobs": [
            {
                "name": "web",
                "groups": [{"name": "app", "count": 3, "tasks": [{"name": "server", "shepard": True}]}],
            }
        ],
        "timing": {"restart": "1s", "healthy_after": "500ms"},
    }


def get(sim: SimCluster, path: str) -> Any:
    answer = requests.get(f"{sim.nomad_addr}{path}", timeout=10)
    answer.raise_for_status()
    return answer.json()


def post(sim: SimCluster, path: str, body: Any = None) -> Any:
    answer = requests.post(f"{sim.nomad_addr}{path}", json=body, timeout=10)
    answer.raise_for_status()
    return answer.json()


def allocs(sim: SimCluster) -> list[dict[str, Any]]:
    return [get(sim, f"/v1/allocation/{a['ID']}") for a in get(sim, "/v1/job/web/allocations")]


def test_alloc_stop_stops_and_reschedules_with_a_linked_replacement(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(), time_scale=SCALE)
    old = allocs(sim)[0]
    answer = post(sim, f"/v1/allocation/{old['ID']}/stop")
    assert answer["EvalID"] and answer["Index"] > 0
    stopped = get(sim, f"/v1/allocation/{old['ID']}")
    assert (stopped["DesiredStatus"], stopped["DesiredTransition"]["Migrate"]) == ("stop", True)
    new = get(sim, f"/v1/allocation/{stopped['NextAllocation']}")
    assert (new["Name"], new["PreviousAllocation"], new["DesiredStatus"]) == (old["Name"], old["ID"], "run")
    assert new["ID"] != old["ID"]
    sim.wait_settled()
    assert get(sim, f"/v1/allocation/{old['ID']}")["ClientStatus"] == "complete"
    assert (sim.node_data_dir(new["NodeName"]) / "alloc" / new["ID"]).is_dir()


def test_node_drain_makes_the_node_ineligible_and_migrates_its_allocations(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(), time_scale=SCALE)
    node = next(n for n in get(sim, "/v1/nodes") if n["Name"] == "node-1")
    on_node = [a for a in allocs(sim) if a["NodeID"] == node["ID"]]
    answer = post(sim, f"/v1/node/{node['ID']}/drain", {"DrainSpec": {"Deadline": 3600 * 10**9}})
    assert len(answer["EvalIDs"]) == len(on_node) >= 1
    drained = get(sim, f"/v1/node/{node['ID']}")
    assert (drained["SchedulingEligibility"], drained["Drain"]) == ("ineligible", False)
    for alloc in on_node:
        moved = get(sim, f"/v1/allocation/{alloc['ID']}")
        replacement = get(sim, f"/v1/allocation/{moved['NextAllocation']}")
        assert moved["DesiredStatus"] == "stop" and replacement["NodeID"] != node["ID"]
    with pytest.raises(requests.HTTPError):
        post(sim, f"/v1/node/{node['ID']}/drain", {})


def test_a_node_that_goes_down_has_its_allocations_lost_and_replaced(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(), time_scale=SCALE)
    on_node = [a for a in allocs(sim) if a["NodeName"] == "node-2"]
    sim.nomad.set_node_down("node-2")
    for alloc in on_node:
        lost = get(sim, f"/v1/allocation/{alloc['ID']}")
        assert lost["ClientStatus"] == "lost" and lost["NextAllocation"]
        assert get(sim, f"/v1/allocation/{lost['NextAllocation']}")["NodeName"] != "node-2"


def test_a_destructive_job_update_replaces_every_allocation(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(), time_scale=SCALE)
    job = get(sim, "/v1/job/web")
    before = {a["ID"]: a["Name"] for a in allocs(sim)}
    same = post(sim, "/v1/job/web", {"Job": job})
    assert same["EvalID"] == "" and {a["ID"] for a in allocs(sim)} == set(before)
    job["TaskGroups"][0]["Tasks"][0]["Env"] = {"VERSION": "2"}
    answer = post(sim, "/v1/job/web", {"Job": job})
    assert answer["EvalID"]
    running = [a for a in allocs(sim) if a["DesiredStatus"] == "run"]
    assert sorted(a["Name"] for a in running) == sorted(before.values())
    assert not {a["ID"] for a in running} & set(before)
    assert {a["PreviousAllocation"] for a in running} == set(before)
