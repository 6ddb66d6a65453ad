"""``scripts/test`` runs every step, lists all failures at the end, and skips Python 3.12 clearly.

The script runs in a copy of the repository whose virtualenvs hold stub tools, so the test checks
the script's control flow (not the checks themselves) in well under a second.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "test"


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _repo(tmp_path: Path, *, failing: set[str]) -> Path:
    """A checkout whose .venv and .venv-pyconsul tools log their calls; those in ``failing`` exit 1."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "test")
    log = repo / "calls.log"
    for script in ("real-cluster-sim", "mutation", "test-ansible"):
        _stub(repo / "scripts" / script, f'echo "scripts/{script} $*" >> "{log}"; exit 0')
    for venv in (".venv", ".venv-pyconsul"):
        _stub(repo / venv / "bin" / "python", 'case "$1" in -c) echo 3.11.0;; esac; exit 0')
        for tool in ("ruff", "mypy", "pytest"):
            code = 1 if f"{venv}/{tool}" in failing else 0
            _stub(repo / venv / "bin" / tool, f'echo "{venv}/{tool} $*" >> "{log}"; exit {code}')
    return repo


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo), "PYTHON": str(repo / ".venv" / "bin" / "python")}
    if not shutil.which("python3.12", path=env["PATH"]):
        env["PYENV_ROOT"] = str(repo / "no-pyenv")
    return subprocess.run(
        ["bash", "scripts/test", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_step_runs_and_every_failure_is_listed_at_the_end(tmp_path: Path) -> None:
    repo = _repo(tmp_path, failing={".venv/ruff", ".venv/mypy"})
    result = _run(repo)
    calls = (repo / "calls.log").read_text(encoding="utf-8")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "scripts/real-cluster-sim" in calls and "scripts/mutation --ci" in calls, calls
    assert "scripts/test-ansible" in calls, calls
    assert (
        ".venv/pytest" in calls
        and ".venv-pyconsul/pytest -p no:cacheprovider tests/backends tests/contract" in calls
    ), f"the steps after the failing ruff did not run: {calls!r}"
    summary = result.stderr[result.stderr.index("step(s) failed") - 4 :]
    assert "2 step(s) failed" in summary and "ruff" in summary and "mypy" in summary, result.stderr
    assert "pytest" not in summary, result.stderr


def test_all_steps_passing_exits_0_and_a_missing_python_312_is_a_clear_skip(tmp_path: Path) -> None:
    if shutil.which("python3.12", path="/usr/bin:/bin"):
        pytest.skip("this machine has python3.12 on /usr/bin: the skip path cannot be reached")
    result = _run(_repo(tmp_path, failing=set()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "SKIPPED: Python 3.12 is not installed" in result.stderr
    assert "skipped: unit tests on Python 3.12" in result.stdout


def test_stress_runs_the_checks_beside_cpu_hogs_and_stops_them(tmp_path: Path) -> None:
    repo = _repo(tmp_path, failing=set())
    result = _run(repo, "--stress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stress: " in result.stdout
    pids = [int(p) for p in re.search(r"\(pids ([\d ]+)\)", result.stdout).group(1).split()]  # type: ignore[union-attr]
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"CPU hogs {alive} still run after scripts/test ended"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
