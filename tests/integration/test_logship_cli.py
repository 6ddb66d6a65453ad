"""``shepard logs ship --once`` against the simulated cluster: this node's allocations found through
Nomad's API (``/v1/agent/self`` or ``node_name``), their log files shipped with Nomad's tags.

Also runs against a real Nomad client when ``NOMAD_ADDR`` and ``SHEPARD_TEST_NOMAD_DATA_DIR`` (the
client's readable ``data_dir``, on this machine) are set; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from shepard_lib.cli import main
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCENARIO: dict[str, Any] = {
    "nodes": [{"name": "n1", "datacenter": "east"}, {"name": "n2", "datacenter": "west"}],
    "jobs": [{"name": "web", "groups": [{"name": "app", "count": 4, "tasks": [{"name": "server"}]}]}],
    "timing": {"restart": "1s", "healthy_after": "200ms"},
    "logs": {"lines_per_start": 6},
}
REAL_SKIP = (
    "NOMAD_ADDR and SHEPARD_TEST_NOMAD_DATA_DIR (the local Nomad client's data_dir, readable here) are "
    "needed to ship a real client's logs"
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    monkeypatch.delenv("SHEPARD_CONFIG_PATH", raising=False)


def _config(tmp_path: Path, nomad: str, data_dir: Path, extra: str = "", scale: float = 1.0) -> str:
    path = tmp_path / "shepard.yaml"
    path.write_text(
        f"time_scale: {scale:g}\n"  # the sim's clock: a mismatch is a usage error
        f"nomad: {{address: '{nomad}'}}\n"
        f"nomad_data_dir: '{data_dir}'\n"
        "log_shipping:\n"
        f"  path: '{tmp_path / 'tasks.jsonl'}'\n"
        f"  checkpoint_path: '{tmp_path / 'checkpoints.json'}'\n"
        "  tags: {env: test}\n" + extra,
        encoding="utf-8",
    )
    return str(path)


def _shipped(tmp_path: Path) -> list[dict[str, Any]]:
    with (tmp_path / "tasks.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _expected(sim: SimCluster, node: str) -> dict[tuple[str, str], list[str]]:
    out = {}
    for alloc in sim.nomad.allocations():
        logs = sim.node_data_dir(node) / "alloc" / alloc.id / "alloc" / "logs"
        for stream in ("stdout", "stderr"):
            path = logs / f"server.{stream}.0"
            if path.exists():
                out[(alloc.id, stream)] = path.read_text().splitlines()
    return out


@pytest.mark.parametrize("how", ["agent_self", "node_name"])
def test_logs_ship_once_ships_this_nodes_allocations_with_their_tags(
    sim_cluster_factory: SimClusterFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_client_env: None,
    how: str,
) -> None:
    sim = sim_cluster_factory(SCENARIO, time_scale=50)
    if how == "agent_self":
        cfg = _config(tmp_path, sim.nomad_agent_addr("n2"), sim.node_data_dir("n2"), scale=50)
    else:
        cfg = _config(tmp_path, sim.nomad_addr, sim.node_data_dir("n2"), extra="node_name: n2\n", scale=50)
    assert main(["--config", cfg, "logs", "ship", "--once", "--output", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    records = _shipped(tmp_path)
    expected = _expected(sim, "n2")
    assert expected and report["ok"] and report["sinks"][0]["lines"] == len(records)
    on_n2 = {a.id: a for a in sim.nomad.allocations() if a.node.spec.name == "n2"}
    assert {r["nomad.allocation.id"] for r in records} == set(on_n2)
    for (alloc_id, stream), lines in expected.items():
        got = [r for r in records if (r["nomad.allocation.id"], r["stream"]) == (alloc_id, stream)]
        assert [r["message"] for r in got] == lines
        alloc = on_n2[alloc_id]
        assert {k: v for k, v in got[0].items() if k.startswith("nomad.") or k == "env"} == {
            "nomad.allocation.id": alloc_id,
            "nomad.allocation.name": f"web.app[{alloc.index}]",
            "nomad.job.name": "web",
            "nomad.task.name": "server",
            "nomad.namespace": "default",
            "nomad.datacenter": "west",
            "nomad.group.name": "app",
            "nomad.allocation.index": str(alloc.index),
            "nomad.node.name": "n2",
            "env": "test",
        }
    # A restart writes more lines; the next round ships only those.
    sim.nomad.restart(next(iter(on_n2)))
    sim.wait_settled()
    assert main(["--config", cfg, "logs", "ship", "--once"]) == 0
    assert "file: " in capsys.readouterr().out
    again = _shipped(tmp_path)
    assert len(again) > len(records), "the restart's lines were shipped"
    for (alloc_id, stream), lines in _expected(sim, "n2").items():
        got = [r["message"] for r in again if (r["nomad.allocation.id"], r["stream"]) == (alloc_id, stream)]
        assert got == lines, "every line exactly once"


def test_logs_ship_exits_1_when_a_sink_stays_down(
    sim_cluster_factory: SimClusterFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_client_env: None,
) -> None:
    sim = sim_cluster_factory(SCENARIO, time_scale=50)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = _config(tmp_path, sim.nomad_agent_addr("n1"), sim.node_data_dir("n1"), scale=50)
    text = Path(cfg).read_text().replace(str(tmp_path / "tasks.jsonl"), str(blocker / "x.jsonl"))
    Path(cfg).write_text(text)
    assert main(["--config", cfg, "logs", "ship", "--once"]) == 1
    assert "paused: file sink: cannot write" in capsys.readouterr().out


def test_logs_ship_exits_1_and_names_a_stream_it_had_to_skip(
    sim_cluster_factory: SimClusterFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_client_env: None,
) -> None:
    sim = sim_cluster_factory(SCENARIO, time_scale=50)
    cfg = _config(tmp_path, sim.nomad_agent_addr("n1"), sim.node_data_dir("n1"), scale=50)
    assert main(["--config", cfg, "logs", "ship", "--once"]) == 0
    checkpoints = tmp_path / "checkpoints.json"
    saved = json.loads(checkpoints.read_text())
    alloc_id, entry = sorted(saved["allocations"].items())[0]
    entry["positions"]["server"]["stdout"]["file"][1] = -1  # a damaged checkpoint
    capsys.readouterr()
    checkpoints.write_text(json.dumps(saved))
    assert main(["--config", cfg, "logs", "ship", "--once"]) == 1
    out = capsys.readouterr().out
    assert "stream skipped this round: file: " in out and "invalid checkpoint offset -1" in out
    assert main(["--config", cfg, "logs", "ship", "--once"]) == 0, "the stream was reset and read again"
    checkpoints.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["--config", cfg, "logs", "ship", "--once", "--output", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["stream_errors"]) == 1 and alloc_id in report["stream_errors"][0]
    assert "invalid checkpoint offset -1" in report["stream_errors"][0] and not report["ok"]


@pytest.mark.real_cluster
def test_logs_ship_once_against_a_real_nomad_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, data_dir = os.environ.get("NOMAD_ADDR"), os.environ.get("SHEPARD_TEST_NOMAD_DATA_DIR")
    if not address or not data_dir:
        pytest.skip(REAL_SKIP)
    cfg = _config(tmp_path, address, Path(data_dir))
    assert main(["--config", cfg, "logs", "ship", "--once", "--output", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"]
    for record in _shipped(tmp_path) if (tmp_path / "tasks.jsonl").exists() else []:
        assert record["nomad.allocation.id"] and record["nomad.node.name"]


def test_logs_ship_exits_1_when_nomad_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_client_env: None
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{probe.getsockname()[1]}"
    cfg = _config(tmp_path, address, tmp_path / "data", extra="node_name: n1\n")
    assert main(["--config", cfg, "logs", "ship", "--once"]) == 1
    assert "allocations not listed" in capsys.readouterr().out
