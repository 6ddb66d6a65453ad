"""Is a Nomad job ready for Shepard? ``shepard job check`` and the library call behind it.

Per task, :func:`check_job` reports what would stop Shepard from managing it, or make it work
worse than it should:

- ``local/shepard.tpl`` must exist with ``change_mode = "restart"`` and must read the task's own
  trigger key, the key the coordinator writes (keyed by the job's ID). The template is *evaluated*
  (with :mod:`shepard_lib.gotemplate`, the same engine the simulator renders with) with the
  variables Nomad gives this job's tasks (``NOMAD_JOB_ID`` and ``NOMAD_JOB_NAME`` as the job has
  them), so any spelling that reads the right key passes and a template that reads another key
  (the seed's ``env "NOMAD_NODE_NAME"``, which Nomad does not define, reads
  ``shepard/keys//...``; ``NOMAD_JOB_NAME`` for a job whose name is not its ID) fails with the key
  it would read. A template that reads the right key only while the job's name equals its ID, or
  only while the job ID has no ``/`` (a periodic or dispatched child's has), is a warning.
- Every other template must be ``noop`` or ``signal`` (or ``script``): a ``restart`` template makes
  Nomad restart the task by itself when its data changes, the herd Shepard exists to prevent.
- With the ``consul`` (or ``both``) health source, a service with at least one check should cover
  the task; without one the health gate falls back to Nomad's task state (a warning).
- ``splay`` on ``shepard.tpl`` only delays every restart Shepard starts (a warning).

A task with no template at all is reported as not managed, which is fine (a sidecar). A job is
ready when no task has an error.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from shepard_lib.backends import NomadAPI
from shepard_lib.config import HealthSource
from shepard_lib.gotemplate import MissingKey, TemplateError, render
from shepard_lib.keyspace import TEMPLATE_DESTINATION, Keyspace, TaskRef
from shepard_lib.model import Job, Service, Task, TaskGroup, Template

__all__ = ["Finding", "JobCheckReport", "Severity", "TaskReport", "check_job", "check_job_in_nomad"]

_SAMPLE_NODE = "node-1"
_CHILD_SUFFIX = "/periodic-1700000000"
_OTHER_NAME = "-renamed"  # a name that is not the ID, to see whether the template reads the name
_QUIET_MODES = frozenset({"noop", "signal", "script"})


class Severity(enum.StrEnum):
    """How much a finding matters: an ``error`` makes the job not ready."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One problem of one task: a stable ``code`` for scripts and a message for people."""

    severity: Severity
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form."""
        return {"severity": str(self.severity), "code": self.code, "message": self.message}


@dataclass(frozen=True)
class TaskReport:
    """The findings for ``group/task``; ``managed`` says whether it renders ``local/shepard.tpl``."""

    group: str
    task: str
    managed: bool
    findings: tuple[Finding, ...]

    @property
    def ready(self) -> bool:
        """No error: Shepard can restart this task (or it has no template to restart for)."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "group": self.group,
            "task": self.task,
            "managed": self.managed,
            "ready": self.ready,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class JobCheckReport:
    """The report for one job: one :class:`TaskReport` per task."""

    job: str
    namespace: str
    tasks: tuple[TaskReport, ...]

    @property
    def ok(self) -> bool:
        """Every task is ready and at least one is managed by Shepard."""
        return all(t.ready for t in self.tasks) and any(t.managed for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``shepard job check --output json``)."""
        return {
            "job": self.job,
            "namespace": self.namespace,
            "ready": self.ok,
            "managed_tasks": sum(t.managed for t in self.tasks),
            "tasks": [t.to_dict() for t in self.tasks],
        }


def check_job_in_nomad(
    nomad: NomadAPI, job_id: str, *, key_prefix: str, health_source: HealthSource
) -> JobCheckReport:
    """Read ``job_id`` from Nomad and :func:`check_job` it. Raises NotFound for an unknown job."""
    return check_job(nomad.job(job_id), key_prefix=key_prefix, health_source=health_source)


def check_job(job: Job, *, key_prefix: str, health_source: HealthSource) -> JobCheckReport:
    """The readiness report of ``job`` for Shepard with ``key_prefix`` and ``health_source``."""
    keyspace = Keyspace(key_prefix)
    reports = tuple(
        _check_task(job, group, task, keyspace, HealthSource(health_source))
        for group in job.groups
        for task in group.tasks
    )
    return JobCheckReport(job=job.id, namespace=job.namespace, tasks=reports)


def _check_task(
    job: Job, group: TaskGroup, task: Task, keyspace: Keyspace, source: HealthSource
) -> TaskReport:
    trigger = next((t for t in task.templates if _is_trigger(t)), None)
    findings: list[Finding] = []
    if trigger is None:
        if task.templates:
            findings.append(_no_trigger(task))
        return TaskReport(group.name, task.name, managed=False, findings=tuple(findings))
    findings += _check_trigger(job, group, task, trigger, keyspace)
    findings += _check_other_templates(task, trigger)
    if source is not HealthSource.NOMAD:
        findings += _check_services(group, task)
    return TaskReport(group.name, task.name, managed=True, findings=tuple(findings))


def _is_trigger(template: Template) -> bool:
    return template.dest_path.rstrip("/").endswith(TEMPLATE_DESTINATION)


def _no_trigger(task: Task) -> Finding:
    restarting = [t.dest_path for t in task.templates if t.change_mode == "restart"]
    if restarting:
        return Finding(
            Severity.ERROR,
            "no_shepard_template",
            f"has no {TEMPLATE_DESTINATION}, and its template(s) {', '.join(restarting)} restart it on every "
            "change, all instances at once; add the template `shepard template --hcl` prints and set "
            'change_mode = "noop" on the others',
        )
    return Finding(
        Severity.WARNING,
        "no_shepard_template",
        f"has templates but no {TEMPLATE_DESTINATION}: Shepard cannot restart it when they change "
        "(add the template `shepard template --hcl` prints)",
    )


def _check_trigger(
    job: Job, group: TaskGroup, task: Task, trigger: Template, keyspace: Keyspace
) -> list[Finding]:
    findings: list[Finding] = []
    if trigger.change_mode != "restart":
        findings.append(
            Finding(
                Severity.ERROR,
                "trigger_change_mode",
                f'{trigger.dest_path} has change_mode = "{trigger.change_mode}": it must be "restart", '
                "or a new trigger value never restarts the task",
            )
        )
    if trigger.splay > 0:
        findings.append(
            Finding(
                Severity.WARNING,
                "trigger_splay",
                f"{trigger.dest_path} has splay = {trigger.splay:g}s: Shepard already spaces restarts, "
                "a splay only delays each one (and the health gate waits for it)",
            )
        )
    if not trigger.embedded_tmpl:
        source = f"source {trigger.source_path}" if trigger.source_path else "no embedded data"
        findings.append(
            Finding(
                Severity.WARNING,
                "trigger_not_checked",
                f"{trigger.dest_path} has {source}: which key it reads cannot be checked here",
            )
        )
        return findings
    text, names = trigger.embedded_tmpl, (group.name, task.name)
    wrong = _wrong_key(text, _JobIdentity(job.id, job.name), *names, keyspace)
    if wrong:
        findings.append(Finding(Severity.ERROR, "trigger_key", f"{trigger.dest_path} {wrong}"))
        return findings
    if job.name == job.id and _wrong_key(text, _JobIdentity(job.id, job.id + _OTHER_NAME), *names, keyspace):
        findings.append(
            Finding(
                Severity.WARNING,
                "trigger_job_name",
                f"{trigger.dest_path} reads the key by the job's name (NOMAD_JOB_NAME), Shepard writes it by "
                "the job's ID: it works only while the job has no `name` different from its ID; "
                'use env "NOMAD_JOB_ID" (the template `shepard template` prints)',
            )
        )
    child = job.id + _CHILD_SUFFIX
    if "/" not in job.id and _wrong_key(text, _JobIdentity(child, child, parent=job.id), *names, keyspace):
        findings.append(
            Finding(
                Severity.WARNING,
                "trigger_escaping",
                f"{trigger.dest_path} does not escape names: a periodic or dispatched child of this job "
                f"({child}) would read a key Shepard never writes; use the template "
                "`shepard template` prints",
            )
        )
    return findings


@dataclass(frozen=True)
class _JobIdentity:
    """A job as its tasks see it: ``NOMAD_JOB_ID``, ``NOMAD_JOB_NAME`` and ``NOMAD_JOB_PARENT_ID``."""

    id: str
    name: str
    parent: str = ""


def _wrong_key(text: str, job: _JobIdentity, group: str, task: str, keyspace: Keyspace) -> str | None:
    """What is wrong with the key ``text`` reads for these names, or None when it reads the trigger key."""
    env: Mapping[str, str] = {
        "node.unique.name": _SAMPLE_NODE,
        "NOMAD_JOB_ID": job.id,
        "NOMAD_JOB_NAME": job.name,
        "NOMAD_JOB_PARENT_ID": job.parent,
        "NOMAD_GROUP_NAME": group,
        "NOMAD_TASK_NAME": task,
        "NOMAD_ALLOC_INDEX": "0",
    }
    ref = TaskRef(node=_SAMPLE_NODE, job=job.id, group=group, task=task, alloc_index=0)
    expected = keyspace.trigger_key(ref)
    try:
        keys = render(text, env, lambda _key: None).keys_read
    except MissingKey as exc:  # `key` instead of `keyOrDefault`: blocks until the key exists
        keys = exc.keys_read | {exc.key}
        if exc.key == expected:
            return (
                "reads its trigger key with `key`, which blocks the task until Shepard first writes it: "
                'use `keyOrDefault ... ""`'
            )
    except TemplateError as exc:
        return f"is not a valid template: {exc}"
    if keys == {expected}:
        return None
    read = ", ".join(sorted(keys)) or "no Consul key"
    wrong = f"reads {read} for allocation 0 on node {_SAMPLE_NODE}, not its trigger key {expected}"
    if job.name != job.id and keys == {keyspace.trigger_key(replace(ref, job=job.name))}:
        wrong += (
            f" (it reads the job's name {job.name!r}, NOMAD_JOB_NAME; Shepard keys by the job's ID "
            f'{job.id!r}: read env "NOMAD_JOB_ID", as the template `shepard template` prints)'
        )
    return wrong


def _check_other_templates(task: Task, trigger: Template) -> list[Finding]:
    return [
        Finding(
            Severity.ERROR,
            "template_restarts",
            f'template {t.dest_path or t.source_path} has change_mode = "{t.change_mode}": Nomad restarts '
            'every instance at once when its data changes; set change_mode = "noop" and let Shepard restart',
        )
        for t in task.templates
        if t is not trigger and t.change_mode not in _QUIET_MODES
    ]


def _check_services(group: TaskGroup, task: Task) -> list[Finding]:
    services: tuple[Service, ...] = task.service_blocks + group.service_blocks
    if any(s.checks and s.provider == "consul" for s in services):
        return []
    if any(s.checks for s in services):
        why = 'its checked services are Nomad-native (provider = "nomad"), which Consul does not see'
    elif services:
        why = "its services have no check"
    else:
        why = "it registers no service"
    return [
        Finding(
            Severity.WARNING,
            "no_health_check",
            f"{why}: the health gate falls back to Nomad's task state (running is not healthy); "
            "add a Consul service check",
        )
    ]
