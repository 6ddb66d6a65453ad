"""``shepard gc``: one garbage-collection pass over Shepard's Consul keys.

Prints what was (with ``--dry-run``: would be) removed and why, grouped by rule, what was spared
and why, with counts. Exit codes: 0 the pass ran to the end, 1 a partial failure (Consul or
Nomad could not be asked, or some deletes failed), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.errors import ConfigError
from shepard_lib.gc import GCReport, GCScope, collect_garbage


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gc``."""
    gc = subparsers.add_parser(
        "gc",
        help="delete Shepard's stale Consul keys (dead allocations, gone jobs and nodes, old plans)",
        description=(
            "One garbage-collection pass: 'node' collects this node's trigger keys, 'cluster' applies "
            "every rule to every key under the GC leader lock."
        ),
        epilog="Exit codes: 0 done; 1 partial failure (Nomad or Consul could not be asked, some deletes "
        "failed); 2 usage or configuration error.",
    )
    gc.add_argument(
        "--scope", choices=[s.value for s in GCScope], default=GCScope.CLUSTER.value, help="default: cluster"
    )
    gc.add_argument(
        "--node", help="the node of --scope node (default: node_name, else the local Nomad agent's)"
    )
    gc.add_argument("--dry-run", action="store_true", help="show what would be deleted; change nothing")
    gc.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    gc.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> int:
    from shepard_lib.cli import load_config_from_args

    if args.node is not None and args.scope != GCScope.NODE.value:
        raise ConfigError("--node names the node of --scope node; the cluster pass covers every node")
    cfg = load_config_from_args(args)
    clock = Clock(cfg.time_scale)
    consul, nomad = ConsulBackend(cfg.consul, clock), NomadBackend(cfg.nomad, clock)
    try:
        report = collect_garbage(
            consul, nomad, cfg, scope=args.scope, node=args.node, dry_run=args.dry_run, clock=clock
        )
    finally:
        consul.close()
        nomad.close()
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(report_text(report))
    return 0 if report.ok else 1


def report_text(report: GCReport) -> str:
    """The report for people: a summary line, then each key under its rule or reason."""
    where = f" of node {report.node}" if report.node else ""
    verb = "would delete" if report.dry_run else "deleted"
    removed = report.planned if report.dry_run else report.deleted
    lines = [
        f"gc {report.scope.value} pass{where}{' (dry run)' if report.dry_run else ''}: "
        f"{report.scanned} key(s) scanned, {verb} {len(removed)}, skipped {len(report.skipped)}, "
        f"failed {len(report.failed)}"
    ]
    if report.error:
        lines.append(f"  stopped, nothing more deleted: {report.error}")
    for rule, count in sorted(report.deleted_by_rule().items()):
        lines.append(f"  {verb} ({rule}): {count}")
        lines += [f"    {d.key}: {d.why}" for d in removed if d.rule.value == rule]
    for reason, count in sorted(report.skipped_by_reason().items()):
        lines.append(f"  skipped ({reason}): {count}")
        lines += [f"    {s.key or '-'}: {s.why}" for s in report.skipped if s.reason.value == reason]
    if report.failed:
        lines.append(f"  FAILED: {len(report.failed)}")
        lines += [f"    {f.key}: {f.error}" for f in report.failed]
    return "\n".join(lines)
