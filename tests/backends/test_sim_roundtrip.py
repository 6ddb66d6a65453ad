"""Every method of ConsulAPI and NomadAPI, over HTTP, against the simulated cluster (sim-only).

The backends are typed as the Protocols here, so mypy checks that they implement them exactly.
The cluster runs with an ACL token: every call must carry it in the header.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.backends._http import NO_RETRY
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig
from shepard_lib.errors import ConsulError, NotFound
from shepard_lib.model import CheckStatus, SessionBehavior, TxnOp, TxnVerb

try:
    from shepard_lib.sim.cluster import SimCluster
except ImportError as exc:  # the simulator is written in parallel with the backends
    pytest.skip(f"the simulated cluster is not importable yet: {exc}", allow_module_level=True)

TOKEN = "sim-acl-token-0000"
SCALE = 20.0
SCENARIO = {
    "seed": 7,
    "nodes": ["n1", "n2"],
    "jobs": [
        {
            "name": "web",
            "groups": [
                {
                    "name": "app",
                    "count": 2,
                    "tasks": [{"name": "server", "shepard": True, "service": "web"}],
                }
            ],
        }
    ],
    "timing": {"restart": "1s", "healthy_after": "0.5s"},
    "keys": {"config/web": "v1"},
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimCluster]:
    with SimCluster.from_scenario(SCENARIO, time_scale=SCALE, acl_token=TOKEN) as sim:
        yield sim


@pytest.fixture
def consul(cluster: SimCluster) -> Iterator[ConsulAPI]:
    backend = ConsulBackend(ConsulConfig(address=cluster.consul_addr, token=TOKEN), cluster.clock)
    yield backend
    backend.close()


@pytest.fixture
def nomad(cluster: SimCluster) -> Iterator[NomadAPI]:
    backend = NomadBackend(NomadConfig(address=cluster.nomad_addr, token=TOKEN), cluster.clock)
    yield backend
    backend.close()


# --- Consul -------------------------------------------------------------------------------------


def test_kv_put_get_keys_and_delete(consul: ConsulAPI) -> None:
    assert consul.put("rt/kv/a", b"\x00bin") is True
    assert consul.put("rt/kv/dir/b", "two", flags=5) is True
    entry = consul.get("rt/kv/a", consistent=True)
    assert entry is not None and entry.value == b"\x00bin"
    assert [(e.key, e.flags) for e in consul.get_tree("rt/kv/")] == [("rt/kv/a", 0), ("rt/kv/dir/b", 5)]
    assert consul.keys("rt/kv/", separator="/") == ["rt/kv/a", "rt/kv/dir/"]
    assert consul.delete("rt/kv/", recurse=True) is True
    assert consul.get("rt/kv/a") is None and consul.get_tree("rt/kv/") == [] and consul.keys("rt/kv/") == []


def test_kv_cas_writes_only_at_the_expected_index(consul: ConsulAPI) -> None:
    assert consul.put("rt/cas", "first", cas=0) is True
    assert consul.put("rt/cas", "again", cas=0) is False, "cas=0 writes only an absent key"
    entry = consul.get("rt/cas")
    assert entry is not None
    assert consul.put("rt/cas", "stale", cas=entry.modify_index - 1) is False
    assert consul.put("rt/cas", "second", cas=entry.modify_index) is True
    assert consul.delete("rt/cas", cas=entry.modify_index) is False
    fresh = consul.get("rt/cas")
    assert fresh is not None and fresh.text() == "second"
    assert consul.delete("rt/cas", cas=fresh.modify_index) is True


def test_sessions_locks_and_txn_fencing(consul: ConsulAPI) -> None:
    mine = consul.session_create("rt holder", 15, lock_delay=0, node="n1", node_checks=[])
    other = consul.session_create("rt other", 15, behavior=SessionBehavior.DELETE, lock_delay=0, node="n2")
    try:
        info = consul.session_info(mine)
        assert info is not None and (info.name, info.node, info.ttl, info.lock_delay) == (
            "rt holder",
            "n1",
            15.0,
            0.0,
        )
        assert consul.session_renew(mine) is True

        assert consul.acquire("rt/slot/0", "holder=n1", mine) is True
        assert consul.acquire("rt/slot/0", "holder=n2", other) is False
        held = consul.get("rt/slot/0")
        assert held is not None and held.session == mine and held.text() == "holder=n1"

        fenced = [
            TxnOp(TxnVerb.CHECK_SESSION, "rt/slot/0", session=mine),
            TxnOp(TxnVerb.SET, "rt/trigger", b"t1"),
        ]
        result = consul.txn(fenced)
        assert result.ok, result.errors
        trigger = consul.get("rt/trigger")
        assert trigger is not None and trigger.value == b"t1"
        stale = [
            TxnOp(TxnVerb.CHECK_SESSION, "rt/slot/0", session=other),
            TxnOp(TxnVerb.SET, "rt/trigger", b"t2"),
        ]
        rolled_back = consul.txn(stale)
        assert not rolled_back.ok and rolled_back.errors and rolled_back.errors[0][0] == 0
        still = consul.get("rt/trigger")
        assert still is not None and still.value == b"t1", "a rolled-back txn writes nothing"

        assert consul.release("rt/slot/0", mine, "free") is True
        released = consul.get("rt/slot/0")
        assert released is not None and released.session is None and released.text() == "free"
    finally:
        consul.session_destroy(mine)
        consul.session_destroy(other)
        consul.session_destroy(other)  # idempotent
        consul.delete("rt/", recurse=True)
    assert consul.session_info(mine) is None
    assert consul.session_renew(mine) is False


def test_acquire_with_an_unknown_session_is_an_error_not_retried(consul: ConsulAPI) -> None:
    with pytest.raises(ConsulError) as err:
        consul.acquire("rt/bad", "v", "00000000-0000-0000-0000-000000000000")
    assert err.value.status == 500 and not err.value.transient and TOKEN not in str(err.value)


def test_watch_returns_on_change_and_after_the_wait(consul: ConsulAPI, cluster: SimCluster) -> None:
    consul.put("rt/watch", "v0")
    index, entries = consul.watch("rt/watch", 0, 5)
    assert [e.text() for e in entries] == ["v0"]
    writer = threading.Timer(cluster.clock.real(1.0), lambda: cluster.set_key("rt/watch", "v1"))
    writer.start()
    try:
        new_index, entries = consul.watch("rt/watch", index, 30)
    finally:
        writer.join()
    assert new_index > index and [e.text() for e in entries] == ["v1"]
    started = cluster.clock.monotonic()
    same_index, _ = consul.watch("rt/watch", new_index, 2)
    assert same_index == new_index
    assert cluster.clock.monotonic() - started >= 1.9, "an idle blocking query waits its full wait"
    consul.delete("rt/watch")


def test_health_checks_of_service_and_node(consul: ConsulAPI) -> None:
    index, checks = consul.service_checks("web")
    assert index > 0 and len(checks) == 2
    assert {c.status for c in checks} == {CheckStatus.PASSING} and {c.service_name for c in checks} == {"web"}
    node_index, node_checks = consul.node_checks("n1")
    assert node_index > 0 and "serfHealth" in {c.check_id for c in node_checks}


def test_agent_node_name_is_a_registered_node(consul: ConsulAPI) -> None:
    name = consul.agent_node_name()
    assert name, "the simulated agent names its node"
    assert "serfHealth" in {c.check_id for c in consul.node_checks(name)[1]}


def test_a_wrong_token_is_refused_without_showing_it(cluster: SimCluster) -> None:
    config = ConsulConfig(address=cluster.consul_addr, token="wrong-t0ken")
    backend = ConsulBackend(config, cluster.clock, retry=NO_RETRY)
    with pytest.raises(ConsulError) as err:
        backend.put("rt/x", "v")
    assert err.value.status == 403 and "wrong-t0ken" not in str(err.value)
    backend.close()


# --- Nomad --------------------------------------------------------------------------------------


def test_jobs_job_and_allocations(nomad: NomadAPI) -> None:
    assert nomad.jobs() == ["web"]
    job = nomad.job("web")
    group = job.group("app")
    assert group is not None and group.count == 2
    task = group.task("server")
    assert task is not None and "local/shepard.tpl" in {t.dest_path for t in task.templates}
    allocs = nomad.job_allocations("web")
    assert sorted(a.index for a in allocs) == [0, 1]
    assert all(a.running and a.task_states["server"].state == "running" for a in allocs)
    one = nomad.allocation(allocs[0].id)
    assert (one.id, one.job_id, one.task_group, one.index) == (allocs[0].id, "web", "app", allocs[0].index)
    assert one.task_states["server"].started_at is not None
    with pytest.raises(NotFound):
        nomad.job("nope")
    with pytest.raises(NotFound):
        nomad.allocation("00000000-0000-0000-0000-000000000000")


def test_nodes_node_and_node_allocations(nomad: NomadAPI) -> None:
    nodes = nomad.nodes()
    assert sorted(n.name for n in nodes) == ["n1", "n2"] and all(n.status == "ready" for n in nodes)
    n1 = next(n for n in nodes if n.name == "n1")
    assert nomad.node(n1.id).name == "n1"
    assert {a.node_name for a in nomad.node_allocations(n1.id)} == {"n1"}
    with pytest.raises(NotFound):
        nomad.node("00000000-0000-0000-0000-000000000000")


def test_agent_self_names_a_simulated_node(nomad: NomadAPI) -> None:
    agent = nomad.agent_self()
    assert agent.node_name in {"n1", "n2"} and agent.datacenter


def test_restart_task_restarts_that_task_and_watch_sees_it(nomad: NomadAPI, cluster: SimCluster) -> None:
    alloc = nomad.job_allocations("web")[0]
    before = nomad.allocation(alloc.id)
    restarts_before = before.task_states["server"].restarts
    nomad.restart_task(alloc.id, "server")
    index, seen = before.modify_index, before
    deadline = cluster.clock.monotonic() + 30
    while seen.task_states["server"].restarts == restarts_before and cluster.clock.monotonic() < deadline:
        index, seen = nomad.watch_allocation(alloc.id, index, 5)
    assert seen.task_states["server"].restarts == restarts_before + 1
    assert seen.task_states["server"].last_restart is not None
    assert [(r.alloc_id, r.task) for r in cluster.restarts()][-1:] == [(alloc.id, "server")]
    cluster.wait_settled()


def test_watch_node_allocations_blocks_until_one_of_the_nodes_allocations_changes(
    nomad: NomadAPI, cluster: SimCluster
) -> None:
    n1 = next(n for n in nomad.nodes() if n.name == "n1")
    index, allocs = nomad.watch_node_allocations(n1.id, 0, 5)
    assert index > 0 and allocs and {a.node_name for a in allocs} == {"n1"}
    target = allocs[0]
    cluster.nomad.restart(target.id, "server")
    new_index, seen = nomad.watch_node_allocations(n1.id, index, 30)
    assert new_index > index
    assert {a.id for a in seen} == {a.id for a in allocs}
    cluster.wait_settled()
