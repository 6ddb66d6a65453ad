"""RollingRestart end to end over HTTP against the simulated cluster (sim-only: needs its restart record)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from shepard_lib.backends import ConsulAPI
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, RestartMethod, ShepardConfig, default_config
from shepard_lib.coordinator import EventKind, RolloutEvent
from shepard_lib.errors import ConfigError
from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.plan import PlanStatus, PlanStore
from shepard_lib.rollout import RollingRestart, RolloutOptions
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCALE = 25.0
SCOPE = TaskScope("web", "app", "server")
PLAN_KEY = Keyspace().task_lock_key(SCOPE)


def scenario(count: int = 6, job_meta: dict[str, str] | None = None, sidecar: bool = False) -> dict[str, Any]:
    tasks: list[dict[str, Any]] = [
        {
            "name": "server",
            "shepard": True,
            "templates": [{"key": "config/web", "destination": "local/app.conf", "change_mode": "noop"}],
            "service": "web",
            "unhealthy_if": {"key": "config/web", "equals": "broken"},
        }
    ]
    if sidecar:
        tasks.append({"name": "proxy", "shepard": False})
    return {
        "seed": 7,
        "nodes": ["node-1", "node-2", "node-3"],
        "jobs": [
            {
                "name": "web",
                "meta": job_meta or {},
                "groups": [{"name": "app", "count": count, "tasks": tasks}],
            }
        ],
        "timing": {"restart": "1s", "healthy_after": "500ms"},
        "keys": {"config/web": "v1"},
    }


pytestmark = pytest.mark.usefixtures("no_client_env")


def config_for(sim: SimCluster, token: str | None = None, **changes: Any) -> ShepardConfig:
    fast: dict[str, Any] = {
        "session_ttl": 10.0,
        "lock_delay": 2.0,
        "min_healthy_time": 2.0,
        "healthy_deadline": 60.0,  # 2.4 real seconds of slack for a 3.5 s (cluster) restart on a busy machine
    }
    return replace(
        default_config(),
        consul=ConsulConfig(address=sim.consul_addr, token=token),
        nomad=NomadConfig(address=sim.nomad_addr, token=token),
        **{**fast, **changes},
    )


def rolling(
    sim: SimCluster, cfg: ShepardConfig, consul: ConsulAPI | None = None, **kwargs: Any
) -> RollingRestart:
    return RollingRestart(
        consul or ConsulBackend(cfg.consul, sim.clock),
        NomadBackend(cfg.nomad, sim.clock),
        cfg,
        clock=sim.clock,
        **kwargs,
    )


def restarts_by_alloc(sim: SimCluster) -> Counter[str]:
    return Counter(r.alloc_id for r in sim.restarts())


@pytest.mark.parametrize("method", [RestartMethod.CONSUL_KEY, RestartMethod.NOMAD_API])
def test_rollout_restarts_every_allocation_once_within_concurrency(
    sim_cluster_factory: SimClusterFactory, method: RestartMethod
) -> None:
    sim = sim_cluster_factory(scenario(6), time_scale=SCALE)
    events: list[RolloutEvent] = []
    result = rolling(sim, config_for(sim), observer=events.append).run(
        "web", RolloutOptions(concurrency=2, method=method)
    )

    allocs = {
        a.id for a in NomadBackend(NomadConfig(address=sim.nomad_addr), sim.clock).job_allocations("web")
    }
    assert result.ok, result.to_dict()
    assert {o.target.alloc_id for o in result.restarted} == allocs
    assert restarts_by_alloc(sim) == dict.fromkeys(allocs, 1)
    assert {r.cause for r in sim.restarts()} == {"template" if method is RestartMethod.CONSUL_KEY else "api"}
    assert sim.peak_concurrency("web", "app", "server") <= 2
    assert 1 <= result.peak_concurrency <= 2
    assert all(o.duration is not None and o.duration >= 2.0 for o in result.restarted)
    assert [(p.status, p.concurrency) for p in result.plans] == [("complete", 2)]
    assert sum(1 for e in events if e.kind == EventKind.RESTARTED) == 6
    json.dumps(result.to_dict())  # serialisable


def test_concurrency_from_job_meta_is_used_and_fixed_in_the_plan(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(6, job_meta={"shepard_concurrency": "3"}), time_scale=SCALE)
    result = rolling(sim, config_for(sim)).run("web")
    assert result.ok
    assert result.plans[0].concurrency == 3
    assert sim.peak_concurrency("web") <= 3
    plan = PlanStore(ConsulBackend(ConsulConfig(address=sim.consul_addr), sim.clock)).load(PLAN_KEY)
    assert plan is not None and plan.concurrent_lock_count == 3


class RecordingConsul:
    """A ConsulAPI proxy that records the names of every call."""

    def __init__(self, inner: ConsulAPI) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.inner, name)


def test_dry_run_returns_the_order_and_writes_nothing(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(5), time_scale=SCALE)
    cfg = config_for(sim)
    consul = RecordingConsul(ConsulBackend(cfg.consul, sim.clock))
    result = rolling(sim, cfg, consul=consul).run("web", RolloutOptions(dry_run=True, concurrency=2))

    assert result.dry_run
    assert [p.alloc_index for p in result.planned] == [0, 1, 2, 3, 4]
    assert [p.order for p in result.planned] == [0, 1, 2, 3, 4]
    assert [(p.status, p.concurrency) for p in result.plans] == [("absent", 2)]
    writes = {
        "put",
        "acquire",
        "release",
        "delete",
        "txn",
        "session_create",
        "session_destroy",
        "session_renew",
    }
    assert not writes & set(consul.calls), consul.calls
    assert sim.get_key(PLAN_KEY) is None
    assert sim.restarts() == []


def test_bad_config_stops_after_max_failures_and_resume_finishes_after_the_fix(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(5), time_scale=SCALE)
    cfg = config_for(sim, healthy_deadline=6.0)
    sim.set_key("config/web", "broken")

    failed = rolling(sim, cfg).run("web", RolloutOptions(concurrency=1, max_failures=0))

    assert not failed.ok
    assert len(failed.failed) == 1
    assert "not healthy within 6s" in failed.failed[0].reason
    assert len(failed.skipped) == 4
    assert all("is failed" in o.reason for o in failed.skipped)
    assert [p.status for p in failed.plans] == ["failed"]
    bad = failed.failed[0].target.alloc_id
    assert restarts_by_alloc(sim) == {bad: 1}  # the rest untouched

    sim.set_key("config/web", "v2")
    # A good config must not fail by a tight deadline on a loaded machine (6 s was for the bad one).
    resumed = rolling(sim, replace(cfg, healthy_deadline=60.0)).resume("web", "app", "server")

    assert resumed.ok, resumed.to_dict()
    assert len(resumed.restarted) == 5
    counts = restarts_by_alloc(sim)
    assert counts[bad] == 2
    assert sorted(counts.values()) == [1, 1, 1, 1, 2]
    assert [p.status for p in resumed.plans] == ["complete"]


def test_abort_mid_rollout_lets_the_restart_in_flight_finish_and_skips_the_rest(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(5), time_scale=SCALE)
    cfg = config_for(sim)
    first_restarting = threading.Event()

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTING:
            first_restarting.set()

    outcome: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault("result", rolling(sim, cfg, observer=observe).run("web")),
        daemon=True,
    )
    runner.start()
    assert first_restarting.wait(10)
    plans = rolling(sim, cfg).abort("web", "app", "server", reason="stop the line")
    runner.join(30)

    assert [p.status for p in plans] == [PlanStatus.ABORTED]
    result = outcome["result"]
    assert len(result.restarted) == 1
    assert len(result.skipped) == 4
    assert all("aborted: stop the line" in o.reason for o in result.skipped)
    assert len(sim.restarts()) == 1


def test_status_shows_the_plan_and_slot_holders(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cfg = config_for(sim)
    seen: list[dict[int, str]] = []
    roller = rolling(sim, cfg)

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTING and not seen:
            seen.append(roller.status("web")[0].holders)

    rolling(sim, cfg, observer=observe).run("web")
    views = roller.status("web")

    assert len(views) == 1
    assert views[0].plan is not None and views[0].plan.status == PlanStatus.COMPLETE
    assert views[0].holders == {}
    assert list(seen[0]) == [0]
    assert "shepard-rollout worker" in seen[0][0]
    assert roller.status("other-job") == []


def test_consul_key_skips_tasks_without_the_shepard_template_and_nomad_api_restarts_them(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2, sidecar=True), time_scale=SCALE)
    cfg = config_for(sim)

    by_key = rolling(sim, cfg).run("web")
    assert [(s.task, "local/shepard.tpl" in s.reason) for s in by_key.skipped_tasks] == [("proxy", True)]
    assert {o.target.ref.task for o in by_key.restarted} == {"server"}

    by_api = rolling(sim, cfg).run("web", RolloutOptions(task="proxy", method=RestartMethod.NOMAD_API))
    assert by_api.ok
    assert {o.target.ref.task for o in by_api.restarted} == {"proxy"}
    assert Counter(r.task for r in sim.restarts()) == {"server": 2, "proxy": 2}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RolloutOptions(group="nope"), "job 'web' has no group 'nope'"),
        (RolloutOptions(task="nope"), "job 'web' has no task 'nope'"),
        (RolloutOptions(alloc_ids=("ffffffff",)), "no running allocation matches ffffffff"),
    ],
)
def test_unknown_selection_is_a_config_error(
    sim_cluster_factory: SimClusterFactory, options: RolloutOptions, message: str
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    with pytest.raises(ConfigError, match=message):
        rolling(sim, config_for(sim)).run("web", options)


def test_restart_of_chosen_allocations_only(sim_cluster_factory: SimClusterFactory) -> None:
    sim = sim_cluster_factory(scenario(4), time_scale=SCALE)
    allocs = sorted(
        NomadBackend(NomadConfig(address=sim.nomad_addr), sim.clock).job_allocations("web"),
        key=lambda a: a.index,
    )
    chosen = (allocs[1].id[:8], allocs[3].id)
    result = rolling(sim, config_for(sim)).run("web", RolloutOptions(alloc_ids=chosen))
    assert result.ok
    assert restarts_by_alloc(sim) == {allocs[1].id: 1, allocs[3].id: 1}


def test_worker_whose_session_is_lost_mid_restart_reclaims_it_under_a_new_session_and_goes_on(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Consul stops taking the renewals of the worker's session during its first restart (a partition
    longer than the TTL): the worker finishes that restart under a new session and restarts the
    rest; nothing is skipped, nothing restarted twice. Sim-only (fault controls)."""
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cfg = config_for(sim, min_healthy_time=15.0, healthy_deadline=60.0)  # a restart outlasts the TTL
    partitioned: list[str] = []

    def partition_first_holder(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTING and not partitioned:
            entry = sim.consul_state.kv_get(PLAN_KEY)
            assert entry is not None
            partitioned.append(json.loads(entry.text())["members"][event.alloc_id]["session"])
            sim.consul_faults.pause_session_renewals(partitioned[0])

    result = rolling(sim, cfg, observer=partition_first_holder).run("web", RolloutOptions(concurrency=1))

    assert partitioned
    assert result.ok, [(o.target.ref.alloc_index, o.outcome.value, o.reason) for o in result.skipped]
    assert [(o.target.ref.alloc_index, o.reclaimed) for o in result.restarted] == [
        (0, True),
        (1, False),
        (2, False),
    ]
    assert restarts_by_alloc(sim) == {o.target.alloc_id: 1 for o in result.restarted}
    assert sim.peak_concurrency("web", "app", "server") == 1
