"""Requests per restart of a small rollout, counted by the simulator: counts, never times.

Sim-only: the counts come from the simulated Consul's and Nomad's own request counters. Session
renewals are counted apart: how many there are depends on how long the rollout takes (one per
session every TTL/2), not on the protocol.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, default_config
from shepard_lib.rollout import RollingRestart, RolloutOptions
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.sim.scenario import web_scenario

SCALE = 10.0
ALLOCATIONS = 8
CONSUL_LIMITS = {1: 7.5, 4: 9.0}
"""Consul requests per restart (session renewals aside) a rollout may cost at each concurrency: today's
counts (7.1 at c = 1, 7.6-8.5 at c = 4, where the health answers vary with the interleaving: the
claim-and-trigger txn, the finish txn, about 4 health answers,
and, spread over the 8 restarts, each worker's slot lock and release and its session's create and
destroy) and a small margin, so a regression fails. Issue 10's targets: 8 at c = 1, 10 at any c, renewals
included; see benchmarks/RESULTS.md."""
NOMAD_LIMIT = 7.0
"""Nomad requests per restart: the allocation reads before the trigger, and its watch."""

pytestmark = pytest.mark.usefixtures("no_client_env")


def scenario() -> dict[str, Any]:
    return web_scenario(
        count=ALLOCATIONS,
        nodes=["node-1", "node-2", "node-3"],
        seed=3,
        healthy_after="1s",
        unhealthy_if_broken=False,
    )


@pytest.mark.parametrize("concurrency", sorted(CONSUL_LIMITS))
def test_a_rollout_costs_at_most_the_target_requests_per_restart(
    sim_cluster_factory: SimClusterFactory, concurrency: int, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(), time_scale=SCALE)
    cfg = replace(
        default_config(),
        consul=ConsulConfig(address=sim.consul_addr),
        nomad=NomadConfig(address=sim.nomad_addr),
        session_ttl=20.0,  # 2 real seconds: no session is lost to a busy machine
        lock_delay=2.0,
        min_healthy_time=1.0,
        healthy_deadline=30.0,
    )
    consul, nomad = ConsulBackend(cfg.consul, sim.clock), NomadBackend(cfg.nomad, sim.clock)
    sim.consul_server.requests.reset()
    nomad_before = sim.nomad.request_counts()
    try:
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
            result = RollingRestart(consul, nomad, cfg, clock=sim.clock).run(
                "web", RolloutOptions(concurrency=concurrency)
            )
    finally:
        consul.close()
        nomad.close()
    assert result.ok, result.to_dict()
    assert len(result.restarted) == ALLOCATIONS
    counts = sim.consul_server.requests.snapshot()
    renewals = sum(counts.pop("/v1/session/renew", {}).values())
    consul_total = sum(n for methods in counts.values() for n in methods.values())
    nomad_total = sum(n - nomad_before.get(k, 0) for k, n in sim.nomad.request_counts().items())
    per_restart = consul_total / ALLOCATIONS
    assert per_restart <= CONSUL_LIMITS[concurrency], (
        f"{per_restart:.2f} Consul requests per restart at concurrency {concurrency} "
        f"(limit {CONSUL_LIMITS[concurrency]}; {renewals} renewals aside): {counts}"
    )
    assert "Connection pool is full" not in caplog.text, "a connection was opened and thrown away"
    assert nomad_total / ALLOCATIONS <= NOMAD_LIMIT, (
        f"{nomad_total} Nomad requests for {ALLOCATIONS} restarts"
    )
