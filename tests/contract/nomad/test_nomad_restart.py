"""``POST /v1/client/allocation/<id>/restart`` and the task lifecycle it drives.

``restart_target`` is the sim, or the real Nomad named by ``NOMAD_ADDR`` when ``SHEPARD_TEST_JOB``
names a throwaway job whose tasks the tests may restart (skipped otherwise). Tests named
``test_sim_...`` use the sim's fault controls or record, or a window too short to hit on a real
cluster, and run on the sim only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from nomad.api.exceptions import BaseNomadException, URLNotFoundNomadException
from nomad_contract import CONTRACT_SCENARIO, SIM_SCALE, NomadTarget, python_nomad, real_target

from shepard_lib.backends._http import transient_status
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import NomadConfig
from shepard_lib.errors import NomadError
from shepard_lib.sim import SimCluster

RESTART_EVENTS = ["Restart Signaled", "Terminated", "Restarting", "Started"]
"""The task events of one restart, in order: what the real-cluster rollout test counts."""
JOB_SKIP = "set SHEPARD_TEST_JOB to a throwaway job whose tasks may be restarted"
UNKNOWN = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def restart_target(request: pytest.FixtureRequest) -> Iterator[tuple[NomadTarget, str]]:
    """The Nomad under test and a job whose tasks may be restarted."""
    if request.param == "sim":
        yield request.getfixturevalue("sim_target"), "web"
        return
    target = real_target()
    job = os.environ.get("SHEPARD_TEST_JOB")
    if not job:
        pytest.skip(JOB_SKIP)
    yield target, job


def _running_alloc(target: NomadTarget, job: str, tasks: int = 1) -> dict[str, Any]:
    """A running allocation of ``job`` with at least ``tasks`` running tasks (full read)."""
    for stub in target.client.job.get_allocations(job):
        if stub["ClientStatus"] != "running":
            continue
        alloc: dict[str, Any] = target.client.allocation.get_allocation(stub["ID"])
        if sum(s["State"] == "running" for s in alloc["TaskStates"].values()) >= tasks:
            return alloc
    pytest.skip(f"job {job} has no running allocation with {tasks} running task(s)")


def _wait_restarted(target: NomadTarget, alloc_id: str, restarts: dict[str, int]) -> dict[str, Any]:
    """Follow the allocation (blocking queries) until each task in ``restarts`` has that many restarts
    and runs again; returns the allocation then."""
    index, deadline = 0, time.monotonic() + 120
    while True:
        resp = target.get(f"/v1/allocation/{alloc_id}", index=index, wait="5s")
        assert resp.status_code == 200, resp.text
        index = int(resp.headers["X-Nomad-Index"])
        alloc: dict[str, Any] = resp.json()
        states = alloc["TaskStates"]
        if all(states[t]["Restarts"] >= n and states[t]["State"] == "running" for t, n in restarts.items()):
            return alloc
        assert time.monotonic() < deadline, f"tasks did not restart and run again: {states}"


def _events(alloc: dict[str, Any], task: str) -> list[str]:
    return [e["Type"] for e in alloc["TaskStates"][task]["Events"] or []]


def test_restart_one_task_by_name_restarts_only_that_task(restart_target: tuple[NomadTarget, str]) -> None:
    target, job = restart_target
    alloc = _running_alloc(target, job, tasks=2)
    task, sibling = sorted(n for n, s in alloc["TaskStates"].items() if s["State"] == "running")[:2]
    before = alloc["TaskStates"]
    resp = target.post(f"/v1/client/allocation/{alloc['ID']}/restart", {"TaskName": task})
    assert resp.status_code == 200 and resp.json() == {}
    after = _wait_restarted(target, alloc["ID"], {task: before[task]["Restarts"] + 1})
    states = after["TaskStates"]
    assert states[task]["Restarts"] == before[task]["Restarts"] + 1
    assert states[task]["LastRestart"] is not None
    assert states[task]["StartedAt"] > before[task]["StartedAt"]
    assert _events(after, task)[-4:] == RESTART_EVENTS
    assert states[sibling]["Restarts"] == before[sibling]["Restarts"], "the sibling task was restarted too"
    assert _events(after, sibling) == _events(alloc, sibling)


def test_restart_without_body_restarts_every_running_task(restart_target: tuple[NomadTarget, str]) -> None:
    target, job = restart_target
    alloc = _running_alloc(target, job)
    running = {n: s["Restarts"] + 1 for n, s in alloc["TaskStates"].items() if s["State"] == "running"}
    assert target.client.client.allocation.restart_allocation(alloc["ID"]) == {}
    after = _wait_restarted(target, alloc["ID"], running)
    assert {n: after["TaskStates"][n]["Restarts"] for n in running} == running
    for name in running:
        assert _events(after, name)[-4:] == RESTART_EVENTS, name


def test_restart_bumps_modify_index_and_the_allocation_keeps_running(
    restart_target: tuple[NomadTarget, str],
) -> None:
    target, job = restart_target
    alloc = _running_alloc(target, job)
    task = next(n for n, s in alloc["TaskStates"].items() if s["State"] == "running")
    target.post(f"/v1/client/allocation/{alloc['ID']}/restart", {"TaskName": task})
    after = _wait_restarted(target, alloc["ID"], {task: alloc["TaskStates"][task]["Restarts"] + 1})
    assert after["ModifyIndex"] > alloc["ModifyIndex"]
    assert after["ClientStatus"] == "running"


def test_restart_of_unknown_allocation_answers_404(restart_target: tuple[NomadTarget, str]) -> None:
    target, _ = restart_target
    with pytest.raises(URLNotFoundNomadException) as err:
        target.client.client.allocation.restart_allocation(UNKNOWN)
    assert err.value.nomad_resp.text == f'Unknown allocation "{UNKNOWN}"'


def test_restart_of_unknown_task_fails_with_an_answer_not_an_outage(
    restart_target: tuple[NomadTarget, str],
) -> None:
    target, job = restart_target
    resp = target.post(
        f"/v1/client/allocation/{_running_alloc(target, job)['ID']}/restart", {"TaskName": "nope"}
    )
    assert (resp.status_code, resp.text) == (500, "Could not find task runner for task: nope")
    assert not transient_status(resp.status_code, resp.text, repeatable=False), (
        "the retry rules would retry it"
    )


def test_sim_restart_of_a_task_that_is_not_running_fails(tmp_path: Any, no_client_env: None) -> None:
    """Sim-only: a restart that takes 60 cluster seconds holds the task out of ``running`` long enough
    (1.2 real seconds) to ask again; a real task may not leave that window open."""
    scenario = {**CONTRACT_SCENARIO, "timing": {"restart": "60s", "healthy_after": "500ms"}}
    with SimCluster.from_scenario(scenario, data_dir=tmp_path, time_scale=SIM_SCALE) as sim:
        target = NomadTarget("sim", sim.nomad_addr, None, python_nomad(sim.nomad_addr, None), sim)
        alloc = _running_alloc(target, "web")
        assert target.post(f"/v1/client/allocation/{alloc['ID']}/restart", {"TaskName": "server"}).ok
        during = target.client.allocation.get_allocation(alloc["ID"])["TaskStates"]["server"]
        assert during["State"] == "pending" and during["Restarts"] == 1
        again = target.post(f"/v1/client/allocation/{alloc['ID']}/restart", {"TaskName": "server"})
        assert (again.status_code, again.text) == (500, "Task not running")
        assert not transient_status(again.status_code, again.text), "a semantic answer must not be retried"


def test_restart_with_malformed_body_is_a_bad_request(restart_target: tuple[NomadTarget, str]) -> None:
    target, job = restart_target
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["X-Nomad-Token"] = target.token
    resp = requests.post(
        f"{target.address}/v1/client/allocation/{_running_alloc(target, job)['ID']}/restart",
        data=b"{not json",
        headers=headers,
        timeout=30,
    )
    assert resp.status_code == 400


def test_put_is_accepted_like_post_and_get_is_not(restart_target: tuple[NomadTarget, str]) -> None:
    target, job = restart_target
    alloc = _running_alloc(target, job)
    task = next(n for n, s in alloc["TaskStates"].items() if s["State"] == "running")
    url = f"{target.address}/v1/client/allocation/{alloc['ID']}/restart"
    headers = {"X-Nomad-Token": target.token} if target.token else {}
    assert requests.put(url, json={"TaskName": task}, headers=headers, timeout=30).status_code == 200
    _wait_restarted(target, alloc["ID"], {task: alloc["TaskStates"][task]["Restarts"] + 1})
    assert requests.get(url, headers=headers, timeout=30).status_code == 405


def test_nomad_backend_restart_task_restarts_that_task_and_refuses_unknown_ones(
    restart_target: tuple[NomadTarget, str],
) -> None:
    """The ``nomad_api`` restart method's call, through Shepard's own backend."""
    target, job = restart_target
    alloc = _running_alloc(target, job)
    task = next(n for n, s in alloc["TaskStates"].items() if s["State"] == "running")
    clock = target.cluster().clock if target.kind == "sim" else Clock()  # the sim tells a mismatch
    backend = NomadBackend(NomadConfig(address=target.address, token=target.token), clock)
    try:
        backend.restart_task(alloc["ID"], task)
        _wait_restarted(target, alloc["ID"], {task: alloc["TaskStates"][task]["Restarts"] + 1})
        with pytest.raises(NomadError) as err:
            backend.restart_task(alloc["ID"], "nope")
        assert err.value.status == 500 and not err.value.transient, err.value
        with pytest.raises(NomadError) as err:
            backend.restart_task(UNKNOWN, task)
        assert err.value.status == 404 and not err.value.transient, err.value
    finally:
        backend.close()


def test_sim_python_nomad_raises_on_server_errors(sim_target: NomadTarget) -> None:
    """Sim-only: it injects server errors."""
    sim_target.cluster().nomad_faults.error_rate = 1.0
    with pytest.raises(BaseNomadException):
        sim_target.client.nodes.get_nodes()
