"""``shepard sim serve`` as a subprocess: one ready line, real APIs, clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from shepard_lib.sim.scenario import small_scenario

READY = re.compile(r"^ready consul=(http://127\.0\.0\.1:\d+) nomad=(http://127\.0\.0\.1:\d+)$")
SCENARIO = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "web-9.yaml"


def _serve(*args: str, **extra_env: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD_", "CONSUL_"))} | extra_env
    code = "import sys; from shepard_lib.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "sim", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_serve_prints_one_ready_line_serves_and_exits_on_sigterm(tmp_path: Path) -> None:
    args = (
        "--scenario",
        str(SCENARIO),
        "--time-scale",
        "20",
        "--data-dir",
        str(tmp_path),
        "--acl-token",
        "s3cret",
    )
    with _serve(*args) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().rstrip("\n")
            match = READY.match(line)
            if not match:
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"expected the ready line, got {line!r}; stderr: {err}")
            consul, nomad = match.groups()
            export = proc.stdout.readline()
            token = {"X-Nomad-Token": "s3cret"}
            allocs = requests.get(f"{nomad}/v1/allocations", headers=token, timeout=10).json()
            assert len(allocs) == 9 and {a["ClientStatus"] for a in allocs} == {"running"}
            assert requests.get(f"{nomad}/v1/allocations", timeout=10).status_code == 403
            leader = requests.get(
                f"{consul}/v1/status/leader", headers={"X-Consul-Token": "s3cret"}, timeout=10
            )
            assert leader.status_code == 200
            assert (tmp_path / "n1" / "alloc").is_dir()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert export == f"export CONSUL_HTTP_ADDR={consul} NOMAD_ADDR={nomad} SHEPARD_TIME_SCALE=20\n", (
        "the ready line, then the line that points Shepard at the sim"
    )
    assert out == "", "nothing else on stdout"
    assert "s3cret" not in out + err


def test_serve_with_an_invalid_scenario_exits_2_naming_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 0\n")
    with _serve("--scenario", str(bad)) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert out == ""
    assert "nodes:" in err and "Traceback" not in err


AGENT = re.compile(r"^agent node=(\S+) nomad=(http://127\.0\.0\.1:\d+) data_dir=(\S+)$")


def test_serve_with_agents_prints_each_nodes_own_agent_api_before_the_ready_line(tmp_path: Path) -> None:
    with _serve("--scenario", str(SCENARIO), "--data-dir", str(tmp_path), "--agents") as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().rstrip("\n") for _ in range(4)]
            agents = [AGENT.match(line) for line in lines[:3]]
            assert all(agents), f"expected three agent lines then ready, got {lines!r}"
            assert READY.match(lines[3]), f"expected the ready line last, got {lines[3]!r}"
            for match in agents:
                assert match is not None
                node, nomad, data_dir = match.groups()
                me = requests.get(f"{nomad}/v1/agent/self", timeout=10).json()
                assert me["config"]["NodeName"] == node
                assert Path(data_dir) == tmp_path / node and (Path(data_dir) / "alloc").is_dir()
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0


@pytest.mark.parametrize("kind", ["under /proc", "a regular file"])
def test_serve_with_an_unusable_data_dir_exits_2_naming_it(tmp_path: Path, kind: str) -> None:
    if kind == "a regular file":
        data_dir = tmp_path / "file"
        data_dir.write_text("x")
    else:
        data_dir = Path("/proc/shepard-no-such-dir")
    with _serve("--data-dir", str(data_dir)) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert out == ""
    assert err.startswith(f"--data-dir {data_dir}: ") and "Traceback" not in err, err


def test_serve_on_a_port_in_use_exits_1_and_leaves_no_temp_dir(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with _serve("--consul-port", str(port), TMPDIR=str(tmp_path)) as proc:
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "cannot start" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], "an empty shepard-sim-* dir was left behind"


def test_sigterm_while_waiting_for_tasks_to_become_healthy_stops_at_once(tmp_path: Path) -> None:
    scenario = small_scenario()
    del scenario["keys"]  # the template's key does not exist: no task ever starts
    path = tmp_path / "never-healthy.yaml"
    path.write_text(yaml.safe_dump(scenario))
    data_dir = tmp_path / "d"
    with _serve("--scenario", str(path), "--data-dir", str(data_dir)) as proc:
        try:
            _wait_for_allocations(data_dir, proc)  # placed: the start now waits for them to be healthy
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)  # the start alone would wait 120 s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err, err


def _wait_for_allocations(data_dir: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not any(data_dir.glob("*/alloc/*/server")):
        assert proc.poll() is None, "sim serve exited before placing its allocations"
        assert time.monotonic() < deadline, f"no allocation directory under {data_dir} after 60 s"
        time.sleep(0.1)
