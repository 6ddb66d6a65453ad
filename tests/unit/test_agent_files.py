"""The files that run the agent: its systemd unit (``--print-unit``) and the Nomad system job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import hcl2
import pytest

from shepard_lib.agent.unit import UnitOptions, render_unit
from shepard_lib.cli import main
from shepard_lib.config import load_config
from shepard_lib.gotemplate import render

REPO = Path(__file__).resolve().parents[2]
JOB_FILE = REPO / "examples" / "nomad" / "shepard-agent.nomad.hcl"


def print_unit(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    assert main(["agent", "--print-unit", *flags]) == 0
    return capsys.readouterr().out


def test_print_unit_is_deterministic_and_uses_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = [
        "--user",
        "nomadops",
        "--config-path",
        "/etc/s/a.yaml",
        "--venv",
        "/srv/venv",
        "--nomad-data-dir",
        "/data/nomad",
    ]
    first = print_unit(capsys, *flags, "--stop-timeout", "90")
    assert first == print_unit(capsys, *flags, "--stop-timeout", "90")
    lines = first.splitlines()
    for expected in (
        "User=nomadops",
        "Group=nomadops",
        "ExecStart=/srv/venv/bin/shepard agent --config /etc/s/a.yaml",
        "ReadOnlyPaths=/data/nomad",
        "TimeoutStopSec=90s",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "EnvironmentFile=-/etc/shepard/env",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert expected in lines, f"{expected!r} missing from the unit"


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--venv", "relative/venv"], "--venv: expected an absolute path"),
        (["--config-path", "/etc/with space.yaml"], "--config-path: expected an absolute path"),
        (["--user", "bad\nuser"], "--user: not a valid user or group name"),
        (["--stop-timeout", "0"], "--stop-timeout: expected seconds >= 1"),
    ],
)
def test_print_unit_rejects_values_that_would_break_the_unit(
    capsys: pytest.CaptureFixture[str], flags: list[str], problem: str
) -> None:
    assert main(["agent", "--print-unit", *flags]) == 2
    assert problem in capsys.readouterr().err


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: .ci/run installs the systemd package")
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    unit = tmp_path / "shepard-agent.service"
    unit.write_text(render_unit(UnitOptions(venv=sys.prefix, data_dir=str(tmp_path))), encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def _text(value: Any) -> str:
    """A python-hcl2 string: quotes stripped, an indented heredoc (``<<-EOT``) dedented."""
    text = str(value)
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1]
    if text.startswith("<<-"):
        body = text.split("\n", 1)[1]
        body = body[: body.rstrip().rfind("\n") + 1]  # drop the closing marker line
        return textwrap.dedent(body)
    return text


def _job() -> dict[str, Any]:
    data = hcl2.loads(JOB_FILE.read_text(encoding="utf-8"))
    (job,) = data["job"]
    ((name, body),) = job.items()
    assert _text(name) == "shepard-agent"
    return body


def test_the_nomad_system_job_runs_shepard_agent_on_the_host(tmp_path: Path) -> None:
    job = _job()
    assert _text(job["type"]) == "system"
    (group,) = job["group"]
    ((_, group_body),) = group.items()
    (task,) = group_body["task"]
    ((_, task_body),) = task.items()
    assert _text(task_body["driver"]) == "raw_exec", "the agent must see the host's Nomad data dir"
    (config,) = task_body["config"]
    assert _text(config["command"]) == "${var.shepard}"
    assert [_text(a) for a in config["args"]] == ["agent", "--config", "${NOMAD_TASK_DIR}/shepard.yaml"]
    assert _text(task_body["kill_signal"]) == "SIGTERM"
    (check,) = group_body["service"][0]["check"]
    assert _text(check["path"]) == "/ready"


def test_the_system_jobs_config_template_renders_to_a_valid_config(tmp_path: Path) -> None:
    job = _job()
    task_body = next(iter(next(iter(job["group"][0].values()))["task"][0].values()))
    template = next(t for t in task_body["template"] if _text(t["destination"]) == "local/shepard.yaml")
    assert _text(template["change_mode"]) == "signal" and _text(template["change_signal"]) == "SIGHUP"
    text = _text(template["data"]).replace("${var.nomad_data_dir}", "/opt/nomad/data")
    env = {
        "node.unique.name": "client-7",
        "attr.unique.network.ip-address": "10.1.2.3",
        "NOMAD_ADDR_metrics": "10.1.2.3:9464",
    }
    rendered = render(text, env, lambda key: None).text
    path = tmp_path / "shepard.yaml"
    path.write_text(rendered, encoding="utf-8")
    cfg = load_config(str(path), env={})
    assert cfg.node_name == "client-7"
    assert cfg.nomad_data_dir == "/opt/nomad/data"
    assert cfg.consul.address == "http://10.1.2.3:8500" and cfg.nomad.address == "http://10.1.2.3:4646"
    assert cfg.metrics_address == "10.1.2.3:9464"
