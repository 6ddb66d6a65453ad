"""``shepard job check JOB``: is a Nomad job ready for Shepard (see :mod:`shepard_lib.jobcheck`)?

Exit codes: 0 ready, 1 problems (an error in some task, or no task renders shepard.tpl), 2 usage or
configuration error (an unknown job included).
"""

from __future__ import annotations

import argparse
import json

from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.errors import NotFound
from shepard_lib.jobcheck import JobCheckReport, check_job_in_nomad

_EXIT_CODES = "Exit codes: 0 ready, 1 problems found, 2 usage or configuration error (unknown job)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``job check``."""
    job = subparsers.add_parser(
        "job", help="inspect Nomad jobs", description="Inspect Nomad jobs.", epilog=_EXIT_CODES
    )
    commands = job.add_subparsers(dest="job_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="report whether Shepard can manage a job's tasks",
        description="Read JOB from Nomad and report, per task, whether Shepard can manage it: "
        'local/shepard.tpl with change_mode = "restart" reading the task\'s trigger key, no other '
        'template with change_mode = "restart", a Consul service check for the health gate, no splay '
        "on shepard.tpl.",
        epilog=_EXIT_CODES,
    )
    check.add_argument("job", metavar="JOB", help="the job ID")
    check.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from shepard_lib.cli import job_not_found, load_config_from_args

    cfg = load_config_from_args(args)
    nomad = NomadBackend(cfg.nomad, Clock(cfg.time_scale))
    try:
        report = check_job_in_nomad(
            nomad, args.job, key_prefix=cfg.key_prefix, health_source=cfg.health_source
        )
    except NotFound:
        raise job_not_found(args.job, cfg.nomad.namespace) from None
    finally:
        nomad.close()
    print(
        json.dumps(report.to_dict(), indent=2, sort_keys=True)
        if args.output == "json"
        else report_text(report)
    )
    return 0 if report.ok else 1


def report_text(report: JobCheckReport) -> str:
    """The report for a person: a line per task, its findings indented under it, a verdict last."""
    lines = [f"job {report.job} (namespace {report.namespace}):"]
    for task in report.tasks:
        state = "ready" if task.ready else "NOT READY"
        if not task.managed:
            state = "not managed (no local/shepard.tpl)" if task.ready else "NOT READY, not managed"
        lines.append(f"  {task.group}/{task.task}: {state}")
        lines += [f"    {f.severity}: {f.message}" for f in task.findings]
    if report.ok:
        verdict = "ready for Shepard"
    elif all(t.ready for t in report.tasks):
        verdict = (
            "not ready: no task renders local/shepard.tpl (`shepard template --hcl` prints the block to add)"
        )
    else:
        verdict = "not ready: fix the errors above"
    lines.append(verdict)
    return "\n".join(lines)
