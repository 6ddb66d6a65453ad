"""The per-node agent end to end: real inotify on the simulator's allocation directories, over HTTP.

Sim-only: the agents need each node's Nomad data dir on this machine, and the tests read the
sim's restart record. (A real cluster's agent runs on its own node: see README, "The agent".)
"""

from __future__ import annotations

from collections import Counter

from agent_support import SCALE, agents, complete, scenario, wait_plan

from shepard_lib.sim.pytest_plugin import SimClusterFactory


def test_key_change_restarts_every_allocation_once_one_at_a_time_each_healthy_first(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=9, concurrency=1), time_scale=SCALE)
    with agents(sim, ["n1", "n2", "n3"]) as running:
        assert all(len(a.watched()) == 3 for a in running.values())
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete())
    restarts = [r for r in sim.restarts() if r.job == "web"]
    assert Counter(r.alloc_id for r in restarts) == Counter({a: 1 for a in plan.members}), restarts
    assert len(plan.members) == 9
    assert sim.peak_concurrency("web", "app", "server") == 1
    ordered = sorted(restarts, key=lambda r: r.stopped_at or 0)
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert before.healthy_at is not None and after.stopped_at is not None
        assert before.healthy_at <= after.stopped_at, f"{after.alloc_id} went before {before.alloc_id} was healthy"
