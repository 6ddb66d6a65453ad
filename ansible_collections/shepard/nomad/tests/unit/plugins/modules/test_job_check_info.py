"""shepard.nomad.job_check_info: the report is returned as is; an unknown job fails."""

from __future__ import annotations

from ansible_collections.shepard.nomad.plugins.module_utils import shepard as module_utils
from ansible_collections.shepard.nomad.plugins.modules import job_check_info
from shepard_lib.errors import NotFound
from shepard_lib.jobcheck import Finding, JobCheckReport, Severity, TaskReport


def test_the_report_is_returned_and_nothing_changes(run_module, monkeypatch):
    finding = Finding(Severity.WARNING, "trigger_splay", "local/shepard.tpl has splay = 5s")
    report = JobCheckReport("web", "default", (TaskReport("app", "server", True, (finding,)),))
    calls = []

    def check(nomad, job, *, key_prefix, health_source):
        calls.append((job, key_prefix, str(health_source)))
        return report

    monkeypatch.setattr(module_utils, "check_job_in_nomad", check)
    result = run_module(job_check_info, {"job": "web"}, check_mode=True)
    assert calls == [("web", "shepard", "consul")]
    assert result["changed"] is False and result["ready"] is True and result["managed_tasks"] == 1
    assert result["tasks"][0]["findings"] == [finding.to_dict()]


def test_an_unknown_job_fails_with_nomads_answer(run_module, monkeypatch):
    def check(nomad, job, **kwargs):
        raise NotFound(f"nomad job {job}", "job not found")

    monkeypatch.setattr(module_utils, "check_job_in_nomad", check)
    result = run_module(job_check_info, {"job": "nosuchjob"})
    assert result["failed"] is True and "nosuchjob" in result["msg"] and result["error"] == "NotFound"


def test_job_is_required(run_module):
    result = run_module(job_check_info, {})
    assert result["failed"] is True and "job" in result["msg"]
