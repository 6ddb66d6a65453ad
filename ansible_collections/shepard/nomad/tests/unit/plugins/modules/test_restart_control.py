"""shepard.nomad.restart_control: idempotence, check mode, diff, and error paths (library calls replaced)."""

from __future__ import annotations

import dataclasses

import pytest

from ansible_collections.shepard.nomad.plugins.modules import restart_control
from shepard_lib.errors import ConsulError
from shepard_lib.keyspace import TaskScope
from shepard_lib.plan import PlanSettings, PlanStatus, new_plan
from shepard_lib.rollout import PlanView, RollingRestart, RolloutResult

KEY = "shepard/locks/web/app/server/task_lock"
SCOPE = {"job": "web", "group": "app", "task": "server"}


class FakePlans:
    """The plan of web/app/server as RollingRestart.status/abort/resume see it."""

    def __init__(self, status, orphaned=False):
        plan = new_plan("web", "app", "server", None, instance_count=3, settings=PlanSettings(2, 1), now=0.0)
        self.plan = dataclasses.replace(plan, status=PlanStatus(status))
        self.orphaned = orphaned
        self.calls = []

    def status(self, job=None, group=None, task=None):
        self.calls.append(("status", job, group, task))
        if self.plan is None:
            return []
        return [PlanView(KEY, TaskScope("web", "app", "server"), self.plan, orphaned=self.orphaned)]

    def abort(self, job, group, task, reason):
        self.calls.append(("abort", job, group, task, reason))
        self.plan = dataclasses.replace(self.plan, status=PlanStatus.ABORTED, halt_reason=reason)

    def resume(self, job, group, task):
        self.calls.append(("resume", job, group, task))
        self.plan = dataclasses.replace(self.plan, status=PlanStatus.COMPLETE, halt_reason=None)
        self.orphaned = False
        return RolloutResult(job)


@pytest.fixture
def plans(monkeypatch):
    fake = FakePlans("planned")
    for name in ("status", "abort", "resume"):
        monkeypatch.setattr(RollingRestart, name, lambda self, *a, _n=name, **kw: getattr(fake, _n)(*a, **kw))
    return fake


def _writes(plans):
    return [c for c in plans.calls if c[0] != "status"]


def test_abort_a_running_plan_changes_it_and_shows_the_diff(run_module, plans):
    result = run_module(restart_control, dict(SCOPE, state="aborted", reason="looking"))
    assert result["changed"] is True
    assert _writes(plans) == [("abort", "web", "app", "server", "looking")]
    assert result["diff"] == {
        "before": {KEY: {"status": "planned", "halt_reason": None, "orphaned": False}},
        "after": {KEY: {"status": "aborted", "halt_reason": "looking", "orphaned": False}},
    }
    assert result["plans"][0]["plan"]["status"] == "aborted"


@pytest.mark.parametrize(("status", "state"), [("aborted", "aborted"), ("complete", "aborted"),
                                               ("planned", "resumed"), ("complete", "resumed")])
def test_a_plan_already_in_the_state_asked_for_is_left_alone(run_module, plans, status, state):
    plans.plan = dataclasses.replace(plans.plan, status=PlanStatus(status))
    result = run_module(restart_control, dict(SCOPE, state=state))
    assert result["changed"] is False
    assert _writes(plans) == []


def test_check_mode_tells_the_change_and_writes_nothing(run_module, plans):
    plans.plan = dataclasses.replace(plans.plan, status=PlanStatus.FAILED, halt_reason="1 failed")
    result = run_module(restart_control, dict(SCOPE, state="resumed"), check_mode=True)
    assert result["changed"] is True
    assert result["diff"]["after"][KEY] == {"status": "planned", "halt_reason": None, "orphaned": False}
    assert _writes(plans) == []


def test_resume_runs_the_rollout_and_returns_it(run_module, plans):
    plans.plan = dataclasses.replace(plans.plan, status=PlanStatus.FAILED, halt_reason="1 failed")
    result = run_module(restart_control, dict(SCOPE, state="resumed"))
    assert result["changed"] is True and "failed" not in result
    assert _writes(plans) == [("resume", "web", "app", "server")]
    assert result["rollout"]["ok"] is True and result["rollout"]["restarted_allocations"] == []
    assert result["diff"]["after"][KEY]["status"] == "complete"


def test_no_plan_fails_naming_the_task(run_module, plans):
    plans.plan = None
    result = run_module(restart_control, dict(SCOPE, state="aborted"))
    assert result["failed"] is True
    assert result["msg"] == "no plan for web/app/server: nothing to abort"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(SCOPE), "missing required arguments: state"),
        ({"job": "web", "state": "aborted"}, "missing required arguments: group, task"),
        (dict(SCOPE, state="paused"), "value of state must be one of: resumed, aborted"),
    ],
)
def test_bad_arguments_fail(run_module, plans, args, message):
    result = run_module(restart_control, args)
    assert result["failed"] is True and message in result["msg"]
    assert plans.calls == []


def test_a_consul_error_fails_with_its_message(run_module, monkeypatch):
    def refuse(self, *args):
        raise ConsulError("kv.keys shepard/locks/", "Permission denied", status=403)

    monkeypatch.setattr(RollingRestart, "status", refuse)
    result = run_module(restart_control, dict(SCOPE, state="aborted"))
    assert result["failed"] is True
    assert result["msg"] == "consul kv.keys shepard/locks/ failed (HTTP 403): Permission denied"


def test_resume_drives_an_orphaned_plan(run_module, plans):
    plans.orphaned = True
    result = run_module(restart_control, dict(SCOPE, state="resumed"))
    assert result["changed"] is True
    assert _writes(plans) == [("resume", "web", "app", "server")]
    assert result["diff"]["before"][KEY]["orphaned"] is True
    assert result["diff"]["after"][KEY] == {"status": "complete", "halt_reason": None, "orphaned": False}
