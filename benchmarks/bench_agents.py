"""Agent-driven rollouts: one Consul key change, picked up by the ``shepard agent`` of every node.

For each case (N allocations, concurrency c, fixed or log-normal restart durations) a simulated
cluster runs in its own process (``shepard sim serve --agents``), and one real
:class:`~shepard_lib.agent.Agent` per node runs in another (``_agent_host.py``: inotify on the node's
allocation dirs, its own Consul session, its node's Nomad agent API). The job's config template is
``noop``; ``local/shepard.tpl`` restarts a task when its agent writes the trigger key. The benchmark
changes the config key once and reads the sim's restart record and request counters (uncounted
``/_sim/`` endpoints) until every allocation restarted healthy. Per case:

- ``makespan / ideal``: first restart requested -> last healthy, over list scheduling of the same
  recorded restart durations (requested -> healthy) on c slots with zero overhead (target <= 1.05
  at c <= 5);
- ``batch / shepard``: ``nomad job restart -batch-size=c`` on the same durations in the same order
  (each batch waits for its slowest member, no overhead) over Shepard's makespan (target >= 1.3
  with log-normal durations where there are at least two batches);
- Consul requests per restart, all of them (session renewals and every agent's blocking queries
  included) and without session renewals (target <= 10), broken down by purpose (the sim's
  request shapes, ``GET /_sim/requests?detail``: registrations, claims, finishes, slot locks, plan
  and slot reads and watches, health, session reads and renewals);
- the agents' idle cost: Consul requests per agent per cluster minute over ``--idle`` real seconds
  before the change (session renewals and blocking queries only), and the part of the rollout's
  requests it accounts for (idle rate x agents x makespan); and, measured, the rollout's requests
  that cost per agent per minute (``_common.WAITING``: renewals, heartbeat watches, waiting agents'
  blocking queries on the slots, garbage collection) apart from the rest (*protocol*): a cost of
  waiting agents over time, which grows with the number of agents and the rollout's length, not
  with the restarts;
- slot hand-off p50/p99: a restart healthy (its slot free) -> the next restart requested;
- peak concurrency (must be <= c) and restarts per allocation (must be exactly 1);
- CPU seconds of the agents' process and of the sim's, over the rollout.

Times are cluster seconds (the sim's clock runs ``--time-scale`` times faster than real time; the
agents' config times are cluster seconds too). Asserts nothing about timing; exits 1 when an
invariant (peak <= c, each allocation restarted exactly once) is broken.

    python benchmarks/bench_agents.py [--sizes 24,100,500] [--concurrency 1,5,20] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import _common as common
from rich.console import Console
from rich.table import Table

RESTART_FIXED = "10s"
RESTART_LOGNORMAL: dict[str, Any] = {"lognormal": {"median": "8s", "sigma": 0.6}}
HEALTHY_AFTER = "2s"
HEALTHY_DEADLINE = 300.0
TARGET_IDEAL, TARGET_BATCH, TARGET_REQUESTS = 1.05, 1.3, 10.0


@dataclass(frozen=True)
class Case:
    allocations: int
    concurrency: int
    durations: str  # "fixed" | "lognormal"

    @property
    def nodes(self) -> int:
        """4 allocations a node (10 from N = 500: fewer agent threads), and at least c nodes.

        An agent restarts its node's instances of a task one after another (design.md, "One
        session per agent, one member at a time per task"), so fewer nodes than c would cap the
        rollout at one restart a node, below c.
        """
        density = 4 if self.allocations < 500 else 10
        return min(self.allocations, max(2, self.allocations // density, self.concurrency))


def run_case(case: Case, time_scale: float, processes: int = 1, idle: float = 0.0) -> dict[str, Any]:
    """One rollout (after ``idle`` real seconds of idle measurement); the figures of :mod:`bench_agents`."""
    restart = RESTART_FIXED if case.durations == "fixed" else RESTART_LOGNORMAL
    n, c = case.allocations, case.concurrency
    with common.SimProcess(common.scenario(n, case.nodes, restart, HEALTHY_AFTER), time_scale) as sim:
        with common.AgentHosts(
            sim, common.agent_config(c, HEALTHY_DEADLINE), common.tasks_per_node(sim), processes
        ) as hosts:
            idle_rate, idle_shapes = _idle(sim, case.nodes, idle, time_scale)
            sim.reset_consul_requests()
            nomad0 = sum(sim.nomad_requests().values())
            cpu_sim0, cpu_agents0, real0 = sim.cpu(), hosts.cpu(), time.monotonic()
            sim.set_key(common.CONFIG_KEY, "v2")
            try:  # generous: 20 times the ideal of 12 s restarts, in real seconds
                common.wait_all_healthy(sim, n, timeout=max(180.0, 20 * n / c * 12 / time_scale))
                completed = True
            except TimeoutError:
                completed = False
            consul = sim.consul_requests()
            shapes = sim.consul_shapes()
            nomad = sum(sim.nomad_requests().values()) - nomad0
            cpu_sim, cpu_agents, real = (
                sim.cpu() - cpu_sim0,
                hosts.cpu() - cpu_agents0,
                time.monotonic() - real0,
            )
            time.sleep(2.0 if completed else 0.0)  # anything restarted a second time would show by now
            records = sim.restarts()
        threads_left, thread_names = hosts.threads_left(), hosts.thread_names_left()
        sessions_lost, warnings = hosts.sessions_lost, hosts.warnings
    times = common.durations(records)
    made = common.makespan(records)
    ideal = common.ideal_makespan(times, c)
    batch = common.batch_makespan(times, c)
    hand = common.handoffs(records, min(c, common.peak(records)))
    total = common.consul_total(consul) - 1  # less the operator's own write of the key
    renewals = sum(consul.get("/v1/session/renew", {}).values())
    per_alloc = common.restarts_per_alloc(records)
    idle_share = idle_rate * case.nodes * made / 60.0
    by_purpose = common.purposes(shapes)
    waiting = common.waiting_cost(by_purpose)
    return {
        **asdict(case),
        "nodes": case.nodes,
        "time_scale": time_scale,
        "agent_processes": processes,
        "completed": completed,
        "restarted": len(per_alloc),
        "restarted_exactly_once": len(per_alloc) == n and set(per_alloc.values()) == {1},
        "peak_concurrent_restarts": common.peak(records),
        "makespan_s": round(made, 2),
        "ideal_makespan_s": round(ideal, 2),
        "batch_makespan_s": round(batch, 2),
        "makespan_over_ideal": round(made / ideal, 4) if ideal else 0.0,
        "batch_over_shepard": round(batch / made, 4) if made else 0.0,
        "batches": -(-n // c),
        "consul_requests": total,
        "consul_requests_per_restart": round(total / n, 2),
        "consul_requests_per_restart_without_renewals": round((total - renewals) / n, 2),
        "consul_requests_by_endpoint": consul,
        "consul_requests_by_purpose": by_purpose,
        "consul_requests_per_restart_waiting": round(waiting / n, 2),
        # the shapes' own total (read just after the endpoint counts), less the operator's write
        "consul_requests_per_restart_protocol": round((sum(shapes.values()) - 1 - waiting) / n, 2),
        "consul_requests_by_shape": shapes,
        "idle_consul_requests_per_agent_per_minute": round(idle_rate, 2),
        "idle_consul_requests_by_purpose": common.purposes(idle_shapes),
        "idle_share_per_restart": round(idle_share / n, 2),
        "nomad_requests_per_restart": round(nomad / n, 2),
        "handoff_p50_s": round(common.percentile(hand, 50), 3),
        "handoff_p99_s": round(common.percentile(hand, 99), 3),
        "handoff_max_s": round(max(hand, default=0.0), 3),
        "handoff_p50_real_ms": round(common.percentile(hand, 50) / time_scale * 1000, 1),
        "handoff_p99_real_ms": round(common.percentile(hand, 99) / time_scale * 1000, 1),
        "real_seconds": round(real, 1),
        "cpu_agents_s": round(cpu_agents, 2),
        "cpu_sim_s": round(cpu_sim, 2),
        "sessions_lost": sessions_lost,
        "agent_log_tail": warnings,
        "threads_left_after_stop": threads_left,
        "thread_names_left_after_stop": thread_names,
    }


def _idle(
    sim: common.SimProcess, agents: int, seconds: float, time_scale: float
) -> tuple[float, dict[str, int]]:
    """Consul requests per agent per cluster minute with nothing changing, and their shapes."""
    if seconds <= 0:
        return 0.0, {}
    time.sleep(min(2.0, seconds))  # start-up work (first scans) out of the window
    sim.reset_consul_requests()
    time.sleep(seconds)
    shapes = sim.consul_shapes()
    return sum(shapes.values()) / agents / (seconds * time_scale / 60.0), shapes


def print_breakdown(console: Console, result: dict[str, Any]) -> None:
    """The Consul requests of one rollout per restart, by purpose, and the idle cost beside them."""
    n = result["allocations"]
    table = Table(
        title=f"N={n} c={result['concurrency']} {result['durations']}: "
        "Consul requests per restart by purpose",
        title_justify="left",
    )
    table.add_column("purpose")
    table.add_column("per restart", justify="right")
    for what, count in result["consul_requests_by_purpose"].items():
        table.add_row(what, f"{count / n:.2f}")
    table.add_row("all", f"{result['consul_requests_per_restart']:.2f}")
    table.add_row("  of which per agent per minute", f"{result['consul_requests_per_restart_waiting']:.2f}")
    table.add_row("  the protocol's", f"{result['consul_requests_per_restart_protocol']:.2f}")
    console.print(table)
    if result["idle_consul_requests_per_agent_per_minute"]:
        console.print(
            f"idle: {result['idle_consul_requests_per_agent_per_minute']:.2f} Consul requests per agent per "
            f"cluster minute ({result['idle_consul_requests_by_purpose']}); x {result['nodes']} agents x "
            f"{result['makespan_s']:.0f} s = {result['idle_share_per_restart']:.2f} per restart of the "
            f"{result['consul_requests_per_restart']:.2f}"
        )


def invariant_problems(result: dict[str, Any]) -> list[str]:
    """The invariants a rollout must hold, as messages (empty: held)."""
    problems = []
    if result["peak_concurrent_restarts"] > result["concurrency"]:
        problems.append(f"peak {result['peak_concurrent_restarts']} > c = {result['concurrency']}")
    if not result["completed"]:
        problems.append(f"did not complete: {result['restarted']} of {result['allocations']} restarted")
    elif not result["restarted_exactly_once"]:
        problems.append(f"not every allocation restarted exactly once ({result['restarted']} restarted)")
    return problems


def print_table(console: Console, results: list[dict[str, Any]]) -> None:
    table = Table(
        title="Agent-driven rollouts. Times in cluster seconds; hand-off: a restart healthy -> the next "
        "one requested (real ms); req: Consul requests per restart (without session renewals)",
        title_justify="left",
    )
    for column in (
        "N",
        "nodes",
        "c",
        "dur",
        "makespan",
        "/ideal",
        "batch/shep",
        "req",
        "(w/o renew)",
        "protocol",
        "hand-off p50",
        "p99 ms",
        "peak",
        "once",
        "real s",
        "cpu ag/sim",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["allocations"]),
            str(r["nodes"]),
            str(r["concurrency"]),
            r["durations"][:3],
            f"{r['makespan_s']:.0f}s",
            f"{r['makespan_over_ideal']:.3f}",
            f"{r['batch_over_shepard']:.2f}",
            f"{r['consul_requests_per_restart']:.1f}",
            f"{r['consul_requests_per_restart_without_renewals']:.1f}",
            f"{r['consul_requests_per_restart_protocol']:.1f}",
            f"{r['handoff_p50_real_ms']:.0f}",
            f"{r['handoff_p99_real_ms']:.0f}",
            f"{r['peak_concurrent_restarts']}/{r['concurrency']}",
            "yes" if r["restarted_exactly_once"] else f"NO ({r['restarted']})",
            f"{r['real_seconds']:.0f}",
            f"{r['cpu_agents_s']:.1f}/{r['cpu_sim_s']:.1f}",
        )
    console.print(table)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Each target against the cases it applies to."""
    ideal = [r for r in results if r["concurrency"] <= 5]
    batch = [
        r for r in results if r["durations"] == "lognormal" and r["batches"] >= 2 and r["concurrency"] > 1
    ]
    lines = []
    if ideal:
        worst = max(ideal, key=lambda r: r["makespan_over_ideal"])
        met = sum(r["makespan_over_ideal"] <= TARGET_IDEAL for r in ideal)
        lines.append(
            f"within {TARGET_IDEAL - 1:.0%} of ideal at c <= 5: {met} of {len(ideal)} cases "
            f"(worst {worst['makespan_over_ideal']:.3f} "
            f"at N={worst['allocations']}, c={worst['concurrency']})"
        )
    if batch:
        low = min(batch, key=lambda r: r["batch_over_shepard"])
        met = sum(r["batch_over_shepard"] >= TARGET_BATCH for r in batch)
        lines.append(
            f">= {TARGET_BATCH}x faster than batches of c, log-normal, c > 1: {met} of {len(batch)} cases "
            f"(lowest {low['batch_over_shepard']:.2f} at N={low['allocations']}, c={low['concurrency']})"
        )
    met = sum(r["consul_requests_per_restart_without_renewals"] <= TARGET_REQUESTS for r in results)
    lines.append(
        f"<= {TARGET_REQUESTS:g} Consul requests per restart (without session renewals): "
        f"{met} of {len(results)} cases; with renewals: "
        f"{sum(r['consul_requests_per_restart'] <= TARGET_REQUESTS for r in results)} of {len(results)}; "
        "the protocol's (without the costs per agent per minute): "
        f"{sum(r['consul_requests_per_restart_protocol'] <= TARGET_REQUESTS for r in results)} "
        f"of {len(results)}"
    )
    return lines


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _durations(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ("fixed", "lognormal")]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"expected fixed and/or lognormal, comma-separated, got {text!r}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=_ints, default=[24, 100, 500], help="allocations per case")
    parser.add_argument("--concurrency", type=_ints, default=[1, 5, 20])
    parser.add_argument(
        "--durations",
        type=_durations,
        default=["fixed", "lognormal"],
        help="comma-separated: fixed, lognormal (default both)",
    )
    parser.add_argument("--time-scale", type=float, default=20.0, help="cluster seconds per real second")
    parser.add_argument(
        "--max-restarts-in-series",
        type=int,
        default=100,
        help="skip cases whose N / c is above this (N=500 at c=1 is 500 restarts one by one)",
    )
    parser.add_argument(
        "--agent-processes",
        type=int,
        default=0,
        help="processes the agents are spread over (default: 25 a process)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=5.0,
        help="real seconds of idle measurement before each change (0: none)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results here (rewritten after every case)")
    args = parser.parse_args(argv)
    console = Console(width=160)
    cases = [
        Case(n, c, d)
        for n in args.sizes
        for c in args.concurrency
        for d in args.durations
        if c <= n
    ]
    results: list[dict[str, Any]] = []
    skipped = [asdict(c) for c in cases if c.allocations / c.concurrency > args.max_restarts_in_series]
    for case in cases:
        if asdict(case) in skipped:
            continue
        console.print(f"[dim]N={case.allocations} c={case.concurrency} {case.durations} ...[/dim]")
        processes = args.agent_processes or -(-case.nodes // 25)
        results.append(run_case(case, args.time_scale, processes, args.idle))
        print_table(console, results[-1:])
        print_breakdown(console, results[-1])
        common.write_json(  # after every case: a long run stopped early keeps what it measured
            args.json,
            {"benchmark": "agents", "machine": common.machine(), "results": results, "skipped": skipped},
        )
    print_table(console, results)
    for line in targets(results):
        console.print(line)
    if skipped:
        console.print(f"skipped (N / c > {args.max_restarts_in_series}): {skipped}")
    problems = [
        f"N={r['allocations']} c={r['concurrency']}: {p}" for r in results for p in invariant_problems(r)
    ]
    for problem in problems:
        console.print(f"[red]invariant broken: {problem}[/red]")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
