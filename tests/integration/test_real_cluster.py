"""The coordination core end to end, against the simulator and against a real Consul + Nomad.

Each test takes ``cluster``, parametrised ``["sim", "real"]`` (the real variant is marked
``real_cluster``). The real variant runs when ``CONSUL_HTTP_ADDR`` and ``NOMAD_ADDR`` are set (with
``CONSUL_HTTP_TOKEN`` / ``NOMAD_TOKEN`` under ACLs). The rolling-restart tests also need
``SHEPARD_TEST_JOB``, a throwaway job whose tasks render ``local/shepard.tpl`` (see
``shepard template``) and which may be restarted; the ``consul_key`` variant needs
``SHEPARD_TEST_PREFIX`` too, the key prefix that job's templates read (a prefix used by nothing else:
everything the test writes under it is deleted afterwards, except the job's trigger keys, whose
deletion would restart its tasks once more). Nothing here reads the simulator's own record:
restarts are counted from Nomad's task states and events and health from Consul's checks, so both
variants check the same thing the same way. Every other key goes under a unique prefix, deleted
afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
from shepard_lib.model import CheckStatus
from shepard_lib.rollout import RollingRestart, RolloutOptions, is_shepard_managed
from shepard_lib.session import Session
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.trigger import Trigger

REAL_SKIP = (
    "set CONSUL_HTTP_ADDR and NOMAD_ADDR (and CONSUL_HTTP_TOKEN / NOMAD_TOKEN) to run against a real cluster"
)
JOB_SKIP = (
    "set SHEPARD_TEST_JOB to a job whose tasks render local/shepard.tpl to run the rollout on a real cluster"
)
PREFIX_SKIP = (
    "set SHEPARD_TEST_PREFIX to the key prefix the templates of SHEPARD_TEST_JOB read "
    "to run the consul_key rollout on a real cluster"
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
    """A key prefix unique to this test, deleted afterwards."""
    job: str | None
    job_prefix: str | None
    """The key prefix the templates of ``job`` read (the trigger keys), deleted afterwards."""
    consul_config: ConsulConfig
    nomad_config: NomadConfig

    def config(self, key_prefix: str, **changes: float) -> ShepardConfig:
        """Shepard's config for this cluster, writing under ``key_prefix``."""
        return dataclasses.replace(
            default_config(),
            consul=self.consul_config,
            nomad=self.nomad_config,
            key_prefix=key_prefix,
            **changes,
        )


def _make(
    kind: str,
    consul_cfg: ConsulConfig,
    nomad_cfg: NomadConfig,
    clock: Clock,
    job: str | None,
    job_prefix: str | None,
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
        job_prefix,
        consul_cfg,
        nomad_cfg,
    )


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def cluster(
    request: pytest.FixtureRequest, sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    """The simulator, or the real cluster named by CONSUL_HTTP_ADDR / NOMAD_ADDR."""
    if request.param == "sim":
        sim = sim_cluster_factory()
        consul_cfg, nomad_cfg = ConsulConfig(sim.consul_addr), NomadConfig(sim.nomad_addr)
        made = _make("sim", consul_cfg, nomad_cfg, sim.clock, "web", "shepard")
    else:
        consul_addr, nomad_addr = os.environ.get("CONSUL_HTTP_ADDR"), os.environ.get("NOMAD_ADDR")
        if not consul_addr or not nomad_addr:
            pytest.skip(REAL_SKIP)
        from shepard_lib.config import load_config

        cfg = load_config(env=os.environ)
        made = _make(
            "real",
            cfg.consul,
            cfg.nomad,
            Clock(),
            os.environ.get("SHEPARD_TEST_JOB"),
            os.environ.get("SHEPARD_TEST_PREFIX"),
        )
    try:
        yield made
    finally:
        made.consul.delete(made.prefix + "/", recurse=True)
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


@dataclass
class _Flight:
    """One allocation's task as the watcher saw it: when its restart and its health were first seen."""

    restarted_seen: float | None = None
    healthy_seen: float | None = None


class RestartWatcher:
    """Follows a job's allocations (Nomad) and its services' checks (Consul) with blocking queries.

    Independent of Shepard: a task is *in flight* from the first answer showing it restarted
    (its ``Restarts`` grew) until the first answer showing it running again with every check of
    its services passing for this allocation. All times are this process's clock, so intervals
    compare without trusting two hosts' clocks. ``peak`` is the most tasks in flight at once.
    """

    def __init__(self, cluster: Cluster, job: str, tasks: dict[str, tuple[str, ...]]) -> None:
        self._cluster = cluster
        self._job = job
        self._tasks = tasks  # task name -> its Consul service names
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._allocs: dict[str, dict] = {}
        self._checks: dict[str, list] = {s: [] for names in tasks.values() for s in names}
        self.baseline: dict[tuple[str, str], int] = {}
        self.flights: dict[tuple[str, str], _Flight] = {}
        self.peak = 0
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, allocs: list[dict]) -> None:
        """Start watching ``allocs`` (allocation stubs): their restart counts now are the baseline."""
        for alloc in allocs:
            for task in self._tasks:
                self.baseline[(alloc["ID"], task)] = alloc["TaskStates"][task]["Restarts"]
        self._threads = [threading.Thread(target=self._guard, args=(self._follow_allocations,), daemon=True)]
        self._threads += [
            threading.Thread(target=self._guard, args=(lambda s=s: self._follow_checks(s),), daemon=True)
            for s in self._checks
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _guard(self, follow: Callable[[], None]) -> None:
        try:
            follow()
        except BaseException as exc:  # reported by the test: a thread's exception would otherwise vanish
            self.errors.append(exc)

    def _follow_allocations(self) -> None:
        headers = {"X-Nomad-Token": self._cluster.nomad_token} if self._cluster.nomad_token else {}
        index = 0
        while not self._stop.is_set():
            resp = requests.get(
                f"{self._cluster.nomad_address}/v1/job/{self._job}/allocations",
                params={"index": index, "wait": "2s"},
                headers=headers,
                timeout=30,
            )
            resp.raise_for_status()
            index = int(resp.headers["X-Nomad-Index"])
            with self._cond:
                self._allocs = {a["ID"]: a for a in resp.json()}
                self._judge()

    def _follow_checks(self, service: str) -> None:
        index = 0
        while not self._stop.is_set():
            index, checks = self._cluster.consul.service_checks(service, index, 2.0)
            with self._cond:
                self._checks[service] = checks
                self._judge()

    def _judge(self) -> None:
        now = time.monotonic()
        for (alloc_id, task), restarts in self.baseline.items():
            state = (self._allocs.get(alloc_id) or {}).get("TaskStates", {}).get(task)
            if state is None or state["Restarts"] <= restarts:
                continue
            flight = self.flights.setdefault((alloc_id, task), _Flight())
            if flight.healthy_seen is not None:
                continue
            if self._healthy(alloc_id, task, state):
                flight.healthy_seen = now
                flight.restarted_seen = flight.restarted_seen or now  # restart and health seen at once
            elif flight.restarted_seen is None:
                flight.restarted_seen = now
        in_flight = sum(1 for f in self.flights.values() if f.restarted_seen and f.healthy_seen is None)
        self.peak = max(self.peak, in_flight)

    def _healthy(self, alloc_id: str, task: str, state: dict) -> bool:
        if state["State"] != "running":
            return False
        for service in self._tasks[task]:
            mine = [c for c in self._checks[service] if alloc_id in c.service_id]
            if not mine or any(c.status is not CheckStatus.PASSING for c in mine):
                return False
        return True


def _task_events(cluster: Cluster, alloc_id: str) -> dict[str, list[dict]]:
    headers = {"X-Nomad-Token": cluster.nomad_token} if cluster.nomad_token else {}
    resp = requests.get(f"{cluster.nomad_address}/v1/allocation/{alloc_id}", headers=headers, timeout=30)
    resp.raise_for_status()
    return {task: state["Events"] or [] for task, state in resp.json()["TaskStates"].items()}


def _events_since(before: list[dict], after: list[dict]) -> list[dict]:
    """The events of ``after`` that came after the last event of ``before`` (matched by identity, not time).

    Nomad keeps the last 10 events of a task: if the old last event is gone, more than that happened.
    """
    if not before:
        return after
    last = before[-1]
    for i in range(len(after) - 1, -1, -1):
        if after[i] == last:
            return after[i + 1 :]
    raise AssertionError(f"more than {len(after)} events since the baseline: {[e['Type'] for e in after]}")


def _delete_all_but_trigger_keys(cluster: Cluster, prefix: str) -> None:
    """Delete every key under ``prefix`` except the trigger keys (``<prefix>/keys/``).

    The job's templates read its trigger keys with ``keyOrDefault``: deleting one re-renders the
    template and restarts the task once more. They are the throwaway job's own state and stay.
    """
    keep = Keyspace(prefix).keys_prefix()
    for key in cluster.consul.keys(prefix + "/"):
        if not key.startswith(keep):
            cluster.consul.delete(key)


@pytest.mark.parametrize("method", [RestartMethod.CONSUL_KEY, RestartMethod.NOMAD_API])
def test_a_rolling_restart_restarts_each_allocation_once_within_its_concurrency(
    cluster: Cluster, method: RestartMethod
) -> None:
    if cluster.job is None:
        pytest.skip(JOB_SKIP)
    if method is RestartMethod.CONSUL_KEY and cluster.job_prefix is None:
        pytest.skip(PREFIX_SKIP)
    # consul_key must write where the job's templates read; nomad_api keeps to the test's own prefix.
    prefix = cluster.job_prefix if method is RestartMethod.CONSUL_KEY else cluster.prefix
    assert prefix is not None
    concurrency, min_healthy_time = 2, 2.0
    job = cluster.nomad.job(cluster.job)
    # consul_key restarts the tasks that render local/shepard.tpl; nomad_api can restart any task.
    managed = {
        t.name: t.services + g.services
        for g in job.groups
        for t in g.tasks
        if method is RestartMethod.NOMAD_API or is_shepard_managed(t)
    }
    siblings = {t.name for g in job.groups for t in g.tasks} - set(managed)
    assert managed, f"job {cluster.job} has no task that renders local/shepard.tpl"
    running = [a for a in cluster.nomad.job_allocations(cluster.job) if a.running]
    before = {a.id: _task_events(cluster, a.id) for a in running}
    watcher = RestartWatcher(cluster, cluster.job, managed)
    headers = {"X-Nomad-Token": cluster.nomad_token} if cluster.nomad_token else {}
    stubs = requests.get(
        f"{cluster.nomad_address}/v1/job/{cluster.job}/allocations", headers=headers, timeout=30
    ).json()
    watcher.start([s for s in stubs if s["ID"] in before])
    config = dataclasses.replace(
        cluster.config(prefix, min_healthy_time=min_healthy_time, healthy_deadline=300.0),
        concurrency=concurrency,
        restart_method=method,
    )
    try:
        result = RollingRestart(cluster.consul, cluster.nomad, config, clock=cluster.clock).run(
            cluster.job, RolloutOptions()
        )
        watcher_deadline = time.monotonic() + 60
        while len([f for f in watcher.flights.values() if f.healthy_seen]) < len(watcher.baseline):
            assert time.monotonic() < watcher_deadline and not watcher.errors, (
                f"the watcher did not see every task healthy again: {watcher.flights} {watcher.errors}"
            )
            time.sleep(0.05)
    finally:
        watcher.stop()
        _delete_all_but_trigger_keys(cluster, prefix)

    assert result.ok, result.to_dict()
    assert not watcher.errors, watcher.errors
    for alloc_id, events in before.items():
        after = _task_events(cluster, alloc_id)
        for task in managed:
            new = [e["Type"] for e in _events_since(events.get(task, []), after[task])]
            assert new.count("Restart Signaled") == 1, f"{alloc_id}/{task}: events since the rollout {new}"
        for task in siblings:
            new = [e["Type"] for e in _events_since(events.get(task, []), after[task])]
            assert "Restart Signaled" not in new, f"{alloc_id}/{task} (not managed) restarted: {new}"
    assert set(watcher.flights) == set(watcher.baseline), "a task's restart was never seen"
    assert 1 <= watcher.peak <= concurrency, (
        f"{watcher.peak} tasks between restart signal and healthy at once, concurrency {concurrency}"
    )
