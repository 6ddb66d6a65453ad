"""The per-node agent end to end: real inotify on the simulator's allocation directories, over HTTP.

Sim-only: the agents need each node's Nomad data dir on this machine, and the tests read the
sim's restart record. (A real cluster's agent runs on its own node: see README, "The agent".)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from agent_support import (
    KEYS,
    SCALE,
    SCOPE,
    agents,
    complete,
    make_agent,
    read_plan,
    scenario,
    scrape,
    total,
    wait_plan,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from shepard_lib.agent import Agent
from shepard_lib.agent.inotify import PyInotifyWatcher, WatchLimitReached
from shepard_lib.agent.watcher import TaskKey
from shepard_lib.config import default_config
from shepard_lib.coordinator import Coordinator, CoordinatorOptions, target_for
from shepard_lib.errors import ConsulError, PlanError
from shepard_lib.keyspace import TaskRef, TaskScope
from shepard_lib.plan import MemberState, PlanStatus
from shepard_lib.session import Session
from shepard_lib.sim import SimCluster
from shepard_lib.sim.consul import ConsulServer
from shepard_lib.sim.nomad.restarts import RestartRecord
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.sim.scenario import load_scenario


def test_key_change_restarts_every_allocation_once_one_at_a_time_each_healthy_first(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=9, concurrency=1), time_scale=SCALE)
    with agents(sim, ["n1", "n2", "n3"]) as running:
        assert all(len(a.watched()) == 3 for a in running.values())
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(9))
    restarts = [r for r in sim.restarts() if r.job == "web"]
    assert Counter(r.alloc_id for r in restarts) == Counter({a: 1 for a in plan.members}), restarts
    assert len(plan.members) == 9
    assert {m.holder_name for m in plan.members.values()} <= set(running), "each driven by a live agent"
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
        plan = wait_plan(sim, complete(9))
    counts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert counts == Counter({a: 1 for a in plan.members}) and len(counts) == 9
    assert {m.holder_name for m in plan.members.values()} <= {"n1", "n2", "n3"}, "each driven by an agent"
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
        plan = wait_plan(sim, complete(1))
        assert list(plan.members) == [key.alloc_id]


def rendered(sim: SimCluster, value: str) -> bool:
    """Every web allocation's ``local/app.conf`` holds ``value`` (Nomad rendered it)."""
    files = [
        sim.node_data_dir(a.node.name) / "alloc" / a.id / "server" / "local" / "app.conf"
        for a in sim.nomad.allocations("web")
    ]
    return bool(files) and all(f.is_file() and f.read_text() == value for f in files)


def test_two_changes_within_settle_time_are_one_rollout(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(count=6, concurrency=2), time_scale=SCALE)
    # A wide settle_time (5 s real) holds the second render inside the first one's window even on
    # a busy machine; both renders reach every file, so without coalescing each agent would see two
    # changes (and register a second generation, restarting every allocation twice).
    settle = 100.0
    with agents(sim, ["n1", "n2", "n3"], settle_time=settle) as running:
        sim.set_key("config/web", "v2")
        wait_until(sim, lambda: rendered(sim, "v2"), "every allocation rendered v2")
        sim.set_key("config/web", "v3")
        wait_until(sim, lambda: rendered(sim, "v3"), "every allocation rendered v3")
        plan = wait_plan(sim, complete(6))
        sim.clock.sleep(settle)  # a second change event, had there been one, would be registered by now
        plan, _ = read_plan(sim)
        changes = sum(
            s.value
            for agent in running.values()
            for s in agent.metrics.change_events.collect()[0].samples
            if s.name.endswith("_total")
        )
    assert plan is not None and plan.generation == 1, plan and plan.to_json()
    assert changes == 6, "one change event per allocation"
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
        plan = wait_plan(sim, complete(6, generation=2))
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


def test_allocations_arriving_replaced_or_stopped_are_picked_up_or_dropped(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    with agents(sim, ["n1"]) as running:
        agent = running["n1"]
        ids = {a.id for a in sim.nomad.allocations("web")}
        assert {k.alloc_id for k in agent.watched()} == ids
        spec = load_scenario(scenario(count=1, nodes=1) | {"jobs": [api_job()]}).jobs[0]
        sim.set_key("config/api", "a1")
        sim.nomad.register_job(spec)
        (api,) = (a.id for a in sim.nomad.allocations("api"))
        wait_until(
            sim, lambda: TaskKey(api, "server") in agent.watched(), "the new job's allocation is watched"
        )

        old = sorted(ids)[0]
        sim.nomad.stop_allocation(old)  # Nomad stops it and places a replacement: same index, new ID
        (new,) = {a.id for a in sim.nomad.allocations("web")} - ids
        wait_until(
            sim,
            lambda: (
                TaskKey(new, "server") in agent.watched() and TaskKey(old, "server") not in agent.watched()
            ),
            "the replacement is watched instead of the stopped allocation",
        )
        sim.nomad.stop_job("api")
        wait_until(
            sim,
            lambda: TaskKey(api, "server") not in agent.watched(),
            "the stopped job's allocation is dropped",
        )

        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(3))
    assert set(plan.members) == (ids - {old}) | {new}, "the running allocations, the replacement among them"


def api_job() -> dict[str, Any]:
    return {
        "name": "api",
        "groups": [
            {
                "name": "http",
                "count": 1,
                "tasks": [
                    {
                        "name": "server",
                        "shepard": True,
                        "templates": [
                            {"key": "config/api", "destination": "local/api.conf", "change_mode": "noop"}
                        ],
                    }
                ],
            }
        ],
    }


class LimitedWatcher(PyInotifyWatcher):
    """Real inotify, but the kernel's watch limit is 2 directories (fault injection)."""

    def add(self, directory: Path) -> None:
        if self.count() >= 2:
            raise WatchLimitReached(f"inotify watch limit reached watching {directory}")
        super().add(directory)


def test_watch_exhaustion_is_logged_once_and_falls_back_to_scans(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    caplog.set_level(logging.INFO)
    agent = make_agent(sim, "n1")
    agent = Agent(agent.config, agent.consul, agent.nomad, clock=sim.clock, dir_watcher=LimitedWatcher)
    with agent:
        assert agent.metrics.inotify_fallback._value.get() >= 2  # every task past the first watches
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(3))
    assert len(plan.members) == 3, "the tasks on scans were restarted too"
    limit_lines = [r for r in caplog.records if "max_user_watches" in r.getMessage()]
    assert len(limit_lines) == 1, [r.getMessage() for r in limit_lines]
    assert "sysctl -w fs.inotify.max_user_watches=" in limit_lines[0].getMessage()


def test_metrics_health_and_ready_are_served_and_parse(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    caplog.set_level(logging.INFO)
    with agents(sim, ["n1"], metrics_address="127.0.0.1:0") as running:
        agent = running["n1"]
        base = f"http://{agent.metrics_address}"
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
        assert requests.get(f"{base}/ready", timeout=10).status_code == 200
        sim.set_key("config/web", "v2")
        wait_plan(sim, complete(3))
        succeeded = agent.metrics.restarts_succeeded.labels("web", "app", "server")
        wait_until(sim, lambda: succeeded._value.get() == 3, "the last outcome is counted")
        text = requests.get(f"{base}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    task = (("group", "app"), ("job", "web"), ("task", "server"))
    assert samples[("shepard_restarts_started_total", task)] == 3
    assert samples[("shepard_restarts_succeeded_total", task)] == 3
    assert samples[("shepard_change_events_total", task)] == 3
    assert samples[("shepard_watched_allocations", ())] == 3
    assert samples[("shepard_watched_tasks", ())] == 3
    assert samples[("shepard_inotify_fallback_tasks", ())] == 0
    assert samples[("shepard_slot_wait_seconds_count", ())] == 3
    assert samples[("shepard_restart_to_healthy_seconds_count", ())] == 3
    assert samples[("shepard_session_renew_failures_total", ())] == 0
    seen = [r.getMessage() for r in caplog.records if "change seen" in r.getMessage()]
    assert len(seen) == 3 and all(m.startswith("n1/web/app/server[") for m in seen), seen
    assert all(m.endswith("change seen in server/local/app.conf") for m in seen), seen


def test_consul_down_longer_than_the_ttl_then_back_gets_a_new_session_and_works(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    caplog.set_level(logging.INFO)
    with agents(sim, ["n1"], metrics_address="127.0.0.1:0") as running:
        agent = running["n1"]
        first = agent.session_id
        port = sim.consul_server.port
        sim.consul_server.stop()
        sim.clock.sleep(3 * agent.config.session_ttl)
        assert not agent.ready()
        ready = f"http://{agent.metrics_address}/ready"
        assert requests.get(ready, timeout=10).status_code == 503, "no live session: not ready"
        sim.consul_server = ConsulServer(sim.consul_state, port=port).start()
        wait_until(sim, lambda: agent.ready() and agent.session_id != first, "the agent has a new session")
        assert requests.get(ready, timeout=10).status_code == 200
        holder = sim.consul_state.kv_get(KEYS.node_key("n1"))
        wait_until(
            sim,
            lambda: (
                (e := sim.consul_state.kv_get(KEYS.node_key("n1"))) is not None
                and e.session == agent.session_id
            ),
            "the heartbeat is held by the new session",
        )
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(3))
        samples = scrape(agent)
    assert holder is not None and len(plan.members) == 3
    assert samples[("shepard_sessions_lost_total", ())] >= 1, samples
    assert samples[("shepard_session_renew_failures_total", ())] >= 1, samples
    outage_lines = [r for r in caplog.records if r.getMessage().startswith("Consul unreachable")]
    assert len(outage_lines) == 1, [r.getMessage() for r in outage_lines]
    assert sum(r.getMessage().startswith("Consul reachable again") for r in caplog.records) == 1


def test_the_agent_collects_garbage_every_gc_interval(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    stale = KEYS.trigger_key(TaskRef("n1", "web", "app", "server", 7))  # no allocation has index 7
    sim.set_key(stale, "old trigger")
    sim.set_key("shepard/notes", "an operator's key under the prefix")
    with agents(sim, ["n1"], gc_interval=5.0, metrics_address="127.0.0.1:0") as running:
        agent = running["n1"]
        wait_until(sim, lambda: sim.get_key(stale) is None, "the stale trigger key is collected")
        assert sim.get_key(KEYS.node_key("n1")) is not None, "the live heartbeat is kept"
        wait_until(
            sim,
            lambda: total(scrape(agent), "shepard_gc_skipped_total", reason="unknown_key") >= 1,
            "the unknown key is counted as spared",
        )
        samples = scrape(agent)
        assert sim.get_key("shepard/notes") is not None, "a key Shepard does not write is never deleted"
    assert samples[("shepard_gc_deleted_total", (("rule", "alloc_gone"),))] >= 1, samples


def test_different_tasks_roll_out_concurrently(sim_cluster_factory: SimClusterFactory) -> None:
    spec = scenario(count=1, concurrency=1, nodes=1)
    spec["jobs"].append(api_job())
    spec["keys"]["config/api"] = "a1"
    sim = sim_cluster_factory(spec, time_scale=SCALE)
    api = TaskScope("api", "http", "server")

    def restarting(scope: TaskScope) -> bool:
        plan, _ = read_plan(sim, scope)
        return plan is not None and any(m.state is MemberState.RESTARTING for m in plan.members.values())

    # A long min_healthy_time keeps each restart in flight: handled one after the other, the two
    # tasks would never be restarting at the same moment.
    with agents(sim, ["n1"], min_healthy_time=60.0, healthy_deadline=300.0):
        sim.set_key("config/web", "v2")
        sim.set_key("config/api", "a2")
        wait_until(sim, lambda: restarting(SCOPE) and restarting(api), "both tasks restart at once")


def test_nomad_failing_for_a_while_is_one_log_line_then_the_agent_resumes(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    caplog.set_level(logging.INFO)
    with agents(sim, ["n1"], metrics_address="127.0.0.1:0") as running:
        agent = running["n1"]
        base = f"http://{agent.metrics_address}"
        assert total(scrape(agent), "shepard_request_errors_total", backend="nomad") == 0
        sim.nomad_faults.error_rate = 1.0
        wait_until(sim, lambda: not agent.ready(), "the agent is not ready while Nomad fails")
        assert requests.get(f"{base}/ready", timeout=10).status_code == 503
        assert requests.get(f"{base}/health", timeout=10).status_code == 200, "alive all the same"
        failed = scrape(agent)
        assert total(failed, "shepard_request_errors_total", backend="nomad") > 0, failed
        assert total(failed, "shepard_request_errors_total", backend="consul") == 0, failed
        sim.clock.sleep(60.0)  # several backoff rounds
        sim.nomad_faults.error_rate = 0.0
        wait_until(sim, agent.ready, "the agent is ready again")
        assert requests.get(f"{base}/ready", timeout=10).status_code == 200
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(2))
    assert len(plan.members) == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "shepard_lib.agent.outage"]
    assert sum(m.startswith("Nomad unreachable") for m in messages) == 1, messages
    assert sum(m.startswith("Nomad reachable again") for m in messages) == 1, messages


def test_periodic_gc_and_log_shipping_run_and_are_counted_in_the_metrics(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    stale = "shepard/keys/n1/gone-job/app/server/0"
    sim.set_key(stale, "x")
    shipping = dataclasses.replace(
        default_config().log_shipping,
        enabled=True,
        path=str(tmp_path / "tasks.jsonl"),
        checkpoint_path=str(tmp_path / "checkpoints.json"),
    )
    changes = {"gc_interval": 5.0, "ship_log_interval": 5.0, "log_shipping": shipping}
    with agents(sim, ["n1"], metrics_address="127.0.0.1:0", **changes) as running:
        agent = running["n1"]
        wait_until(sim, lambda: sim.get_key(stale) is None, "the stale trigger key is collected")
        registry = agent.metrics.registry
        wait_until(
            sim,
            lambda: (
                (registry.get_sample_value("shepard_logship_lines_shipped_total", {"sink": "file"}) or 0) > 0
            ),
            "task logs are shipped and counted",
        )
        deleted = agent.metrics.gc_deleted.labels("job_gone")
        wait_until(sim, lambda: deleted._value.get() >= 1, "the deletion is counted")
        text = requests.get(f"http://{agent.metrics_address}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("shepard_gc_deleted_total", (("rule", "job_gone"),))] >= 1
    assert samples[("shepard_logship_lines_shipped_total", (("sink", "file"),))] >= 1
    records = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert {r["nomad.job.name"] for r in records} == {"web"}


def test_a_member_whose_drive_fails_twice_is_tried_again_not_dropped(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the agent benchmarks: a drive that lost every plan-update race was logged and dropped,
    and after a second failure the member was marked undrivable for good: the plan never completed."""
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    failures: Counter[str] = Counter()
    real_drive = Coordinator.drive

    def flaky_drive(self: Coordinator, target: Any, **kwargs: Any) -> Any:
        if not failures or (target.alloc_id in failures and failures[target.alloc_id] < 2):
            failures[target.alloc_id] += 1
            raise PlanError(f"plan update of {target.alloc_id} lost every race (injected)")
        return real_drive(self, target, **kwargs)

    monkeypatch.setattr(Coordinator, "drive", flaky_drive)
    with agents(sim, ["n1"]):
        sim.set_key("config/web", "v2")
        wait_plan(sim, complete(3))
    assert list(failures.values()) == [2], failures
    restarted = Counter(r.alloc_id for r in sim.restarts())
    assert sorted(restarted.values()) == [1, 1, 1], restarted


def test_a_change_handed_back_after_a_failure_does_not_hold_the_lanes_slot_and_finish_meanwhile(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the f15 chaos investigation: the worker waited ``recheck_interval`` before trying a
    failed change again with its lane still on: the slot kept idle, and the member the lane had just
    restarted left ``restarting`` (its finish deferred to a next claim that did not come), for good
    if the change kept failing."""
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    driven: list[str] = []
    seen_at_retry: list[tuple[str, ...]] = []
    real_drive = Coordinator.drive

    def second_member_fails_once(self: Coordinator, target: Any, **kwargs: Any) -> Any:
        if target.alloc_id not in driven:
            driven.append(target.alloc_id)
            if len(driven) == 2:
                raise PlanError(f"plan update of {target.alloc_id} lost every race (injected)")
        elif target.alloc_id == driven[-1] and not seen_at_retry:
            plan, _ = read_plan(sim)
            assert plan is not None
            slot = sim.consul_state.kv_get(KEYS.slot_key(SCOPE, 0))
            held = slot is not None and slot.session is not None
            seen_at_retry.append((plan.members[driven[0]].state.value, "slot held" if held else "slot free"))
        return real_drive(self, target, **kwargs)

    monkeypatch.setattr(Coordinator, "drive", second_member_fails_once)
    with agents(sim, ["n1"]):
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(2))
    assert len(driven) == 2, driven
    # When the failed change was tried again, the first member was finished and the slot free.
    assert seen_at_retry == [("done", "slot free")], seen_at_retry
    assert {m.state for m in plan.members.values()} == {MemberState.DONE}
    assert Counter(r.alloc_id for r in sim.restarts()) == Counter(dict.fromkeys(plan.members, 1))


def test_members_whose_allocations_are_gone_are_settled_skipped_by_the_other_agents(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Found by the issue-8 audit: the agents drove a dead node's members but only noted locally
    those whose allocations Nomad lost or forgot; they stayed ``pending`` and the plan never completed."""
    sim = sim_cluster_factory(scenario(count=6, concurrency=1), time_scale=SCALE)
    with agents(sim, ["n1", "n2"]) as running:
        n3 = make_agent(sim, "n3")  # never started: its backends and options, as n3's agent had them
        job = n3.nomad.job("web")
        on_n3 = [a for a in n3.nomad.job_allocations("web") if a.node_name == "n3"]
        assert len(on_n3) == 2
        with Session(n3.consul, "n3", ttl=30.0, clock=sim.clock) as session:
            options = CoordinatorOptions.from_config(n3.config)
            registrar = Coordinator(n3.consul, n3.nomad, KEYS, session, options, clock=sim.clock, name="n3")
            registrar.register(SCOPE, [target_for(a, "server", job) for a in on_n3], job)
        # n3's agent registered its node's change, then died with its node: Nomad marks the node's
        # allocations lost and replaces them on n1 and n2, and its GC forgets one of the lost ones.
        sim.nomad.set_node_down("n3")
        with sim.nomad.state.lock:
            del sim.nomad.state.allocs[on_n3[0].id]
        live = {a.id for a in sim.nomad.allocations("web") if a.desired_status == "run"}
        assert len(live) == 6 and not live & {a.id for a in on_n3}
        # A change rendered before an agent watches the allocation is not seen (docs/design.md,
        # Watching): the replacements are watched first (under load, discovery may lag the change).
        wait_until(
            sim,
            lambda: live <= {k.alloc_id for a in running.values() for k in a.watched()},
            "the agents watch the replacements",
        )
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, lambda p: p.status is PlanStatus.COMPLETE and live <= set(p.members))
    skipped = {a: m.error for a, m in plan.members.items() if m.state is MemberState.SKIPPED}
    assert set(skipped) == {a.id for a in on_n3}, plan.to_json()
    assert "garbage-collected" in (skipped[on_n3[0].id] or ""), skipped
    assert (skipped[on_n3[1].id] or "").startswith("replaced"), skipped
    restarts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert restarts == Counter({a: 1 for a in live}), restarts
    assert sim.peak_concurrency("web", "app", "server") == 1


def test_a_lanes_finish_that_could_not_be_written_is_taken_over_by_its_own_agent(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the f15 chaos investigation: a lane's deferred finish of another node's member whose
    write failed at the lane's end (Consul out of reach then) left the member ``restarting`` under the
    agent's live session with no claim token held. That node's agent is alive, so it left the member
    to its holder; the holder's agent skipped it as another live node's: nobody finished it."""
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=2), time_scale=SCALE)
    n2 = make_agent(sim, "n2")  # not started: alive (its heartbeat held) but never sees the change
    (b,) = [a for a in n2.nomad.job_allocations("web") if a.node_name == "n2"]
    failed: list[str] = []
    real_finish = Coordinator._finish

    def finish_fails_once_for_another_node(
        self: Coordinator, key: str, target: Any, *args: Any, **kw: Any
    ) -> Any:
        if not failed and target.ref.node != self.name:
            failed.append(target.alloc_id)
            raise PlanError(f"plan {key}: Consul kept failing (injected)")
        return real_finish(self, key, target, *args, **kw)

    monkeypatch.setattr(Coordinator, "_finish", finish_fails_once_for_another_node)
    with Session(n2.consul, "n2", ttl=30.0, clock=sim.clock) as session:
        assert n2.consul.acquire(KEYS.node_key("n2"), "{}", session.id or "")
        options = CoordinatorOptions.from_config(n2.config)
        registrar = Coordinator(n2.consul, n2.nomad, KEYS, session, options, clock=sim.clock, name="n2")
        job = n2.nomad.job("web")
        registrar.register(SCOPE, [target_for(b, "server", job)], job)
        with agents(sim, ["n1"]):
            # n1's lane restarts its own member, then n2's (pending, n2 alive but busy): n2's finish
            # is deferred to the lane's end, where its write fails.
            sim.set_key("config/web", "v2")
            plan = wait_plan(sim, complete(2))
    assert failed == [b.id], failed
    assert {m.state for m in plan.members.values()} == {MemberState.DONE}, plan.to_json()
    restarts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert restarts == Counter(dict.fromkeys(plan.members, 1)), "taken over without a second trigger"


def _stopped_in_the_registration_spread(sim: SimCluster, agent: Agent) -> str:
    """Start ``agent``, change its one allocation's config, stop it while the registrar waits out its
    spread (a long one: the stop, not the spread, ends it); returns the allocation's id."""
    spreading = threading.Event()

    def long_spread() -> float:
        spreading.set()
        return 3600.0

    agent.registration_spread = long_spread  # type: ignore[method-assign]
    agent.start()
    try:
        (key,) = agent.watched()
        sim.set_key("config/web", "v2")
        assert spreading.wait(sim.clock.real(600.0)), "the change never reached the registrar"
        plan, _ = read_plan(sim)
        assert plan is None, "registered before the spread ended"
    finally:
        agent.stop()
    return key.alloc_id


def test_a_change_gathered_when_the_agent_stops_is_registered_for_the_other_agents(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Found by the f15 safety review: a stop during the registrar's spread dropped the changes it
    had gathered; started again, the agent takes the files as they are: never restarted for it."""
    sim = sim_cluster_factory(scenario(count=1, concurrency=1, nodes=1), time_scale=SCALE)
    alloc_id = _stopped_in_the_registration_spread(sim, make_agent(sim, "n1"))
    plan, _ = read_plan(sim)
    assert plan is not None, "the gathered change was dropped"
    assert {a: m.state for a, m in plan.members.items()} == {alloc_id: MemberState.PENDING}
    assert [r for r in sim.restarts() if r.job == "web"] == [], "left to the other agents, not driven"


def test_a_change_that_cannot_be_registered_at_stop_is_logged_naming_its_allocation(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(count=1, concurrency=1, nodes=1), time_scale=SCALE)

    def consul_unreachable(self: Coordinator, *args: Any, **kwargs: Any) -> Any:
        raise ConsulError("txn", "connection refused (injected)", transient=True)

    monkeypatch.setattr(Coordinator, "register", consul_unreachable)
    with caplog.at_level(logging.ERROR, logger="shepard_lib.agent"):
        alloc_id = _stopped_in_the_registration_spread(sim, make_agent(sim, "n1"))
    lost = [r.getMessage() for r in caplog.records if "agent stopping" in r.getMessage()]
    assert len(lost) == 1 and alloc_id in lost[0] and "not restarted" in lost[0], caplog.text
    assert read_plan(sim)[0] is None


def test_reload_keeps_the_restart_only_settings_and_applies_the_others(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    sim = sim_cluster_factory(scenario(count=1, concurrency=None, nodes=1), time_scale=SCALE)
    caplog.set_level(logging.INFO)
    with agents(sim, ["n1"], concurrency=1) as running:
        agent = running["n1"]
        old = agent.config
        shipping = dataclasses.replace(old.log_shipping, enabled=True, path=str(tmp_path / "tasks.jsonl"))
        settle = 60.0
        kept = agent.reload(
            dataclasses.replace(
                old, settle_time=settle, concurrency=3, session_ttl=99.0, log_shipping=shipping
            )
        )
        assert kept == ["session_ttl", "log_shipping"]
        assert agent.config.session_ttl == old.session_ttl and agent.config.log_shipping == old.log_shipping
        assert agent.session is not None and agent.session.ttl == old.session_ttl
        assert (agent.config.settle_time, agent.config.concurrency) == (settle, 3)
        (key,) = agent.watched()
        flags = sim.node_data_dir("n1") / "alloc" / key.alloc_id / "alloc" / "data" / "flags"
        written = sim.clock.monotonic()
        flags.write_bytes(b"on")
        plan = wait_plan(sim, complete(1))
        seen = sim.clock.monotonic()
    # The watcher settled with the new settle_time (it cannot report the write sooner), and the
    # plan it opened has the new concurrency.
    assert seen - written >= settle, f"the change was reported {seen - written:.1f}s after the write"
    assert plan.concurrent_lock_count == 3
    warnings = [
        r.getMessage() for r in caplog.records if "change only when the agent restarts" in r.getMessage()
    ]
    assert warnings == ["config reloaded, but session_ttl, log_shipping change only when the agent restarts"]


def test_a_broken_config_fails_one_restart_halts_the_plan_and_counts_it(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    with agents(sim, ["n1"], max_failures=0, metrics_address="127.0.0.1:0") as running:
        agent = running["n1"]
        sim.set_key("config/web", "broken")  # the task's check fails with this config
        plan = wait_plan(sim, lambda p: p.halted)
        failed = agent.metrics.restarts_failed.labels("web", "app", "server")
        wait_until(sim, lambda: failed._value.get() >= 1, "the failed restart is counted")
        samples = scrape(agent)
    task = (("group", "app"), ("job", "web"), ("task", "server"))
    assert plan.status.value == "failed" and len(plan.in_state(MemberState.FAILED)) == 1, plan.to_json()
    assert samples[("shepard_restarts_failed_total", task)] == 1, samples
    assert samples[("shepard_restarts_started_total", task)] == 1, samples
    assert total(samples, "shepard_restarts_succeeded_total") == 0, samples
