"""``shepard job check`` through the real console script, against the simulator and a real Nomad.

The sim variant reads jobs the simulated Nomad serves over its HTTP API (the same job JSON a real
server returns). The real variant runs when ``NOMAD_ADDR`` and ``SHEPARD_TEST_JOB`` (a job whose
tasks render ``local/shepard.tpl``) are set, and checks that job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from shepard_lib.keyspace import shepard_template
from shepard_lib.sim.pytest_plugin import DEFAULT_TIME_SCALE, SimClusterFactory

SHEPARD = Path(sys.executable).parent / "shepard"
REAL_SKIP = "set NOMAD_ADDR (and NOMAD_TOKEN) and SHEPARD_TEST_JOB to check a job on a real Nomad"

SCENARIO: dict[str, Any] = {
    "nodes": 2,
    "jobs": [
        {
            "name": "web",
            "groups": [
                {
                    "name": "app",
                    "count": 2,
                    "tasks": [
                        {
                            "name": "server",
                            "shepard": True,
                            "templates": [{"key": "config/web", "destination": "local/app.conf"}],
                            "service": "web",
                        }
                    ],
                }
            ],
        },
        {
            "name": "herd",
            "groups": [
                {
                    "name": "app",
                    "count": 2,
                    "tasks": [
                        {
                            "name": "server",
                            "templates": [
                                {
                                    "key": "config/web",
                                    "destination": "local/app.conf",
                                    "change_mode": "restart",
                                }
                            ],
                        }
                    ],
                }
            ],
        },
        {
            "name": "slow",
            "groups": [
                {
                    "name": "app",
                    "count": 1,
                    "tasks": [
                        {
                            "name": "server",
                            "templates": [
                                {
                                    "data": shepard_template(),
                                    "destination": "local/shepard.tpl",
                                    "change_mode": "restart",
                                    "splay": "5s",
                                }
                            ],
                        }
                    ],
                }
            ],
        },
        {
            "name": "api",
            "id": "api-prod",
            "groups": [
                {"name": "app", "count": 1, "tasks": [{"name": "server", "shepard": True, "service": "api"}]}
            ],
        },
        {
            "name": "api-old",
            "id": "api-old-prod",
            "groups": [
                {
                    "name": "app",
                    "count": 1,
                    "tasks": [
                        {
                            "name": "server",
                            "service": "api",
                            "templates": [
                                {
                                    "data": shepard_template().replace('"NOMAD_JOB_ID"', '"NOMAD_JOB_NAME"'),
                                    "destination": "local/shepard.tpl",
                                    "change_mode": "restart",
                                }
                            ],
                        }
                    ],
                }
            ],
        },
        {
            "name": "batch",
            "parameterized": {},
            "groups": [
                {
                    "name": "work",
                    "count": 1,
                    "tasks": [{"name": "worker", "shepard": True, "service": "worker"}],
                }
            ],
        },
    ],
    "keys": {"config/web": "v1"},
}


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SHEPARD), "job", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sim_env(nomad_addr: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD_", "CONSUL_", "SHEPARD_"))}
    env["NOMAD_ADDR"] = nomad_addr
    env["SHEPARD_TIME_SCALE"] = f"{DEFAULT_TIME_SCALE:g}"  # the sim's clock (a mismatch is a usage error)
    return env


@pytest.fixture
def nomad_addr(sim_cluster_factory: SimClusterFactory) -> str:
    return sim_cluster_factory(SCENARIO).nomad_addr


def test_a_ready_job_exits_0_and_says_so(nomad_addr: str) -> None:
    done = run_check(sim_env(nomad_addr), "web")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "app/server: ready" in done.stdout
    assert done.stdout.rstrip().endswith("ready for Shepard")


def test_a_job_that_restarts_by_itself_exits_1_naming_the_template(nomad_addr: str) -> None:
    done = run_check(sim_env(nomad_addr), "herd", "--output", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ready"] is False
    (finding,) = report["tasks"][0]["findings"]
    assert finding["code"] == "no_shepard_template" and finding["severity"] == "error"
    assert "local/app.conf" in finding["message"]


def test_splay_and_no_service_are_warnings_and_the_job_is_still_ready(nomad_addr: str) -> None:
    done = run_check(sim_env(nomad_addr), "slow", "--output", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    found = {f["code"] for f in json.loads(done.stdout)["tasks"][0]["findings"]}
    assert found == {"trigger_splay", "no_health_check"}


def test_an_unknown_job_is_a_usage_error(nomad_addr: str) -> None:
    done = run_check(sim_env(nomad_addr), "nosuchjob")
    assert done.returncode == 2
    assert "nosuchjob" in done.stderr and "Traceback" not in done.stderr


def test_a_job_whose_name_differs_from_its_id_is_ready(nomad_addr: str) -> None:
    done = run_check(sim_env(nomad_addr), "api-prod", "--output", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["job"], report["ready"]) == ("api-prod", True)
    assert report["tasks"][0]["findings"] == []


def test_a_template_reading_the_job_name_of_a_renamed_job_exits_1_with_the_fix(nomad_addr: str) -> None:
    done = run_check(sim_env(nomad_addr), "api-old-prod", "--output", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    (finding,) = json.loads(done.stdout)["tasks"][0]["findings"]
    assert finding["code"] == "trigger_key" and finding["severity"] == "error"
    assert "shepard/keys/node-1/api-old-prod/app/server/0" in finding["message"]
    assert 'env "NOMAD_JOB_ID"' in finding["message"]


def test_a_dispatched_child_is_checked_by_its_id(nomad_addr: str) -> None:
    resp = requests.post(f"{nomad_addr}/v1/job/batch/dispatch", json={}, timeout=30)
    assert resp.status_code == 200, resp.text
    child = resp.json()["DispatchedJobID"]
    done = run_check(sim_env(nomad_addr), child, "--output", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["job"], report["ready"]) == (child, True)


@pytest.mark.real_cluster
def test_a_real_job_is_reported_task_by_task() -> None:
    job = os.environ.get("SHEPARD_TEST_JOB")
    if not (os.environ.get("NOMAD_ADDR") and job):
        pytest.skip(REAL_SKIP)
    done = run_check(dict(os.environ), job, "--output", "json")
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert report["job"] == job
    assert report["managed_tasks"] >= 1, f"{job} renders no local/shepard.tpl: {report}"
