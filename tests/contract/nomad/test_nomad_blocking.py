"""Blocking queries: ``?index=&wait=`` and the ``X-Nomad-*`` headers."""

from __future__ import annotations

import random
import threading
import time

import pytest
from nomad_contract import SIM_SCALE, NomadTarget

from shepard_lib.sim.blocking import NOMAD_WAIT, blocking_wait


def test_reads_carry_index_and_leader_headers(nomad_target: NomadTarget) -> None:
    for path in ("/v1/nodes", "/v1/jobs", "/v1/allocations"):
        resp = nomad_target.get(path)
        assert resp.status_code == 200
        assert int(resp.headers["X-Nomad-Index"]) >= 1
        assert resp.headers["X-Nomad-KnownLeader"] == "true"
        assert int(resp.headers["X-Nomad-LastContact"]) >= 0


def test_blocking_query_returns_after_wait_when_nothing_changes(nomad_target: NomadTarget) -> None:
    scale = SIM_SCALE if nomad_target.kind == "sim" else 1.0
    first = nomad_target.get("/v1/nodes")
    index = first.headers["X-Nomad-Index"]
    started = time.monotonic()
    again = nomad_target.get("/v1/nodes", index=index, wait="2s")
    elapsed = time.monotonic() - started
    assert again.status_code == 200
    assert again.headers["X-Nomad-Index"] == index
    # Nomad adds up to wait/16 of jitter; 5 real seconds tell "answered" from "hung" on a busy machine.
    assert 2 / scale * 0.9 <= elapsed < (2 + 2 / 16) / scale + 5.0


def test_blocking_query_on_allocation_wakes_when_it_restarts(sim_target: NomadTarget) -> None:
    """Sim only: the wake-up is caused by a restart."""
    alloc = next(a for a in sim_target.client.job.get_allocations("web") if a["Name"] == "web.app[0]")
    first = sim_target.get(f"/v1/allocation/{alloc['ID']}")
    index = int(first.headers["X-Nomad-Index"])
    assert index == first.json()["ModifyIndex"]
    timer = threading.Timer(0.1, lambda: sim_target.cluster().nomad.restart(alloc["ID"], "server"))
    timer.start()
    started = time.monotonic()
    woke = sim_target.get(f"/v1/allocation/{alloc['ID']}", index=index, wait="10m")  # 12 real seconds
    timer.join()
    assert time.monotonic() - started < 10, "the blocking query should wake on the change, not time out"
    assert int(woke.headers["X-Nomad-Index"]) > index
    assert woke.json()["TaskStates"]["server"]["Restarts"] == 1


def test_blocking_list_wakes_on_any_allocation_change(sim_target: NomadTarget) -> None:
    """Sim only: the allocation list's index is the allocs table index."""
    resp = sim_target.get("/v1/allocations")
    index = int(resp.headers["X-Nomad-Index"])
    alloc_id = resp.json()[0]["ID"]
    threading.Timer(0.1, lambda: sim_target.cluster().nomad.restart(alloc_id)).start()
    woke = sim_target.get("/v1/allocations", index=index, wait="5m")
    assert int(woke.headers["X-Nomad-Index"]) > index


def test_bad_index_or_wait_is_a_bad_request_with_nomads_text(nomad_target: NomadTarget) -> None:
    for params, text in (
        ({"index": "abc"}, "Invalid index"),
        ({"index": "-1"}, "Invalid index"),
        ({"index": "5", "wait": "soon"}, "Invalid wait time"),
        ({"wait": "soon"}, "Invalid wait time"),
    ):
        resp = nomad_target.get("/v1/nodes", **params)
        assert (resp.status_code, resp.text) == (400, text), params


def test_sim_wait_rule_defaults_caps_at_five_minutes_and_jitters(sim_target: NomadTarget) -> None:
    """A test of the sim, not of Nomad: the sim's copy of ``blockingRPC``'s rule in nomad/rpc.go
    (default and maximum 300 s, stagger up to wait/16), read from its own constants. What a client
    sees over HTTP (sim and real) is ``test_blocking_query_returns_after_wait_when_nothing_changes``."""
    assert (NOMAD_WAIT.default, NOMAD_WAIT.maximum, NOMAD_WAIT.jitter_fraction) == (300.0, 300.0, 16)
    rng = random.Random(3)
    for wait, base in ((0.0, 300.0), (30.0, 30.0), (600.0, 300.0), (3600.0, 300.0)):
        samples = [blocking_wait(wait, NOMAD_WAIT, rng) for _ in range(200)]
        assert all(base <= s <= base * (1 + 1 / 16) for s in samples), wait
        assert max(samples) > base


def test_sim_wait_staggers_come_from_the_scenario_seed_not_the_global_random(
    sim_target: NomadTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test of the sim: the timeouts it blocks for are drawn from ``Random(scenario seed + 1)``."""
    sim = sim_target.cluster()
    timeouts: list[float] = []
    state = sim.nomad.state
    monkeypatch.setattr(state, "wait_past", lambda _current, _index, timeout: timeouts.append(timeout))

    def unseeded(*args: object) -> float:
        raise AssertionError("the unseeded global random was used")

    monkeypatch.setattr(random, "uniform", unseeded)
    index = sim_target.get("/v1/nodes").headers["X-Nomad-Index"]
    for _ in range(3):
        assert sim_target.get("/v1/nodes", index=index, wait="60s").status_code == 200
    rng = random.Random(sim.nomad.scenario.seed + 1)
    assert timeouts == [sim.nomad.clock.real(blocking_wait(60.0, NOMAD_WAIT, rng)) for _ in range(3)]


def test_node_allocations_index_follows_only_that_nodes_allocations(sim_target: NomadTarget) -> None:
    """Sim only: a change on another node does not wake a node's allocation query."""
    sim = sim_target.cluster()
    n1, n2 = sim.nomad.node("n1"), sim.nomad.node("n2")
    resp = sim_target.get(f"/v1/node/{n1.id}/allocations")
    index = int(resp.headers["X-Nomad-Index"])
    assert index == max(a["ModifyIndex"] for a in resp.json())
    other = next(a for a in sim.nomad.allocations("web") if a.node is n2)
    threading.Timer(0.05, lambda: sim.nomad.restart(other.id)).start()
    unchanged = sim_target.get(f"/v1/node/{n1.id}/allocations", index=index, wait="10s")
    assert int(unchanged.headers["X-Nomad-Index"]) == index
    mine = next(a for a in sim.nomad.allocations("web") if a.node is n1)
    threading.Timer(0.05, lambda: sim.nomad.restart(mine.id)).start()
    woke = sim_target.get(f"/v1/node/{n1.id}/allocations", index=index, wait="5m")
    assert int(woke.headers["X-Nomad-Index"]) > index
