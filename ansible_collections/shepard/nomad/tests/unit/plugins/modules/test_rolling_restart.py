"""shepard.nomad.rolling_restart: arguments, changed/failed from the rollout's result, error paths."""

from __future__ import annotations

import pytest

from ansible_collections.shepard.nomad.plugins.modules import rolling_restart
from shepard_lib.config import HealthSource, RestartMethod
from shepard_lib.coordinator import MemberOutcome, Outcome, Target
from shepard_lib.errors import NotFound
from shepard_lib.keyspace import TaskRef, TaskScope
from shepard_lib.rollout import PlannedRestart, RollingRestart, RolloutResult, ScopeSummary

SCOPE = TaskScope("web", "app", "server")


def _outcome(index, outcome, reason=""):
    return MemberOutcome(Target(TaskRef("n1", "web", "app", "server", index), f"alloc-{index}"), outcome, reason)


def _result(restarted=0, failed=0, status="complete", dry_run=False, warnings=()):
    halt = "1 failed restart(s) reached max_failures=1" if status == "failed" else None
    return RolloutResult(
        "web",
        dry_run=dry_run,
        planned=tuple(PlannedRestart(i, f"alloc-{i}", "n1", i, "app", "server") for i in range(restarted + failed)),
        restarted=tuple(_outcome(i, Outcome.RESTARTED) for i in range(restarted)),
        failed=tuple(_outcome(restarted + i, Outcome.FAILED, "unhealthy") for i in range(failed)),
        plans=(ScopeSummary(SCOPE, status, 1, 2, 1, halt),),
        peak_concurrency=min(2, restarted + failed),
        warnings=warnings,
    )


@pytest.fixture
def runs(monkeypatch):
    """Replace RollingRestart.run: record its calls and return the queued results."""
    calls, results = [], []

    def run(self, job_id, options):
        calls.append((self.name, job_id, options))
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(RollingRestart, "run", run)
    return calls, results


def test_options_reach_the_library(run_module, runs):
    calls, results = runs
    results.append(_result(restarted=2))
    result = run_module(
        rolling_restart,
        {
            "job": "web",
            "group": "app",
            "task": "server",
            "alloc_ids": ["ab12", "cd34"],
            "concurrency": 2,
            "method": "nomad_api",
            "health_source": "both",
            "min_healthy_time": "1m30s",
            "healthy_deadline": "5m",
            "max_failures": 3,
            "again": True,
        },
    )
    assert result["changed"] is True and result["ok"] is True
    ((name, job, options),) = calls
    assert (name, job) == ("ansible shepard.nomad.rolling_restart", "web")
    assert (options.group, options.task, options.alloc_ids) == ("app", "server", ("ab12", "cd34"))
    assert (options.concurrency, options.max_failures, options.again) == (2, 3, True)
    assert (options.method, options.health_source) == (RestartMethod.NOMAD_API, HealthSource.BOTH)
    assert (options.min_healthy_time, options.healthy_deadline, options.dry_run) == (90.0, 300.0, False)


def test_unset_options_are_left_to_the_configuration(run_module, runs):
    calls, results = runs
    results.append(_result(restarted=1))
    run_module(rolling_restart, {"job": "web"})
    options = calls[0][2]
    assert (options.group, options.concurrency, options.method, options.min_healthy_time) == (None, None, None, None)
    assert options.again is False


def test_nothing_restarted_is_not_changed(run_module, runs):
    runs[1].append(_result(restarted=0))
    result = run_module(rolling_restart, {"job": "web"})
    assert result["changed"] is False and "failed" not in result
    assert result["restarted_allocations"] == []


def test_a_halted_rollout_fails_with_the_plan_failed(run_module, runs):
    runs[1].append(_result(restarted=1, failed=1, status="failed"))
    result = run_module(rolling_restart, {"job": "web"})
    assert result["failed"] is True and result["changed"] is True
    assert result["msg"] == (
        "rollout halted: plan web/app/server is failed (1 failed restart(s) reached max_failures=1); "
        "1 allocation(s) failed and 0 were skipped"
    )
    assert result["plans"][0]["status"] == "failed"
    assert [a["reason"] for a in result["failed_allocations"]] == ["unhealthy"]


def test_check_mode_is_a_dry_run_and_changed_tells_whether_anything_would_restart(run_module, runs):
    calls, results = runs
    results.append(RolloutResult("web", dry_run=True, planned=(PlannedRestart(0, "a", "n1", 0, "app", "server"),)))
    result = run_module(rolling_restart, {"job": "web"}, check_mode=True)
    assert calls[0][2].dry_run is True
    assert result["changed"] is True and result["ok"] is False and result["started"] is False
    assert "failed" not in result


def test_warnings_become_ansible_warnings(run_module, runs):
    runs[1].append(_result(restarted=1, warnings=("joined a rollout with concurrency 1",)))
    result = run_module(rolling_restart, {"job": "web"})
    assert "warnings" not in result  # given to AnsibleModule.warn, which Ansible shows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "missing required arguments: job"),
        ({"job": "web", "method": "telepathy"}, "value of method must be one of: consul_key, nomad_api"),
        ({"job": "web", "health_source": "vibes"}, "value of health_source must be one of"),
        ({"job": "web", "concurrency": "many"}, "cannot be converted to an int"),
        ({"job": "web", "min_healthy_time": "10"}, "min_healthy_time: not a duration: '10'"),
        ({"job": "web", "healthy_deadline": "-5m"}, "healthy_deadline: not a duration"),
        ({"job": "web", "concurrency": 0}, "concurrency must be >= 1, got 0"),
        ({"job": "web", "max_failures": -1}, "max_failures must be >= 0, got -1"),
        ({"job": "web", "colour": "blue"}, "Unsupported parameters"),
    ],
)
def test_bad_arguments_fail_naming_the_option(run_module, runs, args, message):
    result = run_module(rolling_restart, args)
    assert result["failed"] is True
    assert message in result["msg"]
    assert runs[0] == []


def test_a_library_error_fails_with_its_message_not_a_traceback(run_module, runs):
    runs[1].append(NotFound("job nosuch", "job not found", status=404))
    result = run_module(rolling_restart, {"job": "nosuch"})
    assert result == {"msg": "backend job nosuch failed (HTTP 404): job not found", "error": "NotFound", "failed": True}


def test_wait_false_with_nothing_to_restart_starts_nothing(run_module, runs, monkeypatch):
    runs[1].append(RolloutResult("web", dry_run=True))
    monkeypatch.setattr(rolling_restart, "run_detached", lambda *a: pytest.fail("started a rollout"))
    result = run_module(rolling_restart, {"job": "web", "wait": False})
    assert (result["changed"], result["started"]) == (False, False)


def test_wait_false_fails_when_the_detached_rollout_reports_an_error(run_module, runs, monkeypatch):
    runs[1].append(_result(restarted=2, dry_run=True))
    monkeypatch.setattr(rolling_restart, "run_detached", lambda work, timeout: {"error": "consul is down"})
    result = run_module(rolling_restart, {"job": "web", "wait": False})
    assert result["failed"] is True and result["started"] is False
    assert result["msg"] == "the rollout did not start: consul is down"


def test_wait_false_fails_but_says_the_rollout_may_still_start_when_it_does_not_report_in_time(
    run_module, runs, monkeypatch
):
    runs[1].append(_result(restarted=2, dry_run=True))
    monkeypatch.setattr(rolling_restart, "run_detached", lambda work, timeout: {"timeout": timeout})
    result = run_module(rolling_restart, {"job": "web", "wait": False, "start_timeout": 5})
    assert result["failed"] is True and result["started"] is True
    assert result["msg"].startswith("the rollout has not registered its plan within start_timeout=5 s; it may")
