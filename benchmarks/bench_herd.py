"""Herd protection: the same job and the same config change under Nomad alone, Nomad's splay, and Shepard.

Runs ``shepard demo``'s cluster (:mod:`shepard_lib.demo`: one job of N instances over some nodes,
log-normal restart times, a check that passes 2 s after the restart) four times, each on a fresh
simulated cluster: the config template with ``change_mode = "restart"`` (uncoordinated), the same
with ``splay = 5s`` and with ``splay = 30s``, and Shepard (``noop`` template + ``shepard.tpl``, one
real agent per node at concurrency c). Per run, from the sim's restart record: peak simultaneous
restarts, lowest healthy count, time below N - c healthy, makespan, restarted. Asserts nothing
about timing; exits 1 when Shepard's run breaks an invariant (peak <= c, N healthy restarts and
no failure).

    python benchmarks/bench_herd.py [--allocations 24] [--nodes 6] [--concurrency 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

import _common as common
from rich.console import Console
from rich.table import Table

from shepard_lib.demo import DemoOptions, RunSpec, run_once
from shepard_lib.demo.scenario import Mode

RUNS: tuple[tuple[str, Mode, float], ...] = (
    ("uncoordinated", Mode.UNCOORDINATED, 0.0),
    ("splay 5s", Mode.SPLAY, 5.0),
    ("splay 30s", Mode.SPLAY, 30.0),
    ("shepard", Mode.SHEPARD, 0.0),
)
"""(name, mode, splay in seconds) of each run."""


def run_all(options: DemoOptions) -> list[dict[str, Any]]:
    """Every run of :data:`RUNS` on ``options``' job; one dict of figures each."""
    results = []
    for name, mode, splay in RUNS:
        run_options = dataclasses.replace(options, splay=splay or options.splay)
        result = run_once(RunSpec(name.replace(" ", "_"), mode), run_options)
        figures = result.to_dict()
        figures["mode"] = name
        figures["splay_s"] = splay
        results.append(figures)
    return results


def print_table(console: Console, results: list[dict[str, Any]], options: DemoOptions) -> None:
    floor = options.allocations - options.concurrency
    table = Table(
        title=f"Herd protection: {options.allocations} instances on {options.nodes} nodes, one config change "
        f"(Shepard at c = {options.concurrency}; times in cluster seconds)",
        title_justify="left",
    )
    for column in (
        "run",
        "peak restarting at once",
        "lowest healthy",
        f"time below {floor} healthy",
        "makespan",
        "restarted / failed",
        "real s",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["mode"],
            str(r["peak_concurrent_restarts"]),
            f"{r['min_healthy']}/{options.allocations}",
            f"{r['seconds_below_floor']:.0f}s",
            f"{r['makespan_s']:.0f}s",
            f"{r['restarted']} / {r['failed']}",
            f"{r['real_seconds']:.0f}",
        )
    console.print(table)


def invariant_problems(results: list[dict[str, Any]], options: DemoOptions) -> list[str]:
    """Shepard's run must keep peak <= c and end with N healthy restarts, none failed."""
    problems = []
    for r in (r for r in results if r["mode"] == "shepard"):
        if r["peak_concurrent_restarts"] > options.concurrency:
            problems.append(f"shepard: peak {r['peak_concurrent_restarts']} > c = {options.concurrency}")
        if r["restarted"] != options.allocations or r["failed"] or r["timed_out"]:
            problems.append(
                f"shepard: {r['restarted']} of {options.allocations} restarted healthy, {r['failed']} failed"
                + (", timed out" if r["timed_out"] else "")
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--allocations", type=int, default=24)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--time-scale", type=float, default=20.0, help="cluster seconds per real second")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    options = DemoOptions(
        allocations=args.allocations,
        nodes=args.nodes,
        concurrency=args.concurrency,
        time_scale=args.time_scale,
    )
    console = Console(width=160)
    # Agent.stop returns while each agent's discovery thread is still in its Nomad blocking query;
    # those threads log retries once the run's sim has stopped. Nothing a reader of the table needs.
    logging.getLogger("shepard_lib").setLevel(logging.ERROR)
    results = run_all(options)
    print_table(console, results, options)
    problems = invariant_problems(results, options)
    for problem in problems:
        console.print(f"[red]invariant broken: {problem}[/red]")
    common.write_json(
        args.json,
        {
            "benchmark": "herd",
            "machine": common.machine(),
            "allocations": options.allocations,
            "nodes": options.nodes,
            "concurrency": options.concurrency,
            "time_scale": options.time_scale,
            "results": results,
        },
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
