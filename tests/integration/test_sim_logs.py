"""Task log files under ``alloc/logs/`` with Nomad's names and rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shepard_lib.sim import SimCluster
from shepard_lib.sim.nomad.logs import TaskLogs


def _scenario(logs: dict[str, int]) -> dict[str, Any]:
    return {
        "nodes": ["n1"],
        "jobs": [{"name": "web", "groups": [{"name": "app", "count": 1, "tasks": [{"name": "server"}]}]}],
        "timing": {"restart": "1s", "healthy_after": "200ms"},
        "logs": logs,
    }


def _logs_dir(sim: SimCluster) -> Path:
    alloc = sim.nomad.allocation("web", "app", 0)
    return sim.node_data_dir("n1") / "alloc" / alloc.id / "alloc" / "logs"


def test_each_start_writes_stdout_and_stderr_lines(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario({"lines_per_start": 4}), time_scale=50)
    logs = _logs_dir(sim)
    assert sorted(p.name for p in logs.iterdir()) == [
        ".server.stderr.fifo",
        ".server.stdout.fifo",
        "server.stderr.0",
        "server.stdout.0",
    ]
    assert (logs / ".server.stdout.fifo").is_fifo(), "logmon's FIFOs are there, as on a real client"
    assert len((logs / "server.stdout.0").read_text().splitlines()) == 4
    sim.nomad.restart(sim.nomad.allocation("web", "app", 0).id)
    sim.wait_settled()
    lines = (logs / "server.stdout.0").read_text().splitlines()
    assert len(lines) == 4 + 1 + 4
    assert "SIGTERM" in lines[4] and "restarts 1" in lines[5]


def test_logs_rotate_at_the_size_limit_and_keep_max_files(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(
        _scenario({"max_file_size": 150, "max_files": 2, "lines_per_start": 3}), time_scale=50
    )
    alloc_id = sim.nomad.allocation("web", "app", 0).id
    for _ in range(4):
        sim.nomad.restart(alloc_id)
        sim.wait_settled()
    stdout = sorted(p for p in _logs_dir(sim).iterdir() if ".stdout." in p.name and p.is_file())
    indexes = sorted(int(p.name.rsplit(".", 1)[1]) for p in stdout)
    assert len(indexes) == 2 and indexes[1] == indexes[0] + 1 and indexes[0] > 0, indexes
    assert all(p.stat().st_size <= 150 for p in stdout)


def test_a_write_is_split_across_files_at_exactly_the_limit(tmp_path: Path) -> None:
    logs = TaskLogs(tmp_path, "t", max_file_size=10, max_files=5)
    logs.write("stdout", "0123456789abcdefghijXYZ")
    assert [logs.path("stdout", i).read_text() for i in range(3)] == ["0123456789", "abcdefghij", "XYZ"]
    again = TaskLogs(tmp_path, "t", max_file_size=10, max_files=5)
    again.write("stdout", "!")
    assert logs.path("stdout", 2).read_text() == "XYZ!", "a new writer continues the newest file"
