"""``shepard logs ship``: ship this node's task logs to the configured sinks."""

from __future__ import annotations

import argparse
import json

from shepard_lib import cli
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.logship import LogShipper, ShipReport


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``logs ship``."""
    logs = subparsers.add_parser(
        "logs",
        help="ship task logs",
        description="Ship the task logs of this node's allocations.",
        epilog="Exit codes: see `shepard logs ship --help`; 2 usage error.",
    )
    actions = logs.add_subparsers(dest="logs_command", metavar="ACTION", required=True)
    ship = actions.add_parser(
        "ship",
        help="ship new task log lines of this node's allocations to the configured sinks",
        description="Ship the new complete lines of this node's task logs (alloc/<id>/alloc/logs under "
        "nomad_data_dir) to the sinks of log_shipping, every ship_log_interval, or once with --once "
        "(for cron or testing), whether or not log_shipping.enabled (which switches the agent's shipping) is "
        "set. Exit 0 when every sink took everything, 1 when a sink stayed down, a stream could not be "
        "read, or Nomad could not list this node's allocations.",
        epilog="Exit codes: 0 every sink took everything; 1 a sink stayed down, a stream could not be "
        "read (skipped this round) or Nomad could not list this node's allocations; 2 usage or "
        "configuration error.",
    )
    ship.add_argument("--once", action="store_true", help="ship one round and exit")
    ship.add_argument(
        "--output", choices=["text", "json"], default="text", help="how to print each round's report"
    )
    ship.set_defaults(func=run_ship)


def _print(report: ShipReport, output: str) -> None:
    if output == "json":
        rows = [vars(s) for s in report.sinks]
        out = {"ok": report.ok, "source_error": report.source_error, "stream_errors": report.stream_errors}
        print(json.dumps({**out, "sinks": rows}), flush=True)
        return
    if report.source_error:
        print(f"allocations not listed (only known ones shipped): {report.source_error}")
    for problem in report.stream_errors:
        print(f"stream skipped this round: {problem}")
    for s in report.sinks:
        state = "ok" if s.error is None else f"paused: {s.error}"
        print(f"{s.name}: {s.lines} lines, {s.bytes} bytes shipped, {s.lag_bytes} bytes behind, {state}")


def run_ship(args: argparse.Namespace) -> int:
    """Ship once (``--once``) or every ``ship_log_interval`` until interrupted."""
    cfg = cli.load_config_from_args(args)
    clock = Clock(cfg.time_scale)
    nomad = NomadBackend(cfg.nomad, clock)
    try:
        shipper = LogShipper.for_node(cfg, nomad)
        try:
            while True:
                report = shipper.ship_once()
                _print(report, args.output)
                if args.once:
                    return 0 if report.ok else 1
                clock.sleep(cfg.ship_log_interval)
        finally:
            shipper.close()
    finally:
        nomad.close()
