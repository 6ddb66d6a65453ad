"""``POST /v1/client/allocation/<id>/restart`` and the task lifecycle it drives (sim only: it restarts)."""

from __future__ import annotations

import pytest
import requests
from nomad.api.exceptions import BaseNomadException, URLNotFoundNomadException
from nomad_contract import NomadTarget

RESTART_EVENTS = ["Restart Signaled", "Terminated", "Restarting", "Started"]


def _alloc(target: NomadTarget, index: int = 0) -> dict:
    allocs = target.client.job.get_allocations("web")
    return next(a for a in allocs if a["Name"] == f"web.app[{index}]")


def test_restart_one_task_by_name_restarts_only_that_task(sim_target: NomadTarget) -> None:
    alloc = _alloc(sim_target)
    resp = sim_target.post(f"/v1/client/allocation/{alloc['ID']}/restart", {"TaskName": "server"})
    assert resp.status_code == 200 and resp.json() == {}
    during = sim_target.client.allocation.get_allocation(alloc["ID"])["TaskStates"]
    # (it may already run again: the pending state is checked where the restart lasts an hour)
    assert during["server"]["Restarts"] == 1 and during["server"]["LastRestart"] is not None
    assert during["sidecar"]["State"] == "running" and during["sidecar"]["Restarts"] == 0
    sim_target.cluster().wait_settled()
    after = sim_target.client.allocation.get_allocation(alloc["ID"])["TaskStates"]["server"]
    assert after["State"] == "running"
    assert after["StartedAt"] > alloc["TaskStates"]["server"]["StartedAt"]
    assert [e["Type"] for e in after["Events"]][-4:] == RESTART_EVENTS


def test_restart_without_body_restarts_every_running_task(sim_target: NomadTarget) -> None:
    alloc = _alloc(sim_target, 1)
    assert sim_target.client.client.allocation.restart_allocation(alloc["ID"]) == {}
    states = sim_target.client.allocation.get_allocation(alloc["ID"])["TaskStates"]
    assert {name: s["Restarts"] for name, s in states.items()} == {"server": 1, "sidecar": 1}
    causes = {(r.task, r.cause) for r in sim_target.cluster().restarts()}
    assert causes == {("server", "api"), ("sidecar", "api")}


def test_restart_bumps_modify_index_and_client_status_follows_tasks(sim_target: NomadTarget) -> None:
    alloc = _alloc(sim_target, 2)
    sim_target.post(f"/v1/client/allocation/{alloc['ID']}/restart", {"TaskName": "server"})
    during = sim_target.client.allocation.get_allocation(alloc["ID"])
    assert during["ModifyIndex"] > alloc["ModifyIndex"]
    assert during["ClientStatus"] == "running", "the sidecar still runs, so the allocation does"


def test_restart_of_unknown_allocation_answers_404(sim_target: NomadTarget) -> None:
    with pytest.raises(URLNotFoundNomadException) as err:
        sim_target.client.client.allocation.restart_allocation("00000000-0000-0000-0000-000000000000")
    assert err.value.nomad_resp.text == 'Unknown allocation "00000000-0000-0000-0000-000000000000"'


def test_restart_of_unknown_task_fails(sim_target: NomadTarget) -> None:
    resp = sim_target.post(f"/v1/client/allocation/{_alloc(sim_target)['ID']}/restart", {"TaskName": "nope"})
    assert resp.status_code == 500
    assert resp.text == "Could not find task runner for task: nope"


def test_restart_of_a_task_that_is_not_running_fails(slow_restart_target: NomadTarget) -> None:
    target = slow_restart_target
    alloc_id = _alloc(target)["ID"]
    assert target.post(f"/v1/client/allocation/{alloc_id}/restart", {"TaskName": "server"}).ok
    states = target.client.allocation.get_allocation(alloc_id)["TaskStates"]
    assert (states["server"]["State"], states["sidecar"]["State"]) == ("pending", "running")
    again = target.post(f"/v1/client/allocation/{alloc_id}/restart", {"TaskName": "server"})
    assert (again.status_code, again.text) == (500, "Task not running")


def test_restart_with_malformed_body_is_a_bad_request(sim_target: NomadTarget) -> None:
    headers = {"Content-Type": "application/json"}
    resp = requests.post(
        f"{sim_target.address}/v1/client/allocation/{_alloc(sim_target)['ID']}/restart",
        data=b"{not json",
        headers=headers,
        timeout=10,
    )
    assert resp.status_code == 400


def test_put_is_accepted_like_post_and_get_is_not(sim_target: NomadTarget) -> None:
    alloc_id = _alloc(sim_target)["ID"]
    url = f"{sim_target.address}/v1/client/allocation/{alloc_id}/restart"
    assert requests.put(url, json={"TaskName": "sidecar"}, timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 405


def test_python_nomad_raises_on_server_errors(sim_target: NomadTarget) -> None:
    sim_target.cluster().nomad_faults.error_rate = 1.0
    with pytest.raises(BaseNomadException):
        sim_target.client.nodes.get_nodes()
