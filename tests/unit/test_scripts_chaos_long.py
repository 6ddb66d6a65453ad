"""``scripts/chaos-long`` passes the seed count to the chaos tests, summarises seeds passed and failed,
and exits non-zero when a seed failed.

The script runs with a stub ``PYTHON`` whose ``-m pytest`` writes a JUnit report (as pytest's
``--junitxml`` does) instead of running the chaos tests, so the test checks the script's control flow
in well under a second.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos-long"

STUB = """#!/usr/bin/env bash
if [ "$1" != "-m" ]; then exec {python} "$@"; fi
echo "SEEDS=$SHEPARD_CHAOS_SEEDS ARGS=$*" >> "$STUB_LOG"
for arg in "$@"; do case $arg in --junitxml=*) report=${{arg#--junitxml=}} ;; esac; done
cases=""
for seed in $(seq 0 $((SHEPARD_CHAOS_SEEDS - 1))); do
    body=""
    if [ "$seed" = "$STUB_FAIL" ]; then body="<failure message='seed'/>"; fi
    cases="$cases<testcase classname='tests.chaos.test_chaos' name='test_invariants[$seed]'>$body</testcase>"
done
echo "<testsuites><testsuite>$cases</testsuite></testsuites>" > "$report"
[ -z "$STUB_FAIL" ]
"""


def _run(tmp_path: Path, *, seeds: int, fail: str = "") -> tuple[subprocess.CompletedProcess[str], str]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "chaos-long")
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable), encoding="utf-8")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PYTHON": str(stub),
        "SHEPARD_CHAOS_SEEDS": str(seeds),
        "STUB_FAIL": fail,
        "STUB_LOG": str(log),
        "CHAOS_LOG": str(tmp_path / "chaos.log"),
    }
    done = subprocess.run(
        ["bash", str(repo / "scripts" / "chaos-long"), "-x"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, log.read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/chaos-long is a bash script")
def test_all_seeds_passing_is_summarised_and_exits_0(tmp_path: Path) -> None:
    done, calls = _run(tmp_path, seeds=3)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SEEDS=3 " in calls and "tests/chaos" in calls and calls.rstrip().endswith("-x"), calls
    assert "test_chaos::test_invariants: 3 of 3 seeds passed\n" in done.stdout, done.stdout
    assert "SHEPARD_CHAOS_SEEDS=3, commit " in done.stdout and " load " in done.stdout, done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/chaos-long is a bash script")
def test_a_failed_seed_is_named_and_exits_non_zero(tmp_path: Path) -> None:
    done, _ = _run(tmp_path, seeds=4, fail="2")
    assert done.returncode != 0
    assert "test_chaos::test_invariants: 3 of 4 seeds passed; failed seeds: 2" in done.stdout, done.stdout
