"""Read endpoints of the Nomad HTTP API through python-nomad: shapes, stubs, filters, 404s."""

from __future__ import annotations

import re

import pytest
from nomad.api.exceptions import URLNotFoundNomadException
from nomad_contract import NomadTarget

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
ALLOC_NAME = re.compile(r"^(?P<job>.+)\.(?P<group>[^.]+)\[(?P<index>\d+)\]$")

NODE_STUB_FIELDS = {
    "ID",
    "Name",
    "Datacenter",
    "Status",
    "SchedulingEligibility",
    "NodeClass",
    "Drain",
    "CreateIndex",
    "ModifyIndex",
}
ALLOC_STUB_FIELDS = {
    "ID",
    "Name",
    "Namespace",
    "NodeID",
    "NodeName",
    "JobID",
    "TaskGroup",
    "ClientStatus",
    "DesiredStatus",
    "TaskStates",
    "CreateIndex",
    "ModifyIndex",
    "CreateTime",
    "ModifyTime",
}


def test_node_list_returns_node_list_stubs(nomad_target: NomadTarget) -> None:
    nodes = nomad_target.client.nodes.get_nodes()
    assert nodes, "expected at least one client node"
    for node in nodes:
        missing = NODE_STUB_FIELDS - node.keys()
        assert not missing, f"NodeListStub lacks {missing}"
        assert "StatusUpdatedAt" not in node, "StatusUpdatedAt is only on the full Node"
        assert node["Status"] in ("initializing", "ready", "down", "disconnected")


def test_node_read_has_status_updated_at_in_unix_seconds(nomad_target: NomadTarget) -> None:
    stub = nomad_target.client.nodes.get_nodes()[0]
    node = nomad_target.client.node.get_node(stub["ID"])
    assert node["ID"] == stub["ID"] and node["Name"] == stub["Name"]
    assert isinstance(node["StatusUpdatedAt"], int)
    assert 1_000_000_000 < node["StatusUpdatedAt"] < 10_000_000_000, "seconds, not ms or ns"
    assert isinstance(node["Attributes"], dict) and node["Attributes"].get("unique.hostname")


def test_node_list_filters_by_id_prefix(nomad_target: NomadTarget) -> None:
    nodes = nomad_target.client.nodes.get_nodes()
    node_id = nodes[0]["ID"]
    found = nomad_target.client.nodes.get_nodes(prefix=node_id[:8])
    assert [n["ID"] for n in found if n["ID"] == node_id] == [node_id]
    assert all(n["ID"].startswith(node_id[:8]) for n in found)


def test_unknown_node_answers_404_node_not_found(nomad_target: NomadTarget) -> None:
    with pytest.raises(URLNotFoundNomadException) as err:
        nomad_target.client.node.get_node("00000000-0000-0000-0000-000000000000")
    assert err.value.nomad_resp.text.strip() == "node not found"


def test_node_allocations_are_full_allocations(nomad_target: NomadTarget) -> None:
    _, allocs = nomad_target.some_job_with_allocs()
    full = nomad_target.client.node.get_allocations(allocs[0]["NodeID"])
    assert allocs[0]["ID"] in {a["ID"] for a in full}
    assert all("Job" in a and a["NodeID"] == allocs[0]["NodeID"] for a in full)


def test_job_list_returns_stubs_with_summary_and_meta_only_on_request(nomad_target: NomadTarget) -> None:
    jobs = nomad_target.client.jobs.get_jobs()
    assert jobs
    for job in jobs:
        assert {"ID", "Name", "Namespace", "Status", "Stop", "JobSummary", "ModifyIndex"} <= job.keys()
        assert "TaskGroups" not in job and "Meta" not in job
    with_meta = nomad_target.client.jobs.get_jobs(meta=True)
    assert all("Meta" in j for j in with_meta)


def test_job_read_has_groups_tasks_templates_and_services(nomad_target: NomadTarget) -> None:
    job_id, _ = nomad_target.some_job_with_allocs()
    job = nomad_target.client.job.get_job(job_id)
    assert job["ID"] == job_id and job["TaskGroups"]
    for group in job["TaskGroups"]:
        assert isinstance(group["Count"], int) and group["Tasks"]
        for task in group["Tasks"]:
            assert {"Name", "Driver", "Meta", "Templates", "Services"} <= task.keys()
            for tpl in task["Templates"] or []:
                assert {"DestPath", "EmbeddedTmpl", "ChangeMode", "Splay", "ChangeSignal"} <= tpl.keys()
                assert isinstance(tpl["Splay"], int), "Splay is in nanoseconds"


def test_sim_job_declares_shepard_template_with_restart_change_mode(sim_target: NomadTarget) -> None:
    """Sim only: the scenario's ``shepard: true`` appears in the job as Nomad would hold it."""
    task = sim_target.client.job.get_job("web")["TaskGroups"][0]["Tasks"][0]
    shepard = [t for t in task["Templates"] if t["DestPath"] == "local/shepard.tpl"]
    assert len(shepard) == 1 and shepard[0]["ChangeMode"] == "restart"
    assert 'env "node.unique.name"' in shepard[0]["EmbeddedTmpl"]
    assert "NOMAD_NODE_NAME" not in shepard[0]["EmbeddedTmpl"]
    assert task["Services"][0]["Name"] == "web"


def test_unknown_job_answers_404_job_not_found(nomad_target: NomadTarget) -> None:
    with pytest.raises(URLNotFoundNomadException) as err:
        nomad_target.client.job.get_job("no-such-job-shepard-contract")
    assert err.value.nomad_resp.text.strip() == "job not found"


def test_job_allocations_are_alloc_list_stubs(nomad_target: NomadTarget) -> None:
    job_id, allocs = nomad_target.some_job_with_allocs()
    for alloc in allocs:
        missing = ALLOC_STUB_FIELDS - alloc.keys()
        assert not missing, f"AllocListStub lacks {missing}"
        assert "Job" not in alloc
        assert alloc["JobID"] == job_id


def test_allocation_read_has_name_index_and_task_states(nomad_target: NomadTarget) -> None:
    _, allocs = nomad_target.some_job_with_allocs()
    alloc = nomad_target.client.allocation.get_allocation(allocs[0]["ID"])
    m = ALLOC_NAME.match(alloc["Name"])
    assert m and m["job"] == alloc["JobID"] and m["group"] == alloc["TaskGroup"]
    assert alloc["Job"]["ID"] == alloc["JobID"]
    assert isinstance(alloc["CreateTime"], int) and alloc["CreateTime"] > 10**18, "Unix nanoseconds"
    for state in alloc["TaskStates"].values():
        assert state["State"] in ("pending", "running", "dead")
        assert isinstance(state["Restarts"], int) and isinstance(state["Failed"], bool)
        if state["StartedAt"] is not None:
            assert RFC3339.match(state["StartedAt"]), state["StartedAt"]
        for event in state["Events"]:
            assert isinstance(event["Time"], int) and event["Time"] > 10**18
            assert {"Type", "DisplayMessage", "Details"} <= event.keys()


def test_allocation_list_filters_by_prefix_and_can_drop_task_states(nomad_target: NomadTarget) -> None:
    _, allocs = nomad_target.some_job_with_allocs()
    alloc_id = allocs[0]["ID"]
    found = nomad_target.client.allocations.get_allocations(prefix=alloc_id[:8])
    assert alloc_id in {a["ID"] for a in found}
    assert all(a["ID"].startswith(alloc_id[:8]) for a in found)
    lean = nomad_target.client.allocations.get_allocations(prefix=alloc_id[:8], task_states=False)
    assert all(a.get("TaskStates") is None for a in lean)


def test_unknown_allocation_answers_404_alloc_not_found(nomad_target: NomadTarget) -> None:
    with pytest.raises(URLNotFoundNomadException) as err:
        nomad_target.client.allocation.get_allocation("00000000-0000-0000-0000-000000000000")
    assert err.value.nomad_resp.text.strip() == "alloc not found"


def test_agent_self_names_the_local_node(nomad_target: NomadTarget) -> None:
    agent = nomad_target.client.agent.get_agent()
    assert agent["config"]["Region"] and agent["config"]["Datacenter"]
    if "client" not in agent["stats"]:
        pytest.skip("NOMAD_ADDR points at a server-only agent: no local client node")
    node_id = agent["stats"]["client"]["node_id"]
    node = nomad_target.client.node.get_node(node_id)
    configured = agent["config"]["NodeName"]
    if not configured and nomad_target.kind == "real":
        pytest.skip("the agent's configuration names no node (Nomad uses the hostname): nothing to compare")
    assert configured, "the sim's agent must name its node"
    assert node["Name"] == configured


def test_sim_agent_address_per_node_names_that_node(sim_target: NomadTarget) -> None:
    """Sim only: ``SimCluster.nomad_agent_addr(node)`` serves the cluster as that node's agent."""
    from nomad_contract import python_nomad

    assert sim_target.sim is not None
    agent = python_nomad(sim_target.sim.nomad_agent_addr("n2"), None).agent.get_agent()
    assert agent["config"]["NodeName"] == "n2"
    assert agent["config"]["DataDir"] == str(sim_target.sim.node_data_dir("n2"))


def test_namespaces_scope_job_and_allocation_lists(sim_target: NomadTarget) -> None:
    """Sim only (needs a job in a second namespace): ``?namespace=`` and ``*``."""
    client = sim_target.client
    assert [j["ID"] for j in client.jobs.get_jobs()] == ["web"]
    assert {j["ID"] for j in client.jobs.get_jobs(namespace="*")} == {"web", "reports"}
    assert [j["ID"] for j in client.jobs.get_jobs(namespace="batch")] == ["reports"]
    assert client.job.get_job("reports", namespace="batch")["Namespace"] == "batch"
    with pytest.raises(URLNotFoundNomadException):
        client.job.get_job("reports")
    default_allocs = client.allocations.get_allocations()
    assert {a["Namespace"] for a in default_allocs} == {"default"}
    assert {a["Namespace"] for a in client.allocations.get_allocations(namespace="*")} == {"default", "batch"}


def test_sim_allocations_spread_round_robin_over_nodes(sim_target: NomadTarget) -> None:
    """Sim only: placement is round-robin in scenario order."""
    allocs = sorted(sim_target.client.job.get_allocations("web"), key=lambda a: a["Name"])
    assert [a["NodeName"] for a in allocs] == ["n1", "n2", "n1"]
    assert [a["Name"] for a in allocs] == ["web.app[0]", "web.app[1]", "web.app[2]"]
    assert {a["ClientStatus"] for a in allocs} == {"running"}
