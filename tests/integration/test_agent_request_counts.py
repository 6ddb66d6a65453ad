"""Consul requests of an agent-driven rollout, counted by the simulator: counts, never times.

Sim-only: the counts come from the simulated Consul's own counters by request shape
(``ConsulServer.requests.shapes()``, ``GET /_sim/requests?detail``). Four agents on four nodes
roll out one config change of twelve allocations at concurrency 2; docs/design.md section 5
(*Lanes*) and section 8 (*Coordination cost*) say where each request goes.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from agent_support import KEYS, SCALE, agents, complete, scenario, wait_plan, wait_until

import shepard_lib.recovery as recovery_module
from shepard_lib.agent.agent import HEARTBEAT_WAIT
from shepard_lib.errors import ConsulError
from shepard_lib.sim import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

ALLOCATIONS = 12
NODES = ["n1", "n2", "n3", "n4"]
CONCURRENCY = 2
REQUESTS_PER_RESTART = 11.5
"""Consul requests per restart, session renewals and the agents' heartbeat watches aside (they are a
cost per agent per minute, not per restart): measured 7.3-9.1 here with the gates on their node's
checks (8.6-10.0 before; about 3.5 health answers, the claim-and-trigger txn carrying the previous
member's finish and the read before it, the registrations and their reads, each lane's slot), and a
margin. benchmarks/RESULTS.md has the same breakdown at 24, 100 and 500 allocations."""

pytestmark = pytest.mark.usefixtures("no_client_env")


def _plan_writes(shapes: dict[str, int]) -> Counter[str]:
    """Accepted and refused txns that write the plan, by kind: claim (with a trigger), alone
    (a registration, or a finish that could not wait for a claim), with a release."""
    kinds: Counter[str] = Counter()
    for shape, n in shapes.items():
        if not shape.startswith("PUT /v1/txn [cas ") or "/task_lock" not in shape.split(",")[0]:
            continue
        ops = shape.split("[", 1)[1].rsplit("]", 1)[0].split(", ")
        if any(op.startswith("set ") for op in ops):
            kind = "claim"
        else:
            kind = "alone" if len(ops) == 1 else "release"
        kinds[f"{kind} {'ok' if shape.endswith(' 200') else 'refused'}"] += n
    return kinds


def test_an_agent_rollout_writes_the_plan_once_per_restart_and_reads_no_session(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(
        scenario(count=ALLOCATIONS, concurrency=CONCURRENCY, nodes=len(NODES)), time_scale=SCALE
    )
    with agents(sim, NODES) as running:
        assert sum(len(a.watched()) for a in running.values()) == ALLOCATIONS
        sim.consul_server.requests.reset()
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(ALLOCATIONS))
        shapes = sim.consul_server.requests.shapes()
    restarted = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert restarted == Counter(dict.fromkeys(plan.members, 1)) and len(restarted) == ALLOCATIONS
    assert sim.peak_concurrency("web", "app", "server") <= CONCURRENCY

    # Every holder of a restart in flight is an agent whose heartbeat its peers watch: no session read.
    assert not any(" /v1/session/info" in shape for shape in shapes), shapes
    writes = _plan_writes(shapes)
    # One accepted claim per restart, each carrying the previous member's finish of its lane; a lane's
    # last finish goes with its slot's release; writes alone are the registrations (gathered per
    # node) and a finish whose claim was refused. Before, every restart cost a claim and a finish,
    # and every change its own registration: at least 2 x 12 + 4 accepted writes.
    assert writes["claim ok"] == ALLOCATIONS, writes
    assert writes["alone ok"] >= 1, writes
    accepted = writes["claim ok"] + writes["alone ok"] + writes["release ok"]
    assert accepted <= 2 * ALLOCATIONS, f"{accepted} plan writes for {ALLOCATIONS} restarts: {writes}"

    # Every health wait follows its node's checks (the simulated Nomad and Consul name a node alike),
    # woken by that node's changes only, and starts with one fresh read of them; none follows the
    # service's checks (each of those was woken by every restart's changes).
    waits = shapes.get("GET /v1/health/node 200", 0)
    assert waits >= ALLOCATIONS and not _count_in(shapes, "/v1/health/checks"), shapes

    idle = sum(n for shape, n in shapes.items() if "/v1/session/renew" in shape or "/nodes/ ?" in shape)
    config_write = 1
    per_restart = (sum(shapes.values()) - idle - config_write) / ALLOCATIONS
    assert per_restart <= REQUESTS_PER_RESTART, (
        f"{per_restart:.2f} Consul requests per restart (limit {REQUESTS_PER_RESTART}): {writes}, {shapes}"
    )


def _count_in(shapes: dict[str, int], part: str) -> int:
    """Requests among ``shapes`` whose shape contains ``part``."""
    return sum(n for shape, n in shapes.items() if part in shape)


def _count(sim: SimCluster, part: str) -> int:
    """Consul requests since the last reset whose shape contains ``part``."""
    return _count_in(sim.consul_server.requests.shapes(), part)


def test_an_idle_agents_heartbeat_watch_waits_consuls_default_not_one_session_ttl(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Idle, an agent renews its session every TTL / 2; its watch on the heartbeats answers at once when
    one changes, so it waits Consul's default 5 minutes: none of its requests in three TTLs (it was one
    per TTL)."""
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    with agents(sim, ["n1"]) as running:
        assert running["n1"].config.session_ttl * 3 < HEARTBEAT_WAIT
        wait_until(sim, lambda: _count(sim, "/nodes/") >= 1, "the heartbeat watch's first answer")
        sim.consul_server.requests.reset()
        wait_until(sim, lambda: _count(sim, "/v1/session/renew") >= 6, "six renewals: three TTLs")
        shapes = sim.consul_server.requests.shapes()
    # Blocking answers only: a query after a failed one (index 0, under load) answers at once by design.
    assert not [shape for shape in shapes if "/nodes/" in shape and "?index" in shape], shapes


def test_after_a_failed_heartbeat_watch_no_heartbeat_is_trusted_until_it_answers_again(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view of the heartbeats is trusted until the watch's next answer or its wait has run out: a
    watch that failed has no view, so its agent reads the holders' sessions instead (a stale "alive"
    could only delay a takeover, but with a 5-minute wait it would delay it for minutes)."""
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=2), time_scale=SCALE)
    with agents(sim, ["n1", "n2"]) as running:
        n1, peer = running["n1"], running["n2"].session_id
        assert peer is not None
        alive = recovery_module._seen_alive(n1.consul)
        wait_until(sim, lambda: alive.until(peer) > sim.clock.monotonic(), "n1 sees n2's heartbeat")
        real_watch, failed = n1.consul.watch, threading.Event()

        def failing_watch(key: str, *args: Any, **kwargs: Any) -> Any:
            if key == KEYS.nodes_prefix():
                failed.set()
                raise ConsulError("kv.watch", "proxy said 502", status=502)
            return real_watch(key, *args, **kwargs)

        monkeypatch.setattr(n1.consul, "watch", failing_watch)
        sim.set_key(f"{KEYS.nodes_prefix()}elsewhere", "x")  # the watch in flight answers; the next fails
        wait_until(sim, failed.is_set, "n1's heartbeat watch failed")
        wait_until(sim, lambda: alive.until(peer) == 0.0, "n1 trusts no view after its watch failed")
        monkeypatch.setattr(n1.consul, "watch", real_watch)
        wait_until(sim, lambda: alive.until(peer) > sim.clock.monotonic(), "the watch answers again")
