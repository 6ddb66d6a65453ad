"""``shepard restart``, ``shepard status``, ``shepard resume`` and ``shepard abort``.

``restart JOB`` rolls a restart over the job's running allocations through the plans and slots the
agents use; ``status`` shows plans and slot holders; ``resume`` / ``abort`` act on the plan of
``JOB/GROUP/TASK`` (the job part may itself contain ``/``). Exit codes: 0 every allocation
restarted and healthy, 1 some failed or were skipped, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import HealthSource, RestartMethod
from shepard_lib.errors import ConfigError, NotFound
from shepard_lib.progress import progress_for
from shepard_lib.rollout import PlanView, RollingRestart, RolloutOptions, RolloutResult


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``restart``, ``status``, ``resume`` and ``abort``."""
    restart = subparsers.add_parser(
        "restart",
        help="restart a job's allocations, a few at a time, waiting for each to be healthy",
        description="Restart every running allocation of JOB through Shepard's plan and restart slots.",
    )
    restart.add_argument("job", metavar="JOB")
    restart.add_argument("--group", help="only this task group")
    restart.add_argument("--task", help="only this task")
    restart.add_argument(
        "--alloc", action="append", default=[], metavar="ID", help="only this allocation (repeat)"
    )
    restart.add_argument(
        "--concurrency", type=_positive, help="restarts at once (default: config / job meta)"
    )
    restart.add_argument("--method", choices=[m.value for m in RestartMethod], help="how to restart")
    restart.add_argument(
        "--health-source", choices=[h.value for h in HealthSource], help="where health is read"
    )
    restart.add_argument(
        "--max-failures",
        type=_not_negative,
        help="failed restarts tolerated before the rollout stops (0: stop at the first)",
    )
    restart.add_argument(
        "--again",
        action="store_true",
        help="restart every allocation once more even if a rollout of the task is in progress "
        "(default: join it, restarting only what it has not restarted yet)",
    )
    restart.add_argument(
        "--dry-run", action="store_true", help="show what would be restarted; change nothing"
    )
    _output(restart)
    restart.set_defaults(func=_restart)

    status = subparsers.add_parser("status", help="show restart plans and who holds their slots")
    status.add_argument("job", metavar="JOB", nargs="?", help="only this job")
    _output(status)
    status.set_defaults(func=_status)

    for name, helptext, handler in (
        ("resume", "resume a failed or aborted plan and restart its pending allocations", _resume),
        ("abort", "stop a plan: no new restarts start, restarts in flight finish", _abort),
    ):
        sub = subparsers.add_parser(name, help=helptext)
        sub.add_argument("scope", metavar="JOB/GROUP/TASK")
        if name == "abort":
            sub.add_argument("--reason", default="aborted by an operator", help="recorded in the plan")
        _output(sub)
        sub.set_defaults(func=handler)


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=["text", "json"], default="text", help="output format")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _rollout(
    args: argparse.Namespace, *, observe: bool = False
) -> tuple[RollingRestart, AbstractContextManager[Any]]:
    """The RollingRestart for the configuration, and the progress display to run it in."""
    from shepard_lib.cli import load_config_from_args

    cfg = load_config_from_args(args)
    clock = Clock(cfg.time_scale)
    display = progress_for(sys.stderr) if observe else None
    rolling = RollingRestart(
        ConsulBackend(cfg.consul, clock), NomadBackend(cfg.nomad, clock), cfg, clock=clock, observer=display
    )
    return rolling, display if display is not None else nullcontext()


def _split_scope(text: str) -> tuple[str, str, str]:
    job, _, rest = text.rpartition("/")
    job, _, group = job.rpartition("/")
    if not job or not group or not rest:
        raise ConfigError(f"expected JOB/GROUP/TASK, got {text!r}")
    return job, group, rest


def _restart(args: argparse.Namespace) -> int:
    options = RolloutOptions(
        group=args.group,
        task=args.task,
        alloc_ids=tuple(args.alloc),
        concurrency=args.concurrency,
        method=RestartMethod(args.method) if args.method else None,
        health_source=HealthSource(args.health_source) if args.health_source else None,
        max_failures=args.max_failures,
        dry_run=args.dry_run,
        again=args.again,
    )
    rolling, display = _rollout(args, observe=args.output == "text" and not args.dry_run)
    with display:
        try:
            result = rolling.run(args.job, options)
        except NotFound as exc:  # the job named on the command line: a usage error (exit 2)
            raise ConfigError(f"job {args.job!r}: {exc.reason}") from None
    if args.output == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(_result_text(result))
    return 0 if result.ok else 1


def _result_text(result: RolloutResult) -> str:
    lines = []
    if result.dry_run:
        lines.append(
            f"{result.job}: dry run, would restart {len(result.planned)} allocation(s) in this order:"
        )
        lines += [
            f"  {p.order + 1:>3}. {p.group}/{p.task} {p.node}[{p.alloc_index}] alloc {p.alloc_id}"
            for p in result.planned
        ]
    else:
        lines.append(
            f"{result.job}: {len(result.restarted)} restarted, {len(result.failed)} failed, "
            f"{len(result.skipped)} skipped in {result.duration:.1f}s "
            f"(peak concurrency {result.peak_concurrency})"
        )
        for kind, outcomes in (
            ("restarted", result.restarted),
            ("FAILED", result.failed),
            ("skipped", result.skipped),
        ):
            for o in outcomes:
                ref = o.target.ref
                took = f" in {o.duration:.1f}s" if o.duration is not None else ""
                why = f": {o.reason}" if o.reason else ""
                where = f"{ref.group}/{ref.task} {ref.node}[{ref.alloc_index}]"
                lines.append(f"  {kind} {where} alloc {o.target.alloc_id}{took}{why}")
    for s in result.skipped_tasks:
        lines.append(f"  task {s.group}/{s.task} skipped: {s.reason}")
    for p in result.plans:
        where = f"{p.scope.job}/{p.scope.group}/{p.scope.task}" + (f"@{p.scope.node}" if p.scope.node else "")
        halted = f" ({p.halt_reason})" if p.halt_reason else ""
        lines.append(
            f"  plan {where}: {p.status}{halted}, generation {p.generation}, "
            f"concurrency {p.concurrency}, max_failures {p.max_failures}"
        )
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    rolling, _ = _rollout(args)
    views = rolling.status(args.job)
    if args.output == "json":
        print(json.dumps([v.to_dict() for v in views], indent=2, sort_keys=True))
    else:
        print(_status_text(views) if views else "no restart plans")
    return 0


def _status_text(views: list[PlanView]) -> str:
    lines = []
    for view in views:
        plan = view.plan
        if plan is None:
            lines.append(f"{view.key}: unreadable (corrupt or foreign value; replaced at the next restart)")
            continue
        counts = Counter(m.state.value for m in plan.members.values() if m.generation == plan.generation)
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no members"
        halted = f" ({plan.halt_reason})" if plan.halt_reason else ""
        lines.append(
            f"{plan.label}: {plan.status.value}{halted}, generation {plan.generation}, {states}; "
            f"concurrency {plan.concurrent_lock_count}, max_failures {plan.max_failures}"
        )
        if view.orphaned:
            lines.append(
                "  nobody is driving this plan (no live session holds a slot or a restarting member): "
                f"`shepard resume {plan.job}/{plan.group}/{plan.task}` drives it again"
            )
        lines += [f"  slot {n}: {holder}" for n, holder in sorted(view.holders.items())]
    return "\n".join(lines)


def _resume(args: argparse.Namespace) -> int:
    job, group, task = _split_scope(args.scope)
    rolling, display = _rollout(args, observe=args.output == "text")
    with display:
        result = rolling.resume(job, group, task)
    if args.output == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(_result_text(result))
    return 0 if result.ok else 1


def _abort(args: argparse.Namespace) -> int:
    job, group, task = _split_scope(args.scope)
    rolling, _ = _rollout(args)
    plans = rolling.abort(job, group, task, reason=args.reason)
    data: list[dict[str, Any]] = [p.to_json() for p in plans]
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for plan in plans:
            print(f"{plan.label}: {plan.status.value} ({plan.halt_reason}), generation {plan.generation}")
    return 0
