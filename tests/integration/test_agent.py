"""The per-node agent end to end: real inotify on the simulator's allocation directories, over HTTP.

Sim-only: the agents need each node's Nomad data dir on this machine, and the tests read the
sim's restart record. (A real cluster's agent runs on its own node: see README, "The agent".)
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

from agent_support import SCALE, agents, complete, read_plan, scenario, wait_plan

from shepard_lib.plan import MemberState
from shepard_lib.sim.nomad.restarts import RestartRecord
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
    for before, after in itertools.pairwise(ordered):
        assert before.healthy_at is not None and after.stopped_at is not None
        assert before.healthy_at <= after.stopped_at, (
            f"{after.alloc_id} went before {before.alloc_id} was healthy"
        )


def test_at_concurrency_two_each_allocation_restarts_once_and_never_more_than_two_at_once(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=9, concurrency=2), time_scale=SCALE)
    with agents(sim, ["n1", "n2", "n3"]):
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete())
    counts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert counts == Counter({a: 1 for a in plan.members}) and len(counts) == 9
    assert 1 <= sim.peak_concurrency("web", "app", "server") <= 2


def rewrite_atomically(path: Path, content: bytes) -> None:
    """Write as consul-template does: a temp file in the same dir, then rename over the target."""
    tmp = path.parent / "4815162342"  # consul-template's temp files have all-digit names
    tmp.write_bytes(content)
    os.replace(tmp, path)


def test_logs_trigger_file_and_identical_renders_restart_nothing(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1), time_scale=SCALE)
    with agents(sim, ["n1"]) as running:
        agent = running["n1"]
        (key,) = agent.watched()
        base = sim.node_data_dir("n1") / "alloc" / key.alloc_id
        before = len(sim.restarts())
        with (base / "alloc" / "logs" / "server.stdout.0").open("ab") as log_file:
            log_file.write(b"a log line\n")
        (base / "alloc" / "logs" / "new-dir").mkdir()
        (base / "alloc" / "logs" / "new-dir" / "x").write_bytes(b"x")
        app = base / "server" / "local" / "app.conf"
        rewrite_atomically(app, app.read_bytes())  # an identical re-render
        tpl = base / "server" / "local" / "shepard.tpl"
        rewrite_atomically(tpl, b"someone else's trigger value")
        (base / "server" / "local" / ".app.conf.swp").write_bytes(b"editor state")
        sim.set_key("config/web", "v1")  # the same value: Nomad renders nothing new
        sim.clock.sleep(4 * agent.config.settle_time)
        changes = sum(
            s.value for s in agent.metrics.change_events.collect()[0].samples if s.name.endswith("_total")
        )
        assert changes == 0
        plan, _ = read_plan(sim)
        assert plan is None, plan
        # Only the shepard.tpl write restarted its task (change_mode restart), never through Shepard.
        assert [r.cause for r in sim.restarts()[before:]] in ([], ["template"])
        # A real change in the shared alloc dir is seen: the watcher was not blind meanwhile.
        (base / "alloc" / "data" / "feature.flags").write_bytes(b"on")
        plan = wait_plan(sim, complete())
        assert list(plan.members) == [key.alloc_id]


def test_two_changes_within_settle_time_are_one_rollout(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(count=6, concurrency=2), time_scale=SCALE)
    with agents(sim, ["n1", "n2", "n3"], settle_time=20.0):
        sim.set_key("config/web", "v2")
        sim.set_key("config/web", "v3")
        plan = wait_plan(sim, complete())
    assert plan.generation == 1
    counts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert counts == Counter({a: 1 for a in plan.members}) and len(counts) == 6


def test_a_change_mid_rollout_restarts_the_done_members_once_more(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=6, concurrency=1), time_scale=SCALE)
    with agents(sim, ["n1", "n2", "n3"]):
        sim.set_key("config/web", "v2")
        wait_plan(sim, lambda p: sum(m.state is MemberState.DONE for m in p.members.values()) >= 2)
        second = sim.clock.time()
        sim.set_key("config/web", "v3")
        plan = wait_plan(sim, complete(generation=2))
    by_alloc: dict[str, list[RestartRecord]] = {}
    for record in sim.restarts():
        by_alloc.setdefault(record.alloc_id, []).append(record)
    assert set(by_alloc) == set(plan.members)
    for alloc_id, records in by_alloc.items():
        assert len(records) <= 2, f"{alloc_id} restarted {len(records)} times"
        assert any((r.stopped_at or 0) >= second for r in records), f"{alloc_id} never restarted after v3"
        first = records[0]
        if first.healthy_at is not None and first.healthy_at < second:
            assert len(records) == 2, f"{alloc_id} was done before v3 but not restarted again"
