"""The demo's results for a person (a table and the headline) and for a script (one JSON object)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from shepard_lib.demo.runner import DemoOptions, RunResult

__all__ = ["headline", "print_table", "to_json"]


def to_json(results: Sequence[RunResult], options: DemoOptions) -> dict[str, Any]:
    """``--output json``: ``allocations``, ``concurrency`` and one entry per run under ``runs``."""
    return {
        "allocations": options.allocations,
        "nodes": options.nodes,
        "concurrency": options.concurrency,
        "splay_s": options.splay,
        "time_scale": options.time_scale,
        "times": "cluster seconds (what the runs take on a real cluster), real_seconds: this machine",
        "runs": [r.to_dict() for r in results],
    }


def print_table(console: Console, results: Sequence[RunResult], options: DemoOptions) -> None:
    """The comparison table, then the headline."""
    floor = options.allocations - options.concurrency
    table = Table(
        title=f"{options.allocations} instances on {options.nodes} nodes, one config change "
        f"(Shepard at concurrency {options.concurrency}; times in cluster seconds)",
        title_justify="left",
    )
    table.add_column("run", no_wrap=True)
    for column in ("peak down at once", "lowest healthy", f"time below {floor} healthy", "total time"):
        table.add_column(column, justify="right")
    table.add_column("restarted / failed", justify="right")
    for r in results:
        m = r.measures
        table.add_row(
            r.spec.name,
            str(m.peak_concurrent_restarts),
            f"{m.min_healthy}/{options.allocations}",
            f"{m.seconds_below_floor:.0f}s",
            f"{m.makespan_s:.0f}s" + (" (timed out)" if r.timed_out else ""),
            f"{m.restarted} / {m.failed}",
        )
    console.print(table)
    for line in headline(results, options):
        console.print(line)


def headline(results: Sequence[RunResult], options: DemoOptions) -> list[str]:
    """What the runs show, in a sentence each."""
    by_name = {r.spec.name: r for r in results}
    lines = []
    n = options.allocations
    herd, shepard = by_name.get("uncoordinated"), by_name.get("shepard")
    if herd and shepard:
        lines.append(
            f"A good change: Nomad alone took {herd.measures.peak_concurrent_restarts} of {n} "
            f"instances down at once; Shepard never more than {shepard.measures.peak_concurrent_restarts} "
            f"(limit {options.concurrency}), each healthy before the next went."
        )
    bad_herd, bad_shepard = by_name.get("uncoordinated_bad_config"), by_name.get("shepard_bad_config")
    if bad_herd and bad_shepard:
        lines.append(
            f"A bad change: Nomad alone left {bad_herd.measures.min_healthy} of {n} instances "
            f"healthy; Shepard stopped after {bad_shepard.measures.failed} failed restart(s) "
            f"(plan {bad_shepard.plan_status}) and kept {bad_shepard.measures.min_healthy} healthy."
        )
    return lines
