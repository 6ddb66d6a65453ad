"""``shepard restart``, ``shepard status``, ``shepard resume`` and ``shepard abort``.

``restart JOB`` rolls a restart over the job's running allocations through the plans and slots the
agents use; ``status`` shows plans and slot holders; ``resume`` / ``abort`` act on the plan of
``JOB/GROUP/TASK`` (the job part may itself contain ``/``). Exit codes: 0 every allocation
restarted and healthy, 1 some failed or were skipped, 2 usage or configuration error (among them a
job Nomad does not know and a plan that does not exist, in the same words for every command),
128 + the signal when SIGINT/SIGTERM interrupted a rollout.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import FrameType
from typing import Any

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import HealthSource, RestartMethod
from shepard_lib.errors import ConfigError, NotFound
from shepard_lib.interrupt import Interrupt
from shepard_lib.progress import progress_for
from shepard_lib.rollout import PlanView, RollingRestart, RolloutOptions, RolloutResult

log = logging.getLogger(__name__)

INTERRUPT_MARGIN = 10.0
"""Real seconds an interrupted rollout waits, beyond ``healthy_deadline``, for its restarts in flight."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``restart``, ``status``, ``resume`` and ``abort``."""
    restart = subparsers.add_parser(
        "restart",
        help="restart a job's allocations, a few at a time, waiting for each to be healthy",
        description="Restart every running allocation of JOB (a Nomad job ID) through Shepard's plan and "
        "restart slots: at most --concurrency at once, each healthy before the next starts. Ctrl-C (or "
        "SIGTERM) starts no new restart and waits for those in flight; a second Ctrl-C abandons them.",
        epilog="Exit codes: 0 every allocation restarted and is healthy; 1 some failed or were skipped; "
        f"2 {_USAGE}; 130 / 143 interrupted by SIGINT / SIGTERM (`shepard resume` restarts the rest).",
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

    status = subparsers.add_parser(
        "status",
        help="show restart plans and who holds their slots",
        description="Show every restart plan in Consul (of JOB only, when given): its JOB/GROUP/TASK, "
        "status, the members' states and the holders of its restart slots.",
        epilog=f"Exit codes: 0 shown (also when there is no plan); 1 Consul could not be read; 2 {_USAGE}.",
    )
    status.add_argument("job", metavar="JOB", nargs="?", help="only this job")
    _output(status)
    status.set_defaults(func=_status)

    for name, helptext, handler, codes in (
        (
            "resume",
            "resume a failed or aborted plan and restart its pending allocations",
            _resume,
            "0 every allocation restarted and is healthy; 1 some failed or were skipped; "
            f"2 {_USAGE}; 130 / 143 interrupted by SIGINT / SIGTERM",
        ),
        (
            "abort",
            "stop a plan: no new restarts start, restarts in flight finish",
            _abort,
            f"0 aborted; 1 Consul could not be written; 2 {_USAGE}",
        ),
    ):
        sub = subparsers.add_parser(
            name,
            help=helptext,
            description=f"{helptext[0].upper()}{helptext[1:]}. {_SCOPE_HELP}",
            epilog=f"Exit codes: {codes}.",
        )
        sub.add_argument("scope", metavar="JOB/GROUP/TASK", help="the plan, as `shepard status` names it")
        if name == "abort":
            sub.add_argument("--reason", default="aborted by an operator", help="recorded in the plan")
        _output(sub)
        sub.set_defaults(func=handler)


_USAGE = "usage or configuration error (among them a job Nomad does not know, or no plan for JOB/GROUP/TASK)"

_SCOPE_HELP = (
    "JOB/GROUP/TASK names one task's plan: the Nomad job ID, the task group and the task, "
    "as `shepard status` lists them (e.g. web/app/server); the job ID may itself contain '/' "
    "(a periodic or dispatched child job)."
)


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
    # JSON logs stay JSON lines: the progress then goes through logging too.
    display = progress_for(sys.stderr, live=None if cfg.log_format == "text" else False) if observe else None
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
    interrupt = Interrupt()
    started = time.monotonic()
    with display, _stopped_by_signals(rolling, interrupt) as received:
        try:
            result = rolling.run(args.job, options, interrupt)
        except NotFound:  # the job named on the command line: a usage error (exit 2)
            raise _job_not_found(rolling, args.job) from None
    return _report(args, rolling, result, received, time.monotonic() - started)


def _job_not_found(rolling: RollingRestart, job: str) -> ConfigError:
    from shepard_lib.cli import job_not_found

    return job_not_found(job, rolling.config.nomad.namespace)


def _require_plan(rolling: RollingRestart, job: str, group: str, task: str) -> None:
    """ConfigError (usage) unless a plan of ``job/group/task`` exists, naming what is missing."""
    if any(view.plan is not None for view in rolling.status(job, group, task)):
        return
    try:
        rolling.nomad.job(job)
    except NotFound:
        raise _job_not_found(rolling, job) from None
    raise ConfigError(f"no plan for {job}/{group}/{task} (`shepard status` lists the plans)")


def _report(
    args: argparse.Namespace, rolling: RollingRestart, result: RolloutResult, received: list[int], wall: float
) -> int:
    """Print ``result`` (``wall``: real seconds it took); the exit code: 128 + the signal when
    interrupted, else 0 ok / 1 not."""
    if args.output == "json":  # "duration" is the cluster's seconds, "wall_duration" the real ones
        print(json.dumps({**result.to_dict(), "wall_duration": wall}, indent=2, sort_keys=True))
    else:
        print(_result_text(result, wall=wall, scale=rolling.config.time_scale))
    if received:
        return 128 + received[0]
    return 0 if result.ok else 1


@contextmanager
def _stopped_by_signals(rolling: RollingRestart, interrupt: Interrupt) -> Iterator[list[int]]:
    """SIGINT/SIGTERM stop the rollout in two stages (:mod:`shepard_lib.interrupt`); yields the signals seen.

    The first starts no new restart and waits up to ``healthy_deadline`` (real time) plus
    :data:`INTERRUPT_MARGIN` for those in flight; a second abandons them.
    """
    cfg = rolling.config
    grace = cfg.healthy_deadline / cfg.time_scale + INTERRUPT_MARGIN
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if interrupt.request(grace):
            log.warning(
                "%s: starting no new restarts; waiting up to %.0fs for the restarts in flight "
                "(Ctrl-C again abandons them)",
                name,
                grace,
            )
        else:
            log.warning(
                "%s again: abandoning the restarts in flight, releasing their slots and sessions", name
            )

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        interrupt.close()


def _result_text(result: RolloutResult, *, wall: float, scale: float) -> str:
    """The result for a person: wall-clock seconds (cluster seconds only where labelled)."""
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
            f"{len(result.skipped)} skipped in {wall:.1f}s "
            f"(peak concurrency {result.peak_concurrency}"
            + (f"; {result.duration:.1f}s of cluster time at time scale {scale:g})" if scale != 1 else ")")
        )
        for kind, outcomes in (
            ("restarted", result.restarted),
            ("FAILED", result.failed),
            ("skipped", result.skipped),
        ):
            for o in outcomes:
                ref = o.target.ref
                took = f" in {o.duration / scale:.1f}s" if o.duration is not None else ""
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
    if result.interrupted:
        scopes = (
            " ".join(f"{p.scope.job}/{p.scope.group}/{p.scope.task}" for p in result.plans)
            or "JOB/GROUP/TASK"
        )
        lines.append(
            f"  interrupted: {len(result.skipped)} allocation(s) not restarted; "
            f"`shepard resume {scopes}` restarts them"
        )
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    rolling, _ = _rollout(args)
    views = rolling.status(args.job)
    if not views and args.job is not None:
        try:
            rolling.nomad.job(args.job)
        except NotFound:
            raise _job_not_found(rolling, args.job) from None
    if args.output == "json":
        print(json.dumps([v.to_dict() for v in views], indent=2, sort_keys=True))
    else:
        whose = f" for job {args.job!r}" if args.job else ""
        print(_status_text(views) if views else f"no restart plans{whose}")
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
    _require_plan(rolling, job, group, task)
    interrupt = Interrupt()
    started = time.monotonic()
    with display, _stopped_by_signals(rolling, interrupt) as received:
        try:
            result = rolling.resume(job, group, task, interrupt)
        except NotFound:
            raise _job_not_found(rolling, job) from None
    return _report(args, rolling, result, received, time.monotonic() - started)


def _abort(args: argparse.Namespace) -> int:
    job, group, task = _split_scope(args.scope)
    rolling, _ = _rollout(args)
    _require_plan(rolling, job, group, task)
    plans = rolling.abort(job, group, task, reason=args.reason)
    data: list[dict[str, Any]] = [p.to_json() for p in plans]
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for plan in plans:
            print(f"{plan.label}: {plan.status.value} ({plan.halt_reason}), generation {plan.generation}")
    return 0
