"""One ``shepard agent`` process watching 200 allocations of a simulated node: memory, idle CPU, latency.

Starts the simulated cluster in this process (one node, one job of ``--allocs`` allocations whose
tasks render ``local/shepard.tpl``), then a real ``shepard agent`` subprocess for that node, and
measures, from ``/proc/<pid>``:

- resident memory once every allocation is watched (target: under 60 MB), next to the baseline
  of a bare interpreter that only imports ``shepard_lib.agent``, measured the same way;
- CPU over ``--idle`` seconds with nothing changing (target: under 1% of one core);
- change-to-trigger latency: a file of one allocation's ``local/`` is rewritten (temp file and
  rename, as consul-template does) and the time until that allocation's trigger key is written
  is taken, ``--samples`` times, one allocation after another (target: p99 under
  ``settle_time`` + 100 ms).

The clock runs at real speed, so the figures are the ones a node would see. Prints figures and
their ratio to the target; asserts nothing about timing.

    python benchmarks/bench_agent.py [--allocs 200] [--idle 60] [--samples 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.plan import Plan, PlanStatus
from shepard_lib.sim import SimCluster
from shepard_lib.sim.scenario import web_scenario

SETTLE = 2.0
TARGET_RSS_MB = 60.0
TARGET_IDLE_CPU = 0.01
SHEPARD = str(Path(sys.executable).parent / "shepard")
KEYS = Keyspace()


def scenario(count: int) -> dict[str, object]:
    return web_scenario(
        count=count, nodes=["bench-node"], restart="200ms", healthy_after="100ms", unhealthy_if_broken=False
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def baseline_rss() -> float:
    code = "import shepard_lib.agent, sys; sys.stdout.write('ok'); sys.stdout.flush(); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.read(2) == b"ok"
    try:
        return rss_mb(proc.pid)
    finally:
        proc.communicate(b"")


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting until {what}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--allocs", type=int, default=200)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    parser.add_argument("--samples", type=int, default=20, help="change-to-trigger samples")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, SimCluster.from_scenario(scenario(args.allocs)) as sim:
        config = Path(tmp) / "agent.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "consul": {"address": sim.consul_addr},
                    "nomad": {"address": sim.nomad_agent_addr("bench-node")},
                    "nomad_data_dir": str(sim.node_data_dir("bench-node")),
                    "settle_time": f"{SETTLE:g}s",
                    "min_healthy_time": "0s",
                    "log_level": "WARNING",
                }
            )
        )
        log = (Path(tmp) / "agent.log").open("wb")
        agent = subprocess.Popen([SHEPARD, "agent", "--config", str(config)], stderr=log)
        try:
            wait_for(
                lambda: (e := sim.consul_state.kv_get(KEYS.node_key("bench-node"))) is not None and e.session,
                120,
                "the agent holds its heartbeat",
            )
            allocs = sorted(sim.nomad.allocations("web"), key=lambda a: a.index)
            time.sleep(2.0)  # let start-up work (the first scans) finish before measuring
            rss = rss_mb(agent.pid)
            base = baseline_rss()
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            time.sleep(args.idle)
            idle = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)

            latencies = []
            for alloc in allocs[: args.samples]:
                key = KEYS.trigger_key(TaskRef(alloc.node.name, "web", "app", "server", alloc.index))
                app = sim.node_data_dir("bench-node") / "alloc" / alloc.id / "server" / "local" / "app.conf"
                tmp_file = app.parent / "31415926"
                tmp_file.write_text(f"changed for sample {alloc.index}\n")
                index = sim.consul_state.index
                started = time.monotonic()
                os.replace(tmp_file, app)
                while sim.consul_state.kv_get(key) is None:  # woken by each Consul write, no polling
                    index = sim.consul_state.wait_for_change(index, 60)
                latencies.append(time.monotonic() - started)
                wait_for(plan_complete(sim), 120, "the restart is through")
        finally:
            agent.terminate()
            agent.wait(60)
            log.close()

    print("samples (ms, in order):", " ".join(f"{x * 1000:.0f}" for x in latencies))
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    target_latency = SETTLE + 0.1
    print(f"allocations watched:        {args.allocs}")
    print(
        f"resident memory:            {rss:.1f} MB  (baseline interpreter importing shepard_lib.agent: "
        f"{base:.1f} MB, ratio {rss / base:.2f}; "
        f"target < {TARGET_RSS_MB:.0f} MB: {rss / TARGET_RSS_MB:.2f} of it)"
    )
    print(
        f"idle CPU over {args.idle:.0f}s:         {idle * 100:.2f}% of one core  "
        f"(target < {TARGET_IDLE_CPU * 100:.0f}%: {idle / TARGET_IDLE_CPU:.2f} of it)"
    )
    print(
        f"change-to-trigger latency:  p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms over {len(latencies)} "
        f"samples  (target p99 < settle_time + 100 ms = {target_latency * 1000:.0f} ms: "
        f"{p99 / target_latency:.2f} of it)"
    )


def plan_complete(sim: SimCluster) -> object:
    def done() -> bool:
        entry = sim.consul_state.kv_get(
            KEYS.task_lock_key(KEYS.scope(TaskRef("bench-node", "web", "app", "server", 0)))
        )
        return entry is not None and Plan.decode(entry.value).status is PlanStatus.COMPLETE

    return done


if __name__ == "__main__":
    main()
