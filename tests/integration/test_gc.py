"""Garbage collection end to end over HTTP: each rule and each safety rule of docs/design.md section 6.

Tests taking ``cluster`` run against the simulator and, when ``CONSUL_HTTP_ADDR`` and ``NOMAD_ADDR``
are set, against that real cluster too (keys under a unique prefix, deleted afterwards; only keys
of nodes and jobs that cannot exist there are collected). The others use the simulator's controls
(node down, Nomad faults, its KV index and request counts) and are sim-only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from shepard_lib.backends import ConsulAPI
from shepard_lib.backends._http import NO_RETRY
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, ShepardConfig, default_config
from shepard_lib.errors import ConsulError
from shepard_lib.gc import GCReport, GCScope, Rule, SkipReason, collect_garbage
from shepard_lib.keyspace import Keyspace, TaskRef, TaskScope
from shepard_lib.model import KVEntry, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import MemberSpec, PlanSettings, claim, finish, new_plan, register
from shepard_lib.session import Session
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCALE = 20.0
REAL_SKIP = (
    "set CONSUL_HTTP_ADDR and NOMAD_ADDR (and CONSUL_HTTP_TOKEN / NOMAD_TOKEN) to run against a real cluster"
)


@dataclass
class Cluster:
    """A cluster to collect on: backends, a config with its own key prefix, and the sim when it is one."""

    consul: ConsulBackend
    nomad: NomadBackend
    clock: Clock
    cfg: ShepardConfig
    sim: SimCluster | None = None

    @property
    def keys(self) -> Keyspace:
        return Keyspace(self.cfg.key_prefix, self.cfg.lock_scope)

    def gc(self, consul: ConsulAPI | None = None, **kwargs: Any) -> GCReport:
        return collect_garbage(consul or self.consul, self.nomad, self.cfg, clock=self.clock, **kwargs)

    def ready_node(self) -> str:
        return next(n.name for n in self.nomad.list_nodes().items if n.status == "ready")

    def present(self) -> dict[str, int]:
        """Every key under the prefix with its ModifyIndex, but the GC leader lock (each pass writes it)."""
        leader = self.keys.gc_leader_key()
        return {
            e.key: e.modify_index for e in self.consul.get_tree(f"{self.cfg.key_prefix}/") if e.key != leader
        }


def _cluster(
    consul_cfg: ConsulConfig, nomad_cfg: NomadConfig, clock: Clock, prefix: str, **changes: Any
) -> Cluster:
    cfg = dataclasses.replace(
        default_config(), consul=consul_cfg, nomad=nomad_cfg, key_prefix=prefix, session_ttl=60.0, **changes
    )
    return Cluster(ConsulBackend(consul_cfg, clock), NomadBackend(nomad_cfg, clock), clock, cfg)


@pytest.fixture
def sim(sim_cluster_factory: SimClusterFactory, no_client_env: None) -> SimCluster:
    return sim_cluster_factory(time_scale=SCALE)  # nodes node-1..3, job web: app/server[0..2]


@pytest.fixture
def simc(sim: SimCluster) -> Iterator[Cluster]:
    """The simulator, with Shepard's default prefix (the one its tasks' templates read)."""
    made = _cluster(ConsulConfig(sim.consul_addr), NomadConfig(sim.nomad_addr), sim.clock, "shepard")
    made.sim = sim
    yield made
    made.consul.close()
    made.nomad.close()


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def cluster(request: pytest.FixtureRequest, sim_cluster_factory: SimClusterFactory) -> Iterator[Cluster]:
    """The simulator, or the real cluster named by CONSUL_HTTP_ADDR / NOMAD_ADDR (its own key prefix)."""
    prefix = f"shepard-gc-test-{uuid.uuid4().hex[:8]}"
    if request.param == "sim":
        request.getfixturevalue("no_client_env")  # only the sim variant: the real one reads them
        sim = sim_cluster_factory(time_scale=SCALE)
        made = _cluster(ConsulConfig(sim.consul_addr), NomadConfig(sim.nomad_addr), sim.clock, prefix)
        made.sim = sim
    else:
        if not os.environ.get("CONSUL_HTTP_ADDR") or not os.environ.get("NOMAD_ADDR"):
            pytest.skip(REAL_SKIP)
        from shepard_lib.config import load_config

        real = load_config(env=os.environ)
        made = _cluster(real.consul, real.nomad, Clock(), prefix)
    try:
        yield made
    finally:
        made.consul.delete(prefix, recurse=True)
        made.consul.close()
        made.nomad.close()


def plan_value(
    job: str, *, restarting: bool = False, complete_at: float | None = None, holder: str = "s"
) -> bytes:
    """An encoded plan of ``job``/app/server: a member restarting (held by session ``holder``), or
    complete at ``complete_at``."""
    now = complete_at or 1.0
    plan = new_plan(job, "app", "server", None, instance_count=1, settings=PlanSettings(), now=now)
    plan = register(plan, [MemberSpec("a1", "node-1", 0)], now=now)
    if restarting or complete_at is not None:
        plan = claim(
            plan,
            "a1",
            holder="h",
            session=holder,
            holder_name="t",
            restarts_before=0,
            started_before=None,
            now=now,
        )
    if complete_at is not None:
        plan = finish(plan, "a1", holder="h", ok=True, now=now)
    return plan.encode()


def by_rule(report: GCReport) -> dict[str, Rule]:
    return {d.key: d.rule for d in report.deleted}


def by_reason(report: GCReport) -> dict[str, SkipReason]:
    return {s.key: s.reason for s in report.skipped}


# --- on the simulator and on a real cluster ------------------------------------------------------


def test_stale_keys_go_by_rule_while_held_restarting_and_unknown_keys_stay(cluster: Cluster) -> None:
    ks, ghost, gone_job = cluster.keys, f"ghost-{uuid.uuid4().hex[:6]}", f"gone-{uuid.uuid4().hex[:6]}"
    ready = cluster.ready_node()
    gone_scope, held_scope = TaskScope(gone_job, "app", "server"), TaskScope(f"{gone_job}-b", "app", "server")
    orphan_scope = TaskScope(f"{gone_job}-c", "app", "server")  # a member restarting, its holder dead
    stale = {
        ks.trigger_key(TaskRef(ghost, "web", "app", "server", 0)): Rule.NODE_GONE,
        ks.node_key(ghost): Rule.NODE_GONE,
        ks.trigger_key(TaskRef(ready, gone_job, "app", "server", 0)): Rule.JOB_GONE,
        ks.task_lock_key(gone_scope): Rule.JOB_GONE,
        ks.slot_key(gone_scope, 0): Rule.JOB_GONE,
        ks.task_lock_key(orphan_scope): Rule.JOB_GONE,
        ks.slot_key(orphan_scope, 0): Rule.JOB_GONE,
    }
    with Session(cluster.consul, "gc test dead holder", ttl=60, clock=cluster.clock) as dead:
        assert cluster.consul.acquire(ks.slot_key(orphan_scope, 0), "dead holder", dead.id)
        dead_holder = dead.id
    for key in stale:
        if key == ks.task_lock_key(orphan_scope):
            cluster.consul.put(key, plan_value(orphan_scope.job, restarting=True, holder=dead_holder))
        elif key != ks.slot_key(orphan_scope, 0):
            cluster.consul.put(key, plan_value(gone_job) if key.endswith("task_lock") else b"x")
    unknown = f"{cluster.cfg.key_prefix}/operator-notes"
    cluster.consul.put(unknown, "keep me")
    with Session(cluster.consul, "gc test holder", ttl=60, clock=cluster.clock) as holder:
        cluster.consul.put(
            ks.task_lock_key(held_scope), plan_value(held_scope.job, restarting=True, holder=holder.id)
        )
        assert cluster.consul.acquire(ks.slot_key(held_scope, 0), "holder", holder.id)
        assert cluster.consul.acquire(ks.node_key(f"{ghost}-2"), "agent", holder.id)
        report = cluster.gc()
        left = cluster.present()
    assert report.ok, report.to_dict()
    assert by_rule(report) == stale
    assert by_reason(report) == {
        unknown: SkipReason.UNKNOWN_KEY,
        ks.task_lock_key(held_scope): SkipReason.PLAN_RESTARTING,
        ks.slot_key(held_scope, 0): SkipReason.PLAN_RESTARTING,
        ks.node_key(f"{ghost}-2"): SkipReason.HELD,
    }
    assert not set(stale) & set(left)
    assert {
        unknown,
        ks.task_lock_key(held_scope),
        ks.slot_key(held_scope, 0),
        ks.node_key(f"{ghost}-2"),
    } <= set(left)
    assert report.deleted_by_rule() == {"node_gone": 2, "job_gone": 5}
    assert report.skipped_by_reason() == {"unknown_key": 1, "plan_restarting": 2, "held": 1}


class RewriteAfterScan:
    """A Consul whose scan is followed, before any delete, by another writer's update of ``key``."""

    def __init__(self, consul: ConsulBackend, key: str) -> None:
        self._consul = consul
        self._key = key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consul, name)

    def get_tree(self, prefix: str, *, consistent: bool = False) -> list[KVEntry]:
        entries = self._consul.get_tree(prefix, consistent=consistent)
        self._consul.put(self._key, "written after the scan")
        return entries


def test_a_key_rewritten_between_scan_and_delete_survives_and_the_rest_go(cluster: Cluster) -> None:
    ks, ghost = cluster.keys, f"ghost-{uuid.uuid4().hex[:6]}"
    doomed = [ks.trigger_key(TaskRef(ghost, "web", "app", "server", i)) for i in range(5)]
    for key in doomed:
        cluster.consul.put(key, "old")
    report = cluster.gc(RewriteAfterScan(cluster.consul, doomed[2]))  # type: ignore[arg-type]
    assert report.ok, report.to_dict()
    assert by_reason(report) == {doomed[2]: SkipReason.CHANGED}
    assert set(by_rule(report)) == set(doomed) - {doomed[2]}
    entry = cluster.consul.get(doomed[2])
    assert entry is not None and entry.value == b"written after the scan"
    assert set(cluster.present()) & set(doomed) == {doomed[2]}


class DestroySessionBeforeTxn:
    """A Consul that destroys ``session`` (the GC leader lock's) just before sending txn number ``at``."""

    def __init__(self, consul: ConsulBackend, session: Session, at: int) -> None:
        self._consul = consul
        self._session = session
        self._at = at
        self.txns: list[list[TxnOp]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consul, name)

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        self.txns.append(list(ops))
        if len(self.txns) == self._at:  # Consul frees the lock; the pass has not noticed
            self._consul.session_destroy(self._session.id)
        return self._consul.txn(ops)


def test_a_pass_whose_leader_lock_is_lost_midway_deletes_nothing_after(cluster: Cluster) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    stale = _stale_triggers(cluster, 130, node=ghost)  # 63 + 63 + 4 deletes: three txns
    with Session(cluster.consul, "gc test leader", ttl=60, clock=cluster.clock) as session:
        consul = DestroySessionBeforeTxn(cluster.consul, session, at=2)
        report = cluster.gc(consul, session=session)  # type: ignore[arg-type]
    assert len(consul.txns) == 2, "nothing is sent after the refused txn"
    assert all(
        t[0].verb is TxnVerb.CHECK_SESSION and t[0].key == cluster.keys.gc_leader_key() for t in consul.txns
    )
    assert [len(t) for t in consul.txns] == [64, 64]
    first = {op.key for op in consul.txns[0][1:]}
    assert set(by_rule(report)) == first
    assert set(by_reason(report)) == set(stale) - first
    assert set(by_reason(report).values()) == {SkipReason.LOCK_LOST}
    assert set(stale) & set(cluster.present()) == set(stale) - first, "only the first txn's keys went"


def test_dry_run_reports_what_would_go_and_changes_nothing(cluster: Cluster) -> None:
    ks, ghost = cluster.keys, f"ghost-{uuid.uuid4().hex[:6]}"
    for i in range(3):
        cluster.consul.put(ks.trigger_key(TaskRef(ghost, "web", "app", "server", i)), "x")
    before = cluster.present()
    raft_before = cluster.sim.consul_state.index if cluster.sim else None
    report = cluster.gc(dry_run=True)
    assert report.ok and report.dry_run
    assert len(report.planned) == 3 and report.deleted == []
    assert report.deleted_by_rule() == {"node_gone": 3}
    assert cluster.present() == before
    if cluster.sim is not None:
        assert cluster.sim.consul_state.index == raft_before, "a dry run moved the sim's Consul index"


# --- sim-only: Nomad's answers, node status times, the sim's counters ----------------------------


def _stale_triggers(c: Cluster, n: int, node: str = "ghost") -> list[str]:
    keys = [c.keys.trigger_key(TaskRef(node, "web", "app", "server", i)) for i in range(n)]
    for key in keys:
        c.consul.put(key, "x")
    return keys


@pytest.mark.parametrize("scope", [GCScope.CLUSTER, GCScope.NODE])
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("error_500", "HTTP 500"),
        ("leader_lost", "No cluster leader"),
        ("known_leader_missing", "X-Nomad-KnownLeader is missing"),
        ("known_leader_false", "X-Nomad-KnownLeader is 'false'"),
        ("timeout", "no answer before the timeout"),
        ("unreachable", "cannot reach Nomad at http://127.0.0.1:9: connection refused"),
    ],
)
def test_nomad_that_cannot_be_asked_means_nothing_is_deleted(
    simc: Cluster, sim: SimCluster, fault: str, error: str, scope: GCScope
) -> None:
    node = "ghost" if scope is GCScope.CLUSTER else "node-1"
    keys = [k for k in _stale_triggers(simc, 3, node=node) if k not in _live_triggers(simc, sim)]
    assert keys, "some of the keys are stale"
    address = (
        "http://127.0.0.1:9" if fault == "unreachable" else simc.cfg.nomad.address
    )  # nothing listens on 9
    nomad = NomadBackend(
        dataclasses.replace(simc.cfg.nomad, address=address), simc.clock, retry=NO_RETRY, timeout=1.0
    )
    faults = sim.nomad_faults
    if fault == "error_500":
        faults.error_rate = 1.0
    elif fault == "leader_lost":
        faults.leader_lost = True
    elif fault == "known_leader_missing":
        faults.known_leader = None
    elif fault == "known_leader_false":
        faults.known_leader = "false"
    elif fault == "timeout":
        faults.latency = sim.clock.cluster(5.0)  # five real seconds: past the 1 s timeout
    try:
        before = simc.present()
        where = node if scope is GCScope.NODE else None
        report = collect_garbage(simc.consul, nomad, simc.cfg, scope=scope, node=where, clock=simc.clock)
    finally:
        faults.reset()
        nomad.close()
    assert not report.ok and report.error and error in report.error, report.to_dict()
    assert report.deleted == [] and report.planned == []
    assert simc.present() == before and set(keys) <= set(before)
    again = simc.gc(scope=scope, node=where)
    assert set(by_rule(again)) == set(keys), "once Nomad answers, the keys go"


def _live_triggers(c: Cluster, sim: SimCluster) -> set[str]:
    return {
        c.keys.trigger_key(TaskRef(a.node.name, "web", "app", "server", a.index))
        for a in sim.nomad.allocations("web")
    }


def test_node_down_less_than_the_timeout_keeps_its_keys_and_longer_loses_them(
    simc: Cluster, sim: SimCluster
) -> None:
    simc.cfg = dataclasses.replace(simc.cfg, node_cleanup_timeout=60.0)
    alloc = sim.nomad.allocation("web", "app", 2)
    node = alloc.node.name
    trigger = simc.keys.trigger_key(TaskRef(node, "web", "app", "server", 2))
    simc.consul.put(simc.keys.node_key(node), "agent was here")
    simc.consul.put(trigger, "x")
    sim.wait_settled()
    assert simc.gc().deleted == [], "a live allocation's trigger and a ready node's heartbeat stay"

    sim.nomad.set_node_down(node)
    down_at = sim.nomad.node(node).status_updated_at
    report = simc.gc()
    assert report.deleted == []
    assert by_reason(report) == {
        trigger: SkipReason.NODE_DOWN_RECENTLY,
        simc.keys.node_key(node): SkipReason.NODE_DOWN_RECENTLY,
    }

    # Nomad's Date header has whole seconds: wait until its clock is surely past the timeout.
    sim.clock.sleep(down_at + 62.0 - sim.clock.time())
    report = simc.gc()
    assert by_rule(report) == {trigger: Rule.NODE_DOWN, simc.keys.node_key(node): Rule.NODE_DOWN}


def test_stopped_and_purged_jobs_lose_their_triggers_plans_and_slots(simc: Cluster, sim: SimCluster) -> None:
    ks, scope = simc.keys, TaskScope("web", "app", "server")
    triggers = [
        ks.trigger_key(TaskRef(a.node.name, "web", "app", "server", a.index))
        for a in sim.nomad.allocations("web")
    ]
    for key in triggers:
        simc.consul.put(key, "x")
    simc.consul.put(ks.task_lock_key(scope), plan_value("web"))
    simc.consul.put(ks.slot_key(scope, 0), "")
    sim.wait_settled()
    assert simc.gc().deleted == [], "a running job keeps its keys"

    sim.nomad.purge_job("web")
    report = simc.gc()
    assert by_rule(report) == {
        k: Rule.JOB_GONE for k in [*triggers, ks.task_lock_key(scope), ks.slot_key(scope, 0)]
    }


def test_live_trigger_keys_are_never_deleted_by_either_pass(simc: Cluster, sim: SimCluster) -> None:
    live = [(a.node.name, a.index) for a in sim.nomad.allocations("web")]
    for node, index in live:
        simc.consul.put(simc.keys.trigger_key(TaskRef(node, "web", "app", "server", index)), "x")
    stale = simc.keys.trigger_key(TaskRef("node-1", "web", "app", "server", 7))
    simc.consul.put(stale, "x")
    sim.wait_settled()
    before = simc.present()
    node_report = simc.gc(scope=GCScope.NODE, node="node-1")
    assert by_rule(node_report) == {stale: Rule.ALLOC_GONE}
    cluster_report = simc.gc()
    assert cluster_report.deleted == []
    assert simc.present() == {k: v for k, v in before.items() if k != stale}


def test_the_node_pass_defaults_to_the_local_nomad_agents_node(simc: Cluster, sim: SimCluster) -> None:
    stale = _stale_triggers(simc, 2, node="node-2")  # indexes 0 and 1 of web; node-2 runs web[1]
    nomad = NomadBackend(NomadConfig(sim.nomad_agent_addr("node-2")), simc.clock)
    try:
        report = collect_garbage(simc.consul, nomad, simc.cfg, scope="node", clock=simc.clock)
    finally:
        nomad.close()
    live = {
        simc.keys.trigger_key(TaskRef("node-2", "web", "app", "server", a.index))
        for a in sim.nomad.allocations("web")
        if a.node.name == "node-2"
    }
    assert report.node == "node-2"
    assert set(by_rule(report)) == set(stale) - live
    assert live & set(stale) <= set(simc.present())


class CountingConsul:
    """A Consul that counts the calls of each kind and can hold the first txn until released."""

    def __init__(self, consul: ConsulBackend, hold_first_txn: threading.Event | None = None) -> None:
        self._consul = consul
        self.calls: dict[str, int] = {}
        self.in_txn = threading.Event()
        self._hold = hold_first_txn

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._consul, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args, **kwargs)

        return counted

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        self.calls["txn"] = self.calls.get("txn", 0) + 1
        if self._hold is not None:
            self.in_txn.set()
            assert self._hold.wait(30), "the other GC pass did not finish"
            self._hold = None
        return self._consul.txn(ops)


def test_two_gc_runs_at_once_do_the_work_once_without_errors(simc: Cluster) -> None:
    keys = _stale_triggers(simc, 150)
    release = threading.Event()
    first = CountingConsul(simc.consul, hold_first_txn=release)
    reports: dict[str, GCReport] = {}
    runner = threading.Thread(target=lambda: reports.setdefault("first", simc.gc(first)), daemon=True)
    runner.start()
    assert first.in_txn.wait(30), "the first pass never reached its deletes"
    reports["second"] = simc.gc(name="second agent")  # while the first holds the leader lock
    release.set()
    runner.join(30)
    assert not runner.is_alive()
    first_report, second = reports["first"], reports["second"]
    assert first_report.ok and second.ok, (first_report.to_dict(), second.to_dict())
    assert by_reason(second) == {"": SkipReason.NOT_LEADER} and second.deleted == []
    assert sorted(by_rule(first_report)) == sorted(keys)
    assert not set(keys) & set(simc.present())
    third = simc.gc(name="third agent")  # the lock is free again: a pass runs and finds nothing
    assert third.ok and third.deleted == [] and third.skipped == []


def test_one_pass_reads_each_source_once_and_deletes_63_keys_per_request(
    simc: Cluster, sim: SimCluster
) -> None:
    _stale_triggers(simc, 300)
    sim.consul_server.requests.reset()
    before = sim.nomad.request_counts()
    report = simc.gc()
    assert report.deleted_by_rule() == {"node_gone": 300}
    consul = sim.consul_server.requests.snapshot()
    assert consul["/v1/txn"] == {"PUT": 5}  # ceil(300 / 63): each txn is 63 deletes and the leader fence
    kv = consul["/v1/kv"]
    assert kv.get("GET") == 1, kv  # the one ?recurse scan
    assert kv.get("PUT") == 2, kv  # the leader lock: acquire and release
    nomad = {k: v - before.get(k, 0) for k, v in sim.nomad.request_counts().items() if v != before.get(k, 0)}
    assert nomad == {"GET /v1/nodes": 1, "GET /v1/jobs": 1, "GET /v1/allocations": 1}


# --- the command ------------------------------------------------------------------------------------


@pytest.fixture
def config_file(
    sim: SimCluster, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> str:
    """A config for the sim; the logging handlers ``shepard`` installs are removed afterwards."""
    monkeypatch.delenv("SHEPARD_CONFIG_PATH", raising=False)
    path = tmp_path / "shepard.yaml"
    path.write_text(
        f"consul: {{address: '{sim.consul_addr}'}}\nnomad: {{address: '{sim.nomad_addr}'}}\n"
        f"session_ttl: 10s\ntime_scale: {SCALE}\n",
        encoding="utf-8",
    )
    return str(path)


def test_cli_dry_run_then_run_print_by_rule_and_exit_0(
    simc: Cluster, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from shepard_lib.cli import main

    keys = _stale_triggers(simc, 2)
    simc.consul.put("shepard/notes", "x")
    assert main(["--config", config_file, "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gc cluster pass (dry run): 3 key(s) scanned, would delete 2, skipped 1, failed 0" in out
    assert f"would delete (node_gone): 2\n    {keys[0]}: node ghost is not in Nomad" in out
    assert "skipped (unknown_key): 1\n    shepard/notes" in out
    assert set(keys) <= set(simc.present())

    assert main(["--config", config_file, "gc", "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["deleted_by_rule"] == {"node_gone": 2}
    assert result["skipped_by_reason"] == {"unknown_key": 1}
    assert sorted(d["key"] for d in result["deleted"]["node_gone"]) == sorted(keys)
    assert not set(keys) & set(simc.present())

    stale = simc.keys.trigger_key(TaskRef("node-1", "web", "app", "server", 5))
    simc.consul.put(stale, "x")
    assert (
        main(["--config", config_file, "gc", "--scope", "node", "--node", "node-1", "--output", "json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert (result["scope"], result["node"], result["deleted_by_rule"]) == (
        "node",
        "node-1",
        {"alloc_gone": 1},
    )


def test_cli_exits_1_when_nomad_cannot_be_asked_and_2_on_usage_errors(
    simc: Cluster, sim: SimCluster, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from shepard_lib.cli import main

    _stale_triggers(simc, 1)
    sim.nomad_faults.known_leader = None
    try:
        assert main(["--config", config_file, "gc", "--scope", "cluster"]) == 1
    finally:
        sim.nomad_faults.reset()
    assert "stopped, nothing more deleted" in capsys.readouterr().out
    assert main(["--config", config_file, "gc", "--scope", "everything"]) == 2
    assert main(["--config", config_file, "gc", "--node", "node-1"]) == 2
    assert "--node names the node of --scope node" in capsys.readouterr().err
    assert main(["--config", config_file + ".missing", "gc"]) == 2


def test_gc_passes_during_a_rollout_never_restart_a_task_nor_touch_its_plan(
    simc: Cluster, sim: SimCluster
) -> None:
    from shepard_lib.rollout import RollingRestart, RolloutOptions

    stale = _stale_triggers(simc, 5)
    cfg = dataclasses.replace(simc.cfg, lock_delay=2.0, min_healthy_time=2.0, healthy_deadline=30.0)
    done = threading.Event()
    reports: list[GCReport] = []

    def collect_until_done() -> None:
        while True:  # bounded by the rollout, which ends by its healthy_deadline
            reports.append(simc.gc())
            reports.append(simc.gc(scope=GCScope.NODE, node="node-1"))
            if done.is_set():
                return
            sim.clock.sleep(0.5)

    collector = threading.Thread(target=collect_until_done, daemon=True)
    collector.start()
    try:
        result = RollingRestart(simc.consul, simc.nomad, cfg, clock=simc.clock).run("web", RolloutOptions())
    finally:
        done.set()
        collector.join(30)
    assert result.ok, result.to_dict()
    restarted = [(r.alloc_id, r.task) for r in sim.restarts()]
    assert sorted(restarted) == sorted((a.id, "server") for a in sim.nomad.allocations("web")), (
        "each allocation restarted exactly once: no GC delete re-rendered a live trigger"
    )
    assert reports and all(r.ok for r in reports), [r.to_dict() for r in reports if not r.ok]
    deleted = {d.key for r in reports for d in r.deleted}
    assert deleted == set(stale)
    live = {
        simc.keys.trigger_key(TaskRef(a.node.name, "web", "app", "server", a.index))
        for a in sim.nomad.allocations("web")
    }
    assert live <= set(simc.present()), "the rollout's trigger keys are all still there"
    assert simc.keys.task_lock_key(TaskScope("web", "app", "server")) in simc.present()


class LoseTxnAnswers(RewriteAfterScan):
    """After the scan another writer updates ``key``; the answers of the first ``lost`` txns are lost."""

    def __init__(self, consul: ConsulBackend, key: str, lost: int) -> None:
        super().__init__(consul, key)
        self.lost = lost
        self.txns = 0

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        self.txns += 1
        result = self._consul.txn(ops)  # applied by Consul...
        if self.txns <= self.lost:
            raise ConsulError("txn", "read timed out")  # ...but the answer never arrives
        return result


def test_lost_txn_answers_are_retried_without_ever_deleting_a_rewritten_key(simc: Cluster) -> None:
    stale = _stale_triggers(simc, 130)  # three transactions
    rewritten = stale[70]
    consul = LoseTxnAnswers(simc.consul, rewritten, lost=2)
    report = simc.gc(consul)  # type: ignore[arg-type]
    assert report.ok, report.to_dict()
    assert consul.txns == 6, "batch 1 sent three times, batch 2 twice (without the changed key), batch 3 once"
    assert by_reason(report) == {rewritten: SkipReason.CHANGED}
    assert {d.key for d in report.deleted} == set(stale) - {rewritten}
    entry = simc.consul.get(rewritten)
    assert entry is not None and entry.value == b"written after the scan"
    assert set(stale) & set(simc.present()) == {rewritten}
