"""shepard.nomad.restart_status_info: filters reach the library; results; error path."""

from __future__ import annotations

from ansible_collections.shepard.nomad.plugins.modules import restart_status_info
from shepard_lib.errors import ConsulError
from shepard_lib.keyspace import TaskScope
from shepard_lib.rollout import PlanView, RollingRestart


def test_filters_reach_the_library_and_views_are_returned(run_module, monkeypatch):
    calls = []

    def status(self, job=None, group=None, task=None):
        calls.append((job, group, task))
        return [PlanView("shepard/locks/web/app/server/task_lock", TaskScope("web", "app", "server"), None, {0: "x"})]

    monkeypatch.setattr(RollingRestart, "status", status)
    result = run_module(restart_status_info, {"job": "web", "task": "server"}, check_mode=True)
    assert calls == [("web", None, "server")]
    assert result["changed"] is False
    assert result["plans"] == [
        {
            "key": "shepard/locks/web/app/server/task_lock",
            "job": "web",
            "group": "app",
            "task": "server",
            "node": None,
            "plan": None,
            "slot_holders": {"0": "x"},
            "orphaned": False,
        }
    ]


def test_an_unreachable_consul_fails_with_shepards_message(run_module, monkeypatch):
    def down(self, *args):
        raise ConsulError("kv.keys shepard/locks/", "connection refused", transient=True)

    monkeypatch.setattr(RollingRestart, "status", down)
    result = run_module(restart_status_info, {})
    assert result == {
        "failed": True,
        "msg": "consul kv.keys shepard/locks/ failed: connection refused",
        "error": "ConsulError",
    }


def test_unknown_options_fail(run_module):
    result = run_module(restart_status_info, {"jobs": ["web"]})
    assert result["failed"] is True and "Unsupported parameters" in result["msg"]
