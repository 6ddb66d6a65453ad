"""shepard_lib.jobcheck on jobs parsed from Nomad's job JSON (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from shepard_lib.backends.nomad import parse_job
from shepard_lib.config import HealthSource
from shepard_lib.jobcheck import JobCheckReport, Severity, check_job
from shepard_lib.keyspace import shepard_template

SEED_TEMPLATE = (
    '{{keyOrDefault (printf "shepard/keys/%s/%s/%s/%s/%s" (env "NOMAD_NODE_NAME")(env "NOMAD_JOB_NAME")'
    '(env "NOMAD_GROUP_NAME")(env "NOMAD_TASK_NAME")(env "NOMAD_ALLOC_INDEX")) ""}}'
)
UNESCAPED_TEMPLATE = (
    '{{ keyOrDefault (printf "shepard/keys/%s/%s/%s/%s/%s" (env "node.unique.name") (env "NOMAD_JOB_ID") '
    '(env "NOMAD_GROUP_NAME") (env "NOMAD_TASK_NAME") (env "NOMAD_ALLOC_INDEX")) "" }}'
)
# The template Shepard printed before it keyed by NOMAD_JOB_ID: right only while Name == ID.
BY_NAME_TEMPLATE = shepard_template().replace('env "NOMAD_JOB_ID"', 'env "NOMAD_JOB_NAME"')
CHECK = {"Name": "alive", "Type": "http"}


def template(dest: str, change_mode: str = "noop", data: str = "x", splay_s: float = 0.0) -> dict[str, Any]:
    return {"DestPath": dest, "ChangeMode": change_mode, "EmbeddedTmpl": data, "Splay": int(splay_s * 1e9)}


def trigger(**kw: Any) -> dict[str, Any]:
    kw.setdefault("change_mode", "restart")
    kw.setdefault("data", shepard_template())
    return template("local/shepard.tpl", **kw)


def job(
    tasks: list[dict[str, Any]],
    *,
    name: str = "web",
    job_id: str | None = None,
    group_services: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "ID": name if job_id is None else job_id,
        "Name": name,
        "Namespace": "default",
        "TaskGroups": [{"Name": "app", "Count": 3, "Tasks": tasks, "Services": group_services}],
    }


def task(templates: list[dict[str, Any]], services: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if services is None:
        services = [{"Name": "web", "Provider": "consul", "Checks": [CHECK]}]
    return {"Name": "server", "Templates": templates, "Services": services}


def check(
    data: dict[str, Any], source: HealthSource = HealthSource.CONSUL, prefix: str = "shepard"
) -> JobCheckReport:
    return check_job(parse_job(data), key_prefix=prefix, health_source=source)


def codes(report: JobCheckReport) -> dict[str, Severity]:
    return {f.code: f.severity for t in report.tasks for f in t.findings}


def test_a_task_with_the_printed_template_and_a_checked_service_is_ready() -> None:
    report = check(job([task([trigger(), template("local/app.conf")])]))
    assert report.ok, report.to_dict()
    assert codes(report) == {}
    assert report.to_dict()["managed_tasks"] == 1


def test_the_seeds_template_reads_an_empty_node_segment_and_is_an_error() -> None:
    report = check(job([task([trigger(data=SEED_TEMPLATE)])]))
    assert not report.ok
    (finding,) = report.tasks[0].findings
    assert finding.code == "trigger_key" and finding.severity is Severity.ERROR
    assert "shepard/keys//web/app/server/0" in finding.message, finding.message


def test_a_template_reading_another_prefix_names_the_key_it_reads() -> None:
    report = check(job([task([trigger()])]), prefix="ops/shepard")
    (finding,) = report.tasks[0].findings
    assert finding.code == "trigger_key"
    assert "shepard/keys/node-1/web/app/server/0" in finding.message
    assert "ops/shepard/keys/node-1/web/app/server/0" in finding.message


def test_an_unescaped_template_works_for_this_job_but_warns_about_child_jobs() -> None:
    report = check(job([task([trigger(data=UNESCAPED_TEMPLATE)])]))
    assert report.ok
    assert codes(report) == {"trigger_escaping": Severity.WARNING}


def test_an_unescaped_template_of_a_periodic_child_reads_the_wrong_key() -> None:
    report = check(job([task([trigger(data=UNESCAPED_TEMPLATE)])], name="backup/periodic-1700000000"))
    assert codes(report) == {"trigger_key": Severity.ERROR}


def test_the_printed_template_serves_a_periodic_child() -> None:
    assert check(job([task([trigger()])], name="backup/periodic-1700000000")).ok


def test_a_key_lookup_that_blocks_is_an_error_with_the_fix() -> None:
    blocking = shepard_template().replace("keyOrDefault", "key").replace(') "" }}', ") }}")
    report = check(job([task([trigger(data=blocking)])]))
    (finding,) = report.tasks[0].findings
    assert finding.code == "trigger_key" and "keyOrDefault" in finding.message


def test_a_template_outside_the_language_is_an_error() -> None:
    report = check(job([task([trigger(data="{{ nosuchfunc }}")])]))
    (finding,) = report.tasks[0].findings
    assert finding.code == "trigger_key" and "not a valid template" in finding.message


@pytest.mark.parametrize("mode", ["noop", "signal", "script"])
def test_quiet_change_modes_on_other_templates_are_fine(mode: str) -> None:
    assert check(job([task([trigger(), template("local/app.conf", change_mode=mode)])])).ok


def test_another_template_with_change_mode_restart_is_an_error() -> None:
    report = check(job([task([trigger(), template("local/app.conf", change_mode="restart")])]))
    assert not report.ok
    assert codes(report) == {"template_restarts": Severity.ERROR}
    assert "local/app.conf" in report.tasks[0].findings[0].message


def test_shepard_tpl_with_change_mode_noop_is_an_error() -> None:
    report = check(job([task([trigger(change_mode="noop")])]))
    assert codes(report) == {"trigger_change_mode": Severity.ERROR}


def test_splay_on_shepard_tpl_is_a_warning() -> None:
    report = check(job([task([trigger(splay_s=5)])]))
    assert report.ok
    assert codes(report) == {"trigger_splay": Severity.WARNING}
    assert "5s" in report.tasks[0].findings[0].message


@pytest.mark.parametrize(
    ("services", "why"),
    [
        ([], "registers no service"),
        ([{"Name": "web", "Provider": "consul", "Checks": None}], "have no check"),
        ([{"Name": "web", "Provider": "nomad", "Checks": [CHECK]}], "Nomad-native"),
    ],
)
def test_no_consul_check_warns_that_health_falls_back_to_task_state(services: list[Any], why: str) -> None:
    report = check(job([task([trigger()], services=services)]))
    assert report.ok
    assert codes(report) == {"no_health_check": Severity.WARNING}
    assert why in report.tasks[0].findings[0].message


def test_a_group_level_checked_service_covers_the_task() -> None:
    group_services = [{"Name": "web", "Provider": "consul", "Checks": [CHECK]}]
    assert codes(check(job([task([trigger()], services=[])], group_services=group_services))) == {}


def test_with_nomad_health_a_missing_check_is_no_concern() -> None:
    assert codes(check(job([task([trigger()], services=[])]), source=HealthSource.NOMAD)) == {}


def test_a_restart_template_without_shepard_tpl_is_an_error_and_the_job_not_ready() -> None:
    report = check(job([task([template("local/app.conf", change_mode="restart")])]))
    assert not report.ok
    assert not report.tasks[0].managed
    assert codes(report) == {"no_shepard_template": Severity.ERROR}


def test_a_job_whose_tasks_have_no_templates_is_not_ready_but_has_no_error() -> None:
    report = check(job([task([])]))
    assert not report.ok
    assert report.tasks[0].ready and not report.tasks[0].managed


def test_a_template_from_a_source_file_cannot_be_checked() -> None:
    tpl = {"DestPath": "local/shepard.tpl", "ChangeMode": "restart", "SourcePath": "local/in.tpl"}
    report = check(job([task([tpl])]))
    assert codes(report) == {"trigger_not_checked": Severity.WARNING}
    assert "local/in.tpl" in report.tasks[0].findings[0].message


def test_a_job_whose_name_differs_from_its_id_is_ready_with_the_printed_template() -> None:
    report = check(job([task([trigger()])], name="web", job_id="web-prod"))
    assert report.ok, report.to_dict()
    assert codes(report) == {}
    assert report.job == "web-prod"


def test_a_template_reading_the_job_name_of_a_renamed_job_is_an_error_naming_the_fix() -> None:
    report = check(job([task([trigger(data=BY_NAME_TEMPLATE)])], name="web", job_id="web-prod"))
    assert not report.ok
    (finding,) = report.tasks[0].findings
    assert finding.code == "trigger_key" and finding.severity is Severity.ERROR
    assert "reads shepard/keys/node-1/web/app/server/0" in finding.message, finding.message
    assert "not its trigger key shepard/keys/node-1/web-prod/app/server/0" in finding.message
    assert 'env "NOMAD_JOB_ID"' in finding.message


def test_a_template_reading_the_job_name_works_while_name_is_id_but_warns() -> None:
    report = check(job([task([trigger(data=BY_NAME_TEMPLATE)])]))
    assert report.ok, report.to_dict()
    assert codes(report) == {"trigger_job_name": Severity.WARNING}
    assert "NOMAD_JOB_ID" in report.tasks[0].findings[0].message


def test_the_printed_template_serves_a_dispatched_child() -> None:
    child = "batch/dispatch-1712345678-0a1b2c3d"
    assert codes(check(job([task([trigger()])], name=child))) == {}
    unescaped = check(job([task([trigger(data=UNESCAPED_TEMPLATE)])], name=child))
    assert codes(unescaped) == {"trigger_key": Severity.ERROR}
    assert "batch,2Fdispatch-1712345678-0a1b2c3d" in unescaped.tasks[0].findings[0].message
