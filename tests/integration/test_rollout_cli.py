"""``shepard restart|status|resume|abort`` against the simulated cluster (sim-only: its restart record)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shepard_lib.cli import main
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCALE = 25.0
TOKEN = "cli-acl-token-5f0e9c2a7b"


@pytest.fixture(autouse=True)
def _isolated(no_client_env: None, restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEPARD_CONFIG_PATH", raising=False)


@pytest.fixture
def sim(sim_cluster_factory: SimClusterFactory) -> SimCluster:
    return sim_cluster_factory(
        time_scale=SCALE, acl_token=TOKEN
    )  # job web: 3 allocations, unhealthy_if broken


@pytest.fixture
def config(sim: SimCluster, tmp_path: Path) -> str:
    path = tmp_path / "shepard.yaml"
    path.write_text(
        f"consul: {{address: '{sim.consul_addr}', token: '{TOKEN}'}}\n"
        f"nomad: {{address: '{sim.nomad_addr}', token: '{TOKEN}'}}\n"
        "session_ttl: 60s\nlock_delay: 2s\nmin_healthy_time: 2s\nhealthy_deadline: 60s\n"
        f"time_scale: {SCALE}\n",
        encoding="utf-8",
    )
    return str(path)


def run(capsys: pytest.CaptureFixture[str], config: str, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", config, *argv])
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err, "an ACL token leaked into the output"
    return code, out, err


def test_restart_with_json_output_restarts_every_allocation_and_exits_0(
    sim: SimCluster, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, config, "restart", "web", "--concurrency", "2", "--output", "json")
    result: dict[str, Any] = json.loads(out)
    assert code == 0
    assert result["ok"] is True
    assert len(result["restarted"]) == 3
    assert result["plans"][0]["status"] == "complete"
    assert result["peak_concurrency"] <= 2
    assert len(sim.restarts()) == 3


def test_dry_run_prints_the_order_and_restarts_nothing(
    sim: SimCluster, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, config, "restart", "web", "--dry-run")
    assert code == 0
    assert "dry run, would restart 3 allocation(s)" in out
    assert [line.split(".")[0].strip() for line in out.splitlines()[1:4]] == ["1", "2", "3"]
    assert sim.restarts() == []


def test_failed_rollout_exits_1_and_status_resume_and_abort_work_on_its_plan(
    sim: SimCluster, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.set_key("config/web", "broken")
    code, out, _ = run(capsys, config, "restart", "web", "--concurrency", "1", "--max-failures", "0")
    assert code == 1
    assert "1 restarted" not in out and "1 failed" in out
    assert "FAILED app/server" in out

    code, out, _ = run(capsys, config, "status", "web")
    assert code == 0
    assert out.startswith("web/app/server: failed (1 failed restart(s) exceeded max_failures=0)")

    code, out, _ = run(capsys, config, "abort", "web/app/server", "--reason", "investigating")
    assert (code, out.strip()) == (0, "web/app/server: aborted (investigating), generation 1")

    sim.set_key("config/web", "v2")
    code, out, _ = run(capsys, config, "resume", "web/app/server", "--output", "json")
    assert code == 0
    assert json.loads(out)["plans"][0]["status"] == "complete"
    assert sorted(r.alloc_index for r in sim.restarts()) == [0, 0, 1, 2]


@pytest.mark.parametrize(
    "argv",
    [
        ["restart", "web", "--group", "nope"],
        ["restart", "nosuchjob"],
        ["restart", "web", "--concurrency", "0"],
        ["restart", "web", "--method", "telepathy"],
        ["resume", "web"],
    ],
)
def test_usage_and_config_errors_exit_2(
    sim: SimCluster, config: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run(capsys, config, *argv)
    assert code == 2
    assert err.strip()
    assert sim.restarts() == []
