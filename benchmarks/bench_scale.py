"""Scale: an agent per node of a 200-node simulated cluster, 2,000 allocations, concurrency 50.

The simulated cluster runs in its own process (``shepard sim serve --agents``), the agents (one real
:class:`~shepard_lib.agent.Agent` per node) in ``--agent-processes`` others. For each size:

1. **idle**: with nothing changing, every Consul and Nomad request the agents make for
   ``--idle`` real seconds, by endpoint: requests per agent per (cluster) minute, and which
   endpoints they are (session renewals and blocking queries only, when idle);
2. **rollout**: one change of the config key every task reads, until every allocation restarted
   healthy: the invariants (peak restarts at once <= c, every allocation restarted exactly once),
   the Consul request rate it generated (per real and per cluster second), the makespan against
   the ideal (list scheduling of the recorded durations on c slots), and the CPU the sim and the
   agents used: the sim's share of one core (a sim far from 100% of a core was not the bound).

A size that does not complete within ``--timeout`` real seconds is reported as such, with how far it
got. Asserts nothing about timing; exits 1 when a completed rollout broke an invariant.

    python benchmarks/bench_scale.py [--sizes 200:2000] [--concurrency 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
from rich.console import Console
from rich.table import Table

RESTART: dict[str, Any] = {"lognormal": {"median": "8s", "sigma": 0.6}}
HEALTHY_AFTER = "2s"
HEALTHY_DEADLINE = 600.0
IDLE_ENDPOINTS = ("/v1/session/renew",)
"""Writes an idle agent may make; all else must be reads (GET), which idle are its blocking queries
(the sim counts by endpoint and method, so a blocking read and a plain one look alike: their rate tells)."""


def run_size(
    nodes: int,
    allocations: int,
    concurrency: int,
    time_scale: float,
    processes: int,
    idle: float,
    timeout: float,
) -> dict[str, Any]:
    """The idle and rollout figures of one size (``completed`` False when it ran out of time)."""
    result: dict[str, Any] = {
        "nodes": nodes,
        "allocations": allocations,
        "concurrency": concurrency,
        "time_scale": time_scale,
        "agent_processes": processes,
    }
    started = time.monotonic()
    with common.SimProcess(common.scenario(allocations, nodes, RESTART, HEALTHY_AFTER), time_scale) as sim:
        result["sim_start_real_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        with common.AgentHosts(
            sim, common.agent_config(concurrency, HEALTHY_DEADLINE), common.tasks_per_node(sim), processes
        ) as hosts:
            result["agents_start_real_s"] = round(time.monotonic() - started, 1)
            time.sleep(min(5.0, idle))  # start-up work (first scans, registrations) out of the idle window
            result["idle"] = _idle(sim, hosts, nodes, idle, time_scale)
            result["rollout"] = _rollout(sim, hosts, allocations, concurrency, time_scale, timeout)
        result["threads_left_after_stop"] = hosts.threads_left()
        result["sessions_lost"] = hosts.sessions_lost
        result["agent_log_tail"] = hosts.warnings
    return result


def _idle(
    sim: common.SimProcess, hosts: common.AgentHosts, nodes: int, seconds: float, scale: float
) -> dict[str, Any]:
    sim.reset_consul_requests()
    nomad0 = sim.nomad_requests()
    cpu_sim0, cpu_agents0, t0 = sim.cpu(), hosts.cpu(), time.monotonic()
    time.sleep(seconds)
    real = time.monotonic() - t0
    consul = sim.consul_requests()
    nomad = {k: v - nomad0.get(k, 0) for k, v in sim.nomad_requests().items() if v - nomad0.get(k, 0)}
    cluster_minutes = real * scale / 60
    total = common.consul_total(consul)
    return {
        "real_s": round(real, 1),
        "cluster_minutes": round(cluster_minutes, 2),
        "consul_requests_per_agent_per_minute": round(total / nodes / cluster_minutes, 2),
        "nomad_requests_per_agent_per_minute": round(sum(nomad.values()) / nodes / cluster_minutes, 2),
        "consul_by_endpoint": consul,
        "nomad_by_endpoint": nomad,
        "only_renewals_and_reads": all(
            endpoint in IDLE_ENDPOINTS or set(methods) == {"GET"} for endpoint, methods in consul.items()
        ),
        "cpu_agents_per_agent_pct": round((hosts.cpu() - cpu_agents0) / real / nodes * 100, 3),
        "cpu_sim_pct": round((sim.cpu() - cpu_sim0) / real * 100, 1),
    }


def _rollout(
    sim: common.SimProcess, hosts: common.AgentHosts, n: int, c: int, scale: float, timeout: float
) -> dict[str, Any]:
    sim.reset_consul_requests()
    cpu_sim0, cpu_agents0, t0 = sim.cpu(), hosts.cpu(), time.monotonic()
    sim.set_key(common.CONFIG_KEY, "v2")
    completed = True
    try:
        records = common.wait_all_healthy(sim, n, timeout=timeout, poll=1.0)
    except TimeoutError:
        completed = False
    real = time.monotonic() - t0
    consul = sim.consul_requests()
    cpu_sim, cpu_agents = sim.cpu() - cpu_sim0, hosts.cpu() - cpu_agents0
    if completed:
        time.sleep(2.0)  # a second restart of anything would show by now
    records = sim.restarts()
    per_alloc = common.restarts_per_alloc(records)
    total = common.consul_total(consul) - 1  # less the operator's write
    times = common.durations(records)
    made = common.makespan(records)
    return {
        "completed": completed,
        "restarted_healthy": len({r.alloc_id for r in records if r.healthy_at is not None}),
        "restarted_exactly_once": len(per_alloc) == n and set(per_alloc.values()) == {1},
        "peak_concurrent_restarts": common.peak(records),
        "real_s": round(real, 1),
        "makespan_s": round(made, 1),
        "ideal_makespan_s": round(common.ideal_makespan(times, c), 1),
        "makespan_over_ideal": round(made / common.ideal_makespan(times, c), 3) if completed else None,
        "consul_requests": total,
        "consul_requests_per_real_s": round(total / real, 1),
        "consul_requests_per_cluster_s": round(total / (real * scale), 2),
        "consul_requests_per_restart": round(total / max(1, len(per_alloc)), 1),
        "consul_by_endpoint": consul,
        "cpu_sim_s": round(cpu_sim, 1),
        "cpu_agents_s": round(cpu_agents, 1),
        "cpu_sim_pct_of_one_core": round(cpu_sim / real * 100, 1),
        "cpu_sim_share_of_benchmark": round(cpu_sim / max(1e-9, cpu_sim + cpu_agents), 3),
    }


def invariant_problems(result: dict[str, Any]) -> list[str]:
    rollout = result["rollout"]
    if not rollout["completed"]:
        return []
    problems = []
    if rollout["peak_concurrent_restarts"] > result["concurrency"]:
        problems.append(f"peak {rollout['peak_concurrent_restarts']} > c = {result['concurrency']}")
    if not rollout["restarted_exactly_once"]:
        problems.append("not every allocation restarted exactly once")
    return problems


def print_table(console: Console, results: list[dict[str, Any]]) -> None:
    table = Table(
        title="Scale: an agent per node, one config change (idle: per agent per cluster minute; "
        "rates: Consul requests; sim CPU: % of one core)",
        title_justify="left",
    )
    for column in (
        "nodes",
        "allocs",
        "c",
        "done",
        "peak",
        "once",
        "makespan /ideal",
        "req/s real",
        "req/restart",
        "idle consul/min",
        "idle nomad/min",
        "sim CPU",
        "agents CPU",
        "real s",
    ):
        table.add_column(column, justify="right")
    for r in results:
        ro, idle = r["rollout"], r["idle"]
        table.add_row(
            str(r["nodes"]),
            str(r["allocations"]),
            str(r["concurrency"]),
            "yes" if ro["completed"] else f"no ({ro['restarted_healthy']})",
            f"{ro['peak_concurrent_restarts']}/{r['concurrency']}",
            "yes" if ro["restarted_exactly_once"] else "NO",
            f"{ro['makespan_over_ideal']:.2f}" if ro["makespan_over_ideal"] else "-",
            f"{ro['consul_requests_per_real_s']:.0f}",
            f"{ro['consul_requests_per_restart']:.0f}",
            f"{idle['consul_requests_per_agent_per_minute']:.1f}",
            f"{idle['nomad_requests_per_agent_per_minute']:.1f}",
            f"{ro['cpu_sim_pct_of_one_core']:.0f}%",
            f"{ro['cpu_agents_s'] / ro['real_s'] * 100:.0f}%",
            f"{ro['real_s']:.0f}",
        )
    console.print(table)


def _size(text: str) -> tuple[int, int]:
    try:
        nodes, allocs = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NODES:ALLOCATIONS, got {text!r}") from None
    return nodes, allocs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--sizes",
        type=lambda t: [_size(s) for s in t.split(",")],
        default=[(200, 2000)],
        help="comma-separated NODES:ALLOCATIONS (default 200:2000)",
    )
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--time-scale", type=float, default=20.0, help="cluster seconds per real second")
    parser.add_argument(
        "--agent-processes",
        type=int,
        default=0,
        help="processes the agents are spread over (default: 25 a process)",
    )
    parser.add_argument("--idle", type=float, default=30.0, help="real seconds of idle measurement")
    parser.add_argument("--timeout", type=float, default=900.0, help="real seconds a rollout may take")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    console = Console(width=160)
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    if max(nodes for nodes, _ in args.sizes) > limit - 8:
        parser.error(
            f"every agent opens an inotify instance and this user may open {limit} "
            f"(fs.inotify.max_user_instances); raise it first, e.g. sysctl fs.inotify.max_user_instances=1024"
        )
    results = []
    for nodes, allocs in args.sizes:
        console.print(f"[dim]{nodes} nodes, {allocs} allocations, c={args.concurrency} ...[/dim]")
        results.append(
            run_size(
                nodes,
                allocs,
                args.concurrency,
                args.time_scale,
                args.agent_processes or -(-nodes // 25),
                args.idle,
                args.timeout,
            )
        )
        common.write_json(args.json, {"benchmark": "scale", "machine": common.machine(), "results": results})
    print_table(console, results)
    for r in results:
        idle = r["idle"]
        console.print(
            f"{r['nodes']} nodes idle: only session renewals and reads (GET: blocking queries when idle): "
            f"{'yes' if idle['only_renewals_and_reads'] else 'NO'} ({idle['consul_by_endpoint']}; "
            f"nomad {idle['nomad_by_endpoint']})"
        )
    problems = [f"{r['nodes']} nodes: {p}" for r in results for p in invariant_problems(r)]
    for problem in problems:
        console.print(f"[red]invariant broken: {problem}[/red]")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
