"""The 100-node example fleet boots quickly and shows the thundering herd Shepard exists to prevent."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.model import TxnOp, TxnVerb

FLEET = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "fleet-100.yaml"


def test_fleet_boots_settled_with_an_allocation_dir_per_node(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(FLEET, time_scale=50)  # how fast it boots is a benchmark's business
    assert len(sim.nomad.allocations("api")) == 100 and len(sim.nomad.allocations("worker")) == 50
    assert all((sim.node_data_dir(f"client-{i:03d}") / "alloc").is_dir() for i in range(1, 101))


def test_uncoordinated_triggers_restart_the_whole_fleet_at_once(sim_cluster_factory: Any) -> None:
    # One transaction writes the 100 trigger keys at one Consul index, as one shared change would be seen.
    # Scale 2: a restart and its way back to healthy (~5 cluster seconds) span ~2.5 real seconds, far longer
    # than rendering 100 templates takes even on a loaded machine, so the restarts overlap.
    sim = sim_cluster_factory(FLEET, time_scale=2)
    keyspace = Keyspace()
    writes = [
        TxnOp(
            TxnVerb.SET,
            keyspace.trigger_key(TaskRef(a.node.name, "api", "http", "server", a.index)),
            uuid.uuid4().hex.encode(),
        )
        for a in sim.nomad.allocations("api")
    ]
    assert not sim.consul_state.txn(writes).errors
    deadline = time.monotonic() + 120
    while len(sim.restarts()) < 100:
        assert time.monotonic() < deadline, f"only {len(sim.restarts())} of 100 restarted"
        time.sleep(0.05)
    sim.wait_settled(timeout=600)
    assert {r.cause for r in sim.restarts()} == {"template"}
    assert sim.peak_concurrency("api", "http", "server") > 50, "without Shepard, the herd restarts together"


def test_signal_templates_signal_every_worker_without_restarting_it(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(FLEET, time_scale=50)
    sim.set_key("config/logging", "level=debug")
    deadline = time.monotonic() + 120  # a bound for a hang, not a timing
    while len(sim.nomad.signals()) < 50:
        assert time.monotonic() < deadline, f"only {len(sim.nomad.signals())} of 50 signalled"
        time.sleep(0.01)
    assert {(s.task, s.signal) for s in sim.nomad.signals()} == {("log-agent", "SIGHUP")}
    assert sim.restarts() == []
