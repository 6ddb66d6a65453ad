"""Garbage collection of 50,000 stale keys on the simulator: keys/s and Consul requests used.

Seeds the simulated Consul with N stale Shepard keys (trigger keys of nodes Nomad does not know,
trigger keys and slots of jobs that are gone), runs one cluster pass of
:func:`shepard_lib.gc.collect_garbage` over HTTP, and reads the sim's request counters. The target
(issue 13) is at most one Consul request per 64 deletions plus the scans. Each transaction carries
63 ``delete-cas`` and the ``check-session`` that fences it with the GC leader lock, so the pass
should use ``ceil(N / 63)`` transactions (``ceil(N / 64)`` plus about one in 64), one ``?recurse``
scan, and the leader lock's session and acquire / release. As a baseline measured in the same
process it deletes a sample of keys the naive way, one ``DELETE ?cas=`` per key, and prints the
ratio of the two rates. It asserts nothing about time.

    python benchmarks/bench_gc.py [-n 50000] [--baseline 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, default_config
from shepard_lib.gc import MAX_TXN_OPS, collect_garbage
from shepard_lib.keyspace import Keyspace, TaskRef, TaskScope
from shepard_lib.sim import SimCluster
from shepard_lib.sim.scenario import small_scenario


def seed(sim: SimCluster, n: int, keys: Keyspace, tag: str) -> list[str]:
    """Write ``n`` stale keys straight into the sim's state (not over HTTP); returns their names."""
    made: list[str] = []
    for i in range(n):
        kind = i % 10
        if kind < 6:  # a node Nomad does not know
            key = keys.trigger_key(TaskRef(f"{tag}-node-{i % 500}", "web", "app", "server", i))
        elif kind < 9:  # a job that is gone, on a ready node
            key = keys.trigger_key(TaskRef("node-1", f"{tag}-job-{i % 300}", "app", "server", i))
        else:  # a free slot of a job that is gone
            key = keys.slot_key(TaskScope(f"{tag}-job-{i}", "app", "server"), 0)
        sim.set_key(key, "x")
        made.append(key)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=50_000, help="stale keys to collect (default 50000)")
    parser.add_argument("--baseline", type=int, default=2000, help="keys deleted one by one for the baseline")
    args = parser.parse_args()

    with SimCluster.from_scenario(small_scenario(), time_scale=1.0) as sim:
        cfg = dataclasses.replace(
            default_config(), consul=ConsulConfig(sim.consul_addr), nomad=NomadConfig(sim.nomad_addr)
        )
        consul, nomad = ConsulBackend(cfg.consul, sim.clock), NomadBackend(cfg.nomad, sim.clock)
        keys = Keyspace(cfg.key_prefix)

        sample = seed(sim, args.baseline, Keyspace("baseline"), "base")
        sim.consul_server.requests.reset()
        start = time.perf_counter()
        for key in sample:
            entry = consul.get(key)
            assert entry is not None
            consul.delete(key, cas=entry.modify_index)
        naive_rate = len(sample) / (time.perf_counter() - start)

        seed(sim, args.n, keys, "gone")
        sim.consul_server.requests.reset()
        nomad_before = sim.nomad.request_counts()
        start = time.perf_counter()
        report = collect_garbage(consul, nomad, cfg, clock=sim.clock, name="bench gc")
        took = time.perf_counter() - start
        counts = sim.consul_server.requests.snapshot()
        nomad_after = sim.nomad.request_counts()
        consul.close()
        nomad.close()

    deleted = len(report.deleted)
    txns = counts.get("/v1/txn", {}).get("PUT", 0)
    scans = counts.get("/v1/kv", {}).get("GET", 0)
    total = sum(n for methods in counts.values() for n in methods.values())
    nomad_calls = {
        k: v - nomad_before.get(k, 0) for k, v in nomad_after.items() if v != nomad_before.get(k, 0)
    }
    expected_txns = math.ceil(args.n / (MAX_TXN_OPS - 1))
    target_txns = math.ceil(args.n / MAX_TXN_OPS)
    rate = deleted / took
    print(
        f"gc pass: {deleted} of {args.n} stale keys deleted in {took:.2f}s = {rate:,.0f} keys/s "
        f"(ok={report.ok})"
    )
    print(f"  by rule: {report.deleted_by_rule()}")
    print(
        f"  Consul requests: {total} in all = {txns} txn + {scans} scan + {total - txns - scans} lock/session"
    )
    for endpoint, methods in sorted(counts.items()):
        print(f"    {endpoint}: {methods}")
    print(
        f"  txns: {txns}, expected {expected_txns} (ceil({args.n} / {MAX_TXN_OPS - 1}): {MAX_TXN_OPS - 1} "
        f"deletes + the leader fence each); issue 13's target {target_txns} (ceil({args.n} / {MAX_TXN_OPS})) "
        f"+{txns - target_txns} ({(txns - target_txns) / target_txns:.1%}): the fence's cost"
    )
    print(f"  deletions per Consul request: {deleted / max(total, 1):.1f}")
    print(f"  Nomad requests: {nomad_calls}")
    print(
        f"baseline (one DELETE ?cas per key, after a GET): {naive_rate:,.0f} keys/s; "
        f"gc pass is {rate / naive_rate:.1f}x"
    )


if __name__ == "__main__":
    main()
