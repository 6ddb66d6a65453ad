"""``shepard demo``: show the thundering herd, Nomad's splay and Shepard on an embedded simulated cluster.

Exit codes: 0 the demo ran and every Shepard run kept to its limit, 1 a run timed out or Shepard
exceeded its concurrency (a bug: please report it), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from shepard_lib.demo import RUNS, DemoOptions, RunResult, Snapshot, run_once
from shepard_lib.demo.report import print_table, to_json

_EXIT_CODES = "Exit codes: 0 done, 1 a run timed out or broke Shepard's limit, 2 usage error"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="show Shepard against Nomad alone on an embedded simulated cluster (no Consul/Nomad needed)",
        description="Start an embedded simulated Consul + Nomad cluster with one job, change the Consul key "
        "its config template reads, and compare: Nomad alone (change_mode = restart), Nomad's splay, and "
        "Shepard's agents; then a bad config value under Nomad alone and under Shepard.",
        epilog=_EXIT_CODES,
    )
    parser.add_argument(
        "--allocations", type=_at_least(2), default=24, help="instances of the job (default 24)"
    )
    parser.add_argument("--nodes", type=_at_least(1), default=6, help="simulated Nomad clients (default 6)")
    parser.add_argument("--concurrency", type=_at_least(1), default=2, help="Shepard's limit (default 2)")
    parser.add_argument("--splay", type=float, default=5.0, help="Nomad's splay in seconds (default 5)")
    parser.add_argument(
        "--time-scale", type=float, default=20.0, help="run the cluster this many times faster (default 20)"
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE", help="write a timeline PNG (needs shepard[demo])"
    )
    parser.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    parser.set_defaults(func=_demo)


def _at_least(low: int) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value

    return parse  # type: ignore[return-value]


def _demo(args: argparse.Namespace) -> int:
    if (
        args.log_level is None
    ):  # the agents' own lines (a failed restart, a halted plan) would drown the display
        logging.getLogger("shepard_lib").setLevel(logging.CRITICAL)
    options = DemoOptions(
        allocations=args.allocations,
        nodes=args.nodes,
        concurrency=args.concurrency,
        splay=args.splay,
        time_scale=args.time_scale,
    )
    err = Console(stderr=True)
    results = _run_all(options, err)
    if args.output == "json":
        print(json.dumps(to_json(results, options), indent=2))
    else:
        out = Console()
        print_table(out if out.is_terminal else Console(width=120), results, options)
    if args.plot:
        _plot(args.plot, results, options, err)
    broken = [r for r in results if r.timed_out] + [
        r
        for r in results
        if r.spec.mode.coordinated and r.measures.peak_concurrent_restarts > options.concurrency
    ]
    for r in broken:
        err.print(
            f"[red]run {r.spec.name}: " + ("timed out" if r.timed_out else "exceeded the limit") + "[/]"
        )
    return 1 if broken else 0


def _run_all(options: DemoOptions, err: Console) -> list[RunResult]:
    results: list[RunResult] = []
    if not err.is_terminal:
        for spec in RUNS:
            results.append(run_once(spec, options))
            m = results[-1].measures
            print(
                f"run {spec.name}: peak {m.peak_concurrent_restarts} down, lowest {m.min_healthy} healthy, "
                f"{results[-1].real_seconds:.1f}s",
                file=sys.stderr,
            )
        return results
    latest: dict[str, Snapshot] = {}
    with Live(_progress(latest, options), console=err, refresh_per_second=8, transient=True) as live:
        for spec in RUNS:

            def observe(snap: Snapshot) -> None:
                latest[snap.run] = snap
                live.update(_progress(latest, options))

            results.append(run_once(spec, options, observe))
    return results


def _progress(latest: dict[str, Snapshot], options: DemoOptions) -> Table:
    table = Table(title="shepard demo", title_justify="left", box=None)
    for column in ("run", "healthy", "", "restarting", "restarted", "cluster time"):
        table.add_column(column)
    for spec in RUNS:
        snap = latest.get(spec.name)
        if snap is None:
            table.add_row(spec.name, "", "", "", "", "waiting")
            continue
        width = 24
        filled = round(width * snap.healthy / snap.instances)
        colour = "green" if snap.healthy >= snap.instances - options.concurrency else "red"
        table.add_row(
            spec.name,
            f"{snap.healthy}/{snap.instances}",
            f"[{colour}]{'█' * filled}[/][dim]{'░' * (width - filled)}[/]",
            str(snap.down),
            str(snap.restarted),
            f"{snap.elapsed:.0f}s" + (" done" if snap.finished else ""),
        )
    return table


def _plot(path: Path, results: list[RunResult], options: DemoOptions, err: Console) -> None:
    from shepard_lib.demo.plot import PlotUnavailable, write_plot

    try:
        write_plot(path, results, options)
    except PlotUnavailable as exc:
        err.print(f"no plot: {exc}")
    else:
        err.print(f"timeline written to {path}")
