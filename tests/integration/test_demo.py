"""``shepard demo`` through the real console script: every run happens and tells the truth.

The demo only runs on its embedded simulator (it is the one command that needs no cluster), so it
has no real-cluster variant: ``shepard restart`` and the agent tests carry those.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHEPARD = Path(sys.executable).parent / "shepard"
N, C = 8, 2


@pytest.fixture(scope="module")
def demo() -> dict[str, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD_", "CONSUL_", "SHEPARD_"))}
    done = subprocess.run(
        [
            str(SHEPARD),
            "demo",
            "--allocations",
            str(N),
            "--nodes",
            "4",
            "--concurrency",
            str(C),
            "--output",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert (report["allocations"], report["concurrency"]) == (N, C)
    return {run["mode"]: run for run in report["runs"]}


def test_nomad_alone_takes_every_instance_down_at_once(demo: dict[str, dict[str, object]]) -> None:
    run = demo["uncoordinated"]
    assert (run["peak_concurrent_restarts"], run["min_healthy"], run["restarted"]) == (N, 0, N)


def test_splay_restarts_everything_without_a_limit(demo: dict[str, dict[str, object]]) -> None:
    assert demo["splay"]["restarted"] == N


def test_shepard_restarts_everything_within_its_limit(demo: dict[str, dict[str, object]]) -> None:
    run = demo["shepard"]
    assert run["restarted"] == N and run["failed"] == 0 and run["plan_status"] == "complete"
    assert 1 <= int(str(run["peak_concurrent_restarts"])) <= C
    assert run["min_healthy"] == N - int(str(run["peak_concurrent_restarts"]))
    assert run["seconds_below_floor"] == 0


def test_a_bad_config_takes_the_herd_down_and_stops_shepard_at_the_first_failures(
    demo: dict[str, dict[str, object]],
) -> None:
    herd, shepard = demo["uncoordinated_bad_config"], demo["shepard_bad_config"]
    assert herd["min_healthy"] == 0 and herd["failed"] == N
    assert shepard["plan_status"] == "failed" and shepard["restarted"] == 0
    assert 1 <= int(str(shepard["failed"])) <= C
    assert int(str(shepard["min_healthy"])) >= N - C
