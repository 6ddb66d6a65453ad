"""When ``Agent.stop`` returns, none of the threads the agent started is left running.

Found by the agent benchmarks (``benchmarks/_agent_host.py`` counts the threads left after the
stops): the discovery thread stayed in its Nomad blocking query, the heartbeat watcher in its
Consul one, and the session keeper in a wait of ``session_ttl / 2``. Now ``stop`` cancels the
blocking queries in flight (their sockets are shut down), wakes every wait, and joins the threads.

The sim runs at real time (scale 1) with waits of minutes: the discovery query waits 10 minutes, the
heartbeat query ``session_ttl`` (10 minutes), the keeper and the session renewals 5 minutes. A
thread that ended because its wait ran out could not have ended before ``stop`` returned (its joins
give up after ``agent.THREAD_JOIN``, 30 real seconds): the check right after ``stop`` needs no
luck. It needs a simulated node's allocation directories, so it runs on the sim only
(``test_agent_real.py`` covers an agent against a real cluster).
"""

from __future__ import annotations

import logging
import threading

import pytest
from agent_support import agent_config, scenario, wait_plan, wait_until
from prometheus_client.parser import text_string_to_metric_families

from shepard_lib.agent import Agent
from shepard_lib.agent import discovery as discovery_module
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.plan import MemberState
from shepard_lib.sim import SimCluster

LONG_WAIT = 600.0
"""Cluster (here real) seconds of every wait the agent's threads do: far beyond the joins' bound."""


def _started_since(before: set[threading.Thread]) -> list[str]:
    """The shepard threads (the agent's, its sessions', its periodic jobs') started since ``before``."""
    return sorted(
        t.name
        for t in threading.enumerate()
        if t not in before and t.is_alive() and t.name.startswith("shepard")
    )


def test_no_agent_thread_outlives_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle agent: stop ends every thread; nothing is logged (no "Nomad unreachable") even once the
    backends are closed and the cluster is gone, and no cancelled query counts as a failed call."""
    monkeypatch.setattr(discovery_module, "WAIT", LONG_WAIT)
    with SimCluster.from_scenario(scenario(count=2, nodes=1), time_scale=1.0) as sim:
        node = sim.scenario.nodes[0].name
        cfg = agent_config(sim, node, session_ttl=LONG_WAIT, metrics_address="127.0.0.1:0")
        consul, nomad = ConsulBackend(cfg.consul, sim.clock), NomadBackend(cfg.nomad, sim.clock)
        before = set(threading.enumerate())
        agent = Agent(cfg, consul, nomad, clock=sim.clock).start()
        try:
            assert len(agent.watched()) == 2, "start reports the node's allocations before it returns"
            running = _started_since(before)
            for expected in (
                "shepard-discovery",
                f"shepard-agent-session[{node}]",
                f"shepard-agent-heartbeats[{node}]",
                "shepard-metrics",
            ):
                assert expected in running, f"{expected} should run while the agent does: {running}"
            assert any(name.startswith("shepard-session-renew") for name in running), running
        finally:
            caplog.clear()
            caplog.set_level(logging.WARNING, logger="shepard_lib")
            agent.stop()
        left = _started_since(before)
        assert left == [], f"threads still running when Agent.stop returned: {left}"
        consul.close()
        nomad.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], f"logged after stop: {warnings}"
    errors = [
        (s.labels, s.value)
        for family in text_string_to_metric_families(agent.metrics.exposition().decode())
        for s in family.samples
        if s.name == "shepard_request_errors_total"
    ]
    assert errors == [], f"the cancelled queries were counted as failed calls: {errors}"


def test_no_thread_outlives_a_stop_with_a_restart_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent stops (``timeout=0``: no grace) while its worker waits for a restarted task to be
    healthy: the worker, its health watches (one blocking query per allocation and per service,
    15 s each at scale 1) and every other thread are gone when ``stop`` returns."""
    monkeypatch.setattr(discovery_module, "WAIT", LONG_WAIT)
    with SimCluster.from_scenario(scenario(count=2, nodes=1), time_scale=1.0) as sim:
        node = sim.scenario.nodes[0].name
        cfg = agent_config(sim, node, session_ttl=LONG_WAIT, min_healthy_time=LONG_WAIT, settle_time=0.5)
        consul, nomad = ConsulBackend(cfg.consul, sim.clock), NomadBackend(cfg.nomad, sim.clock)
        before = set(threading.enumerate())
        agent = Agent(cfg, consul, nomad, clock=sim.clock).start()
        try:
            sim.set_key("config/web", "v2")
            # Healthy only after min_healthy_time (10 minutes): the restart stays in flight.
            wait_plan(sim, lambda plan: bool(plan.in_state(MemberState.RESTARTING)), timeout=300)
            wait_until(
                sim,
                lambda: any(name.startswith("shepard-watch-") for name in _started_since(before)),
                "the health gate watches the restarted task",
            )
            running = _started_since(before)
            assert any(name.startswith("shepard-rollout[") for name in running), running
        finally:
            agent.stop(timeout=0)
        left = _started_since(before)
        assert left == [], f"threads still running when Agent.stop returned: {left}"
        consul.close()
        nomad.close()
