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
