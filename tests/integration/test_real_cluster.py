"""The coordination core end to end, against the simulator and against a real Consul + Nomad.

Each test takes ``cluster``, parametrised ``["sim", "real"]``. The real variant runs when
``CONSUL_HTTP_ADDR`` and ``NOMAD_ADDR`` are set (with ``CONSUL_HTTP_TOKEN`` / ``NOMAD_TOKEN`` under
ACLs); the rolling-restart test also needs ``SHEPARD_TEST_JOB``, a job whose tasks render
``local/shepard.tpl`` (see ``shepard template``) and which may be restarted. Nothing here reads the
simulator's own record: restarts are counted from Nomad's task states and events, so both variants
check the same thing the same way. Keys go under a unique prefix and are deleted afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, RestartMethod, ShepardConfig, default_config
from shepard_lib.errors import LockLost
from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.locks import RestartSlots
from shepard_lib.rollout import RollingRestart, RolloutOptions
from shepard_lib.session import Session
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.trigger import Trigger

REAL_SKIP = (
    "set CONSUL_HTTP_ADDR and NOMAD_ADDR (and CONSUL_HTTP_TOKEN / NOMAD_TOKEN) to run against a real cluster"
)
JOB_SKIP = (
    "set SHEPARD_TEST_JOB to a job whose tasks render local/shepard.tpl to run the rollout on a real cluster"
)


@dataclass
class Cluster:
    """What a test needs of a cluster, the same for the sim and a real one."""

    kind: str
    consul: ConsulBackend
    nomad: NomadBackend
    nomad_address: str
    nomad_token: str | None
    clock: Clock
    prefix: str
    job: str | None
    consul_config: ConsulConfig
    nomad_config: NomadConfig

    def config(self, **changes: float) -> ShepardConfig:
        """Shepard's config for this cluster (key prefix ``shepard``: the one the job's templates read)."""
        return dataclasses.replace(
            default_config(), consul=self.consul_config, nomad=self.nomad_config, **changes
        )


def _make(
    kind: str, consul_cfg: ConsulConfig, nomad_cfg: NomadConfig, clock: Clock, job: str | None
) -> Cluster:
    return Cluster(
        kind,
        ConsulBackend(consul_cfg, clock),
        NomadBackend(nomad_cfg, clock),
        nomad_cfg.address,
        nomad_cfg.token,
        clock,
        f"shepard-test-{uuid.uuid4().hex[:8]}",
        job,
        consul_cfg,
        nomad_cfg,
    )


@pytest.fixture(params=["sim", "real"])
def cluster(
    request: pytest.FixtureRequest, sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    """The simulator, or the real cluster named by CONSUL_HTTP_ADDR / NOMAD_ADDR."""
    if request.param == "sim":
        sim = sim_cluster_factory()
        made = _make("sim", ConsulConfig(sim.consul_addr), NomadConfig(sim.nomad_addr), sim.clock, "web")
    else:
        consul_addr, nomad_addr = os.environ.get("CONSUL_HTTP_ADDR"), os.environ.get("NOMAD_ADDR")
        if not consul_addr or not nomad_addr:
            pytest.skip(REAL_SKIP)
        from shepard_lib.config import load_config

        cfg = load_config(env=os.environ)
        made = _make("real", cfg.consul, cfg.nomad, Clock(), os.environ.get("SHEPARD_TEST_JOB"))
    try:
        yield made
    finally:
        made.consul.delete(made.prefix, recurse=True)
        made.consul.close()
        made.nomad.close()


def test_slots_never_have_more_holders_than_their_size(cluster: Cluster) -> None:
    size, contenders, rounds = 2, 5, 2
    slots = RestartSlots(cluster.consul, f"{cluster.prefix}/locks/t/restart_lock/", size, clock=cluster.clock)
    inside, peak, errors = 0, 0, []
    guard = threading.Lock()

    def contend(n: int) -> None:
        nonlocal inside, peak
        try:
            with Session(
                cluster.consul, f"shepard-test contender {n}", ttl=10, clock=cluster.clock
            ) as session:
                for _ in range(rounds):
                    with slots.hold(session, holder=f"contender {n}", timeout=120):
                        with guard:
                            inside += 1
                            peak = max(peak, inside)
                        cluster.clock.sleep(0.3)
                        with guard:
                            inside -= 1
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert 1 <= peak <= size, f"{peak} holders at once with {size} slots"


def test_a_trigger_is_refused_once_its_slot_is_lost(cluster: Cluster) -> None:
    keyspace = Keyspace(cluster.prefix)
    ref = TaskRef("node-x", "job-x", "group-x", "task-x", 0)
    slots = RestartSlots(cluster.consul, keyspace.slot_prefix(keyspace.scope(ref)), 1, clock=cluster.clock)
    trigger = Trigger(cluster.consul, cluster.nomad, keyspace, RestartMethod.CONSUL_KEY)
    # A TTL with real margin on the sim's fast clock: nothing here waits for it to run out.
    session = Session(cluster.consul, "shepard-test fenced", ttl=60, clock=cluster.clock)
    session.create()
    slot = slots.acquire(session, holder="fenced", timeout=30)
    trigger.fire(ref, "alloc-x", slot)
    written = cluster.consul.get(keyspace.trigger_key(ref), consistent=True)
    assert written is not None, "a held slot must let the trigger write"

    session.destroy()
    with pytest.raises(LockLost):
        trigger.fire(ref, "alloc-x", slot)
    after = cluster.consul.get(keyspace.trigger_key(ref), consistent=True)
    assert after is not None and after.modify_index == written.modify_index, (
        "the trigger key moved without a slot"
    )


def _restart_intervals(cluster: Cluster, alloc_id: str, task: str, since_ns: int) -> list[tuple[int, int]]:
    """[restart signalled, started again] intervals of a task after ``since_ns``, from Nomad's task events."""
    headers = {"X-Nomad-Token": cluster.nomad_token} if cluster.nomad_token else {}
    body = requests.get(
        f"{cluster.nomad_address}/v1/allocation/{alloc_id}", headers=headers, timeout=10
    ).json()
    intervals, began = [], None
    for event in body["TaskStates"][task]["Events"]:
        if event["Time"] <= since_ns:
            continue
        if event["Type"] in ("Restart Signaled", "Restarting") and began is None:
            began = event["Time"]
        elif event["Type"] == "Started" and began is not None:
            intervals.append((began, event["Time"]))
            began = None
    return intervals


def test_a_rolling_restart_restarts_each_allocation_once_within_its_concurrency(cluster: Cluster) -> None:
    if cluster.job is None:
        pytest.skip(JOB_SKIP)
    concurrency = 2
    before = {a.id: a for a in cluster.nomad.job_allocations(cluster.job) if a.running}
    since_ns = int(cluster.clock.time() * 1e9)
    config = dataclasses.replace(
        cluster.config(min_healthy_time=2.0, healthy_deadline=300.0), concurrency=concurrency
    )

    result = RollingRestart(cluster.consul, cluster.nomad, config, clock=cluster.clock).run(
        cluster.job, RolloutOptions()
    )

    assert result.ok, result.to_dict()
    restarted = {o.target.alloc_id for o in result.restarted}
    assert restarted == set(before), f"restarted {sorted(restarted)}, running were {sorted(before)}"
    intervals = []
    for alloc_id, alloc in before.items():
        for task, state in alloc.task_states.items():
            now = cluster.nomad.allocation(alloc_id).task_states[task]
            if now.restarts == state.restarts:
                continue
            assert now.restarts == state.restarts + 1, (
                f"{alloc_id}/{task} restarted {now.restarts - state.restarts}x"
            )
            intervals += _restart_intervals(cluster, alloc_id, task, since_ns)
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert intervals and peak <= concurrency, f"{peak} tasks restarting at once, concurrency {concurrency}"
