"""Ctrl-C (SIGINT) in ``shepard restart``, through the real console script against the simulator.

The first SIGINT starts no new restart and sees the one in flight through; a second abandons it.
Either way the rollout's slots are free and its sessions destroyed when the command exits (not
left to expire), and the plan keeps the members it did not restart as ``pending``.
Sim-only: it reads the simulator's restart record.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import requests
from support import Console

from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCALE = 5.0
PLAN = "shepard/locks/web/app/server/task_lock"
SLOTS = "shepard/locks/web/app/server/restart_lock/"


@pytest.fixture
def sim(sim_cluster_factory: SimClusterFactory) -> SimCluster:
    return sim_cluster_factory(time_scale=SCALE)  # job web: 3 allocations of app/server


def _config(sim: SimCluster, tmp_path: Path, min_healthy_time: str) -> str:
    path = tmp_path / "shepard.yaml"
    path.write_text(
        f"consul: {{address: '{sim.consul_addr}'}}\nnomad: {{address: '{sim.nomad_addr}'}}\n"
        f"session_ttl: 15s\nlock_delay: 1s\nmin_healthy_time: {min_healthy_time}\nhealthy_deadline: 2h\n"
        f"time_scale: {SCALE}\n",
        encoding="utf-8",
    )
    return str(path)


def _rollout_sessions(sim: SimCluster) -> list[str]:
    sessions = requests.get(f"{sim.consul_addr}/v1/session/list", timeout=10).json()
    return [s["Name"] for s in sessions if s["Name"].startswith("shepard-rollout")]


def _slot_holders(sim: SimCluster) -> list[str]:
    answer = requests.get(f"{sim.consul_addr}/v1/kv/{SLOTS}", params={"recurse": "1"}, timeout=10)
    return [e["Key"] for e in (answer.json() if answer.status_code == 200 else []) if e.get("Session")]


def _member_states(sim: SimCluster) -> list[str]:
    answer = requests.get(f"{sim.consul_addr}/v1/kv/{PLAN}", params={"raw": "1"}, timeout=10)
    return sorted(m["state"] for m in json.loads(answer.content)["members"].values())


def test_one_sigint_finishes_the_restart_in_flight_starts_no_other_and_frees_everything(
    sim: SimCluster, tmp_path: Path
) -> None:
    config = _config(sim, tmp_path, min_healthy_time="10s")
    shepard = Console("--config", config, "restart", "web", "--concurrency", "1")
    shepard.wait_for(" restarting")
    shepard.proc.send_signal(signal.SIGINT)
    code, out, err = shepard.finish()

    assert code == 130, f"exit {code}\n{out}\n{err}"
    assert "SIGINT: starting no new restarts" in err
    assert "1 restarted, 0 failed, 2 skipped" in out, out
    assert "interrupted: 2 allocation(s) not restarted; `shepard resume web/app/server`" in out, out
    assert "Traceback" not in err
    assert len(sim.restarts()) == 1
    assert _member_states(sim) == ["done", "pending", "pending"]
    assert _slot_holders(sim) == [], "a slot is still held after the command exited"
    assert _rollout_sessions(sim) == [], "the rollout's sessions were left to expire"

    code, out, err = Console("--config", config, "status", "web").finish()
    assert code == 0, err
    assert "nobody is driving this plan" in out and "`shepard resume web/app/server`" in out, out
    code, out, err = Console("--config", config, "resume", "web/app/server").finish()
    assert code == 0, f"{out}\n{err}"
    assert len(sim.restarts()) == 3, "resume restarted the two the interrupt left, and only them"
    assert _member_states(sim) == ["done", "done", "done"]


def test_a_second_sigint_abandons_the_restart_in_flight_and_releases_its_slot_and_session(
    sim: SimCluster, tmp_path: Path
) -> None:
    config = _config(sim, tmp_path, min_healthy_time="1h")  # only the abandon can end this restart
    shepard = Console("--config", config, "restart", "web", "--concurrency", "1")
    shepard.wait_for(" restarting")
    shepard.proc.send_signal(signal.SIGINT)
    shepard.wait_for("SIGINT: starting no new restarts")
    shepard.proc.send_signal(signal.SIGINT)
    code, out, err = shepard.finish()

    assert code == 130, f"exit {code}\n{out}\n{err}"
    assert "SIGINT again: abandoning the restarts in flight" in err
    assert "0 restarted, 0 failed, 3 skipped" in out, out
    assert "abandoned while restarting" in out, out
    assert _slot_holders(sim) == [], "a slot is still held after the command exited"
    assert _rollout_sessions(sim) == [], "the rollout's sessions were left to expire"
    assert _member_states(sim) == ["pending", "pending", "restarting"]

    code, out, err = Console("--config", config, "status", "web").finish()
    assert code == 0 and "nobody is driving this plan" in out, (code, out, err)


def test_sigterm_stops_the_rollout_like_sigint_with_exit_143(sim: SimCluster, tmp_path: Path) -> None:
    config = _config(sim, tmp_path, min_healthy_time="10s")
    shepard = Console("--config", config, "restart", "web", "--concurrency", "1")
    shepard.wait_for(" restarting")
    shepard.proc.send_signal(signal.SIGTERM)
    code, out, err = shepard.finish()

    assert code == 143, f"exit {code}\n{out}\n{err}"
    assert "SIGTERM: starting no new restarts" in err
    assert len(sim.restarts()) == 1
    assert _slot_holders(sim) == [] and _rollout_sessions(sim) == []
