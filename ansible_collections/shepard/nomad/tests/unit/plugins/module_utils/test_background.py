"""module_utils/background.py: the detached process reports once, errors are reported, silence times out."""

from __future__ import annotations

import os
import time

from ansible_collections.shepard.nomad.plugins.module_utils.background import run_detached


def test_the_first_report_is_returned_and_the_work_goes_on_detached(tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"
    caller_session = os.getsid(0)

    def work(report):
        report({"planned": True, "own_session": os.getsid(0) != caller_session})
        report({"planned": False})
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        done.write_text("still running after the caller went on")

    assert run_detached(work, timeout=60) == {"planned": True, "own_session": True}
    go.touch()
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.read_text() == "still running after the caller went on"


def test_an_exception_before_reporting_is_reported():
    def work(report):
        raise RuntimeError("consul is down")

    assert run_detached(work, timeout=60) == {"error": "consul is down"}


def test_work_that_ends_without_reporting_is_an_error():
    assert run_detached(lambda report: None, timeout=60) == {"error": "ended without reporting"}


def test_silence_times_out():
    assert run_detached(lambda report: time.sleep(30), timeout=0.5) == {"timeout": 0.5}
