"""The simulator's parameterized jobs and ``POST /v1/job/<id>/dispatch`` (sim-only: it checks the sim).

What is simulated follows Nomad's ``Job.Dispatch`` and ``JobSpecificRequest``: the child's ID is
``<parent>/dispatch-<unix>-<8 hex>``, its name is its ID, its ``ParentID`` the parent's ID, it is a
batch job like its parent, and its tasks see ``NOMAD_JOB_PARENT_ID``. Refusals are Nomad's RPC
error texts with status 500. The real-cluster side of dispatch is in ``test_job_identity.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.sim.scenario import ScenarioError, load_scenario

ENV_TEMPLATE = (
    'id={{ env "NOMAD_JOB_ID" }} name={{ env "NOMAD_JOB_NAME" }} parent={{ env "NOMAD_JOB_PARENT_ID" }} '
    'tenant={{ env "NOMAD_META_tenant" }}'
)


def scenario(parameterized: dict[str, Any]) -> dict[str, Any]:
    task = {"name": "worker", "templates": [{"data": ENV_TEMPLATE, "destination": "local/env.txt"}]}
    return {
        "nodes": ["n1", "n2"],
        "jobs": [
            {
                "name": "batch",
                "meta": {"owner": "ops"},
                "parameterized": parameterized,
                "groups": [{"name": "work", "count": 2, "tasks": [task]}],
            },
            {"name": "web", "id": "web-prod", "groups": [{"name": "app", "count": 1, "tasks": [task]}]},
        ],
    }


@pytest.fixture
def sim(sim_cluster_factory: SimClusterFactory) -> SimCluster:
    return sim_cluster_factory(scenario({"meta_required": ["tenant"], "meta_optional": ["size"]}))


def dispatch(sim: SimCluster, job: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{sim.nomad_addr}/v1/job/{job}/dispatch", json=body, timeout=30)


def get(sim: SimCluster, path: str) -> Any:
    resp = requests.get(f"{sim.nomad_addr}{path}", timeout=30)
    resp.raise_for_status()
    return resp.json()


def test_a_parameterized_job_places_nothing_until_dispatched(sim: SimCluster) -> None:
    assert get(sim, "/v1/job/batch/allocations") == []
    job = get(sim, "/v1/job/batch")
    assert job["Type"] == "batch"
    assert job["ParameterizedJob"] == {
        "Payload": "optional",
        "MetaRequired": ["tenant"],
        "MetaOptional": ["size"],
    }


def test_a_dispatched_child_is_a_job_named_by_its_id_with_the_parent_s_meta(sim: SimCluster) -> None:
    resp = dispatch(sim, "batch", {"Meta": {"tenant": "7"}})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    child = answer["DispatchedJobID"]
    assert re.fullmatch(r"batch/dispatch-\d{10}-[0-9a-f]{8}", child), child
    assert answer["EvalID"] and answer["JobCreateIndex"] >= 1
    assert resp.headers["X-Nomad-Index"] == str(answer["Index"])
    encoded = child.replace("/", "%2F")
    job = get(sim, f"/v1/job/{encoded}")
    assert (job["ID"], job["Name"], job["ParentID"], job["Type"]) == (child, child, "batch", "batch")
    assert job["Dispatched"] is True and job["ParameterizedJob"] is None
    assert job["Meta"] == {"owner": "ops", "tenant": "7"}
    allocs = get(sim, f"/v1/job/{encoded}/allocations")
    assert sorted(a["Name"] for a in allocs) == [f"{child}.work[0]", f"{child}.work[1]"]
    assert {a["JobID"] for a in allocs} == {child}
    stubs = {j["ID"]: j for j in get(sim, "/v1/jobs")}
    assert stubs["batch"]["ParameterizedJob"] is True
    assert stubs["batch"]["JobSummary"]["Children"] == {"Pending": 0, "Running": 1, "Dead": 0}
    assert stubs[child]["ParentID"] == "batch"


def test_a_child_s_tasks_see_its_id_as_name_and_its_parent(sim: SimCluster) -> None:
    child = dispatch(sim, "batch", {"Meta": {"tenant": "7"}}).json()["DispatchedJobID"]
    sim.wait_caught_up()
    alloc = sim.nomad.allocation(child, "work", 0)
    rendered = (
        sim.nomad.node_data_dir(alloc.node.name) / "alloc" / alloc.id / "worker/local/env.txt"
    ).read_text()
    assert rendered == f"id={child} name={child} parent=batch tenant=7"


def test_a_renamed_job_s_tasks_see_its_id_and_its_name(sim: SimCluster) -> None:
    sim.wait_caught_up()
    alloc = sim.nomad.allocation("web-prod", "app", 0)
    assert alloc.name == "web-prod.app[0]"  # Nomad names allocations by the job ID
    rendered = (
        sim.nomad.node_data_dir(alloc.node.name) / "alloc" / alloc.id / "worker/local/env.txt"
    ).read_text()
    assert rendered == "id=web-prod name=web parent= tenant="
    assert get(sim, "/v1/job/web-prod")["Name"] == "web"


@pytest.mark.parametrize(
    ("job", "body", "message"),
    [
        ("nosuch", {}, "parameterized job not found"),
        ("web-prod", {}, 'Specified job "web-prod" is not a parameterized job'),
        ("batch", {}, "Dispatch did not provide required meta keys: [tenant]"),
        (
            "batch",
            {"Meta": {"tenant": "1", "color": "red"}},
            "Dispatch request included unpermitted metadata keys: [color]",
        ),
    ],
)
def test_a_refused_dispatch_is_a_500_with_nomad_s_message(
    sim: SimCluster, job: str, body: dict[str, Any], message: str
) -> None:
    resp = dispatch(sim, job, body)
    assert (resp.status_code, resp.text) == (500, message)
    assert len(get(sim, "/v1/jobs")) == 2, "nothing was registered"


def test_a_mismatched_job_id_is_a_400_and_get_is_405(sim: SimCluster) -> None:
    resp = dispatch(sim, "batch", {"JobID": "other", "Meta": {"tenant": "1"}})
    assert (resp.status_code, resp.text) == (400, "Job ID does not match")
    assert requests.get(f"{sim.nomad_addr}/v1/job/batch/dispatch", timeout=30).status_code == 405


def test_an_idempotency_token_dispatches_once(sim: SimCluster) -> None:
    body = {"Meta": {"tenant": "1"}, "IdempotencyToken": "deploy-42"}
    first, again = dispatch(sim, "batch", body).json(), dispatch(sim, "batch", body).json()
    assert again["DispatchedJobID"] == first["DispatchedJobID"]
    assert again["EvalID"] == ""
    assert sum(j["ParentID"] == "batch" for j in get(sim, "/v1/jobs")) == 1


def test_payloads_are_not_simulated_and_say_so(sim: SimCluster) -> None:
    resp = dispatch(sim, "batch", {"Meta": {"tenant": "1"}, "Payload": "aGk="})
    assert resp.status_code == 400 and "not simulated" in resp.text


def test_a_scenario_with_a_key_both_required_and_optional_is_refused() -> None:
    with pytest.raises(
        ScenarioError, match=r"jobs\[0\].parameterized: meta keys both required and optional: a"
    ):
        load_scenario(scenario({"meta_required": ["a"], "meta_optional": ["a"]}))


def test_two_jobs_with_one_id_are_refused() -> None:
    data = scenario({})
    data["jobs"][1]["id"] = "batch"
    with pytest.raises(ScenarioError, match="jobs: duplicate name 'default/batch'"):
        load_scenario(data)
