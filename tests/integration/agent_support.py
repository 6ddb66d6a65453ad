"""Helpers for the agent tests: scenarios, per-node agent configs, waiting on plans over HTTP."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from shepard_lib.agent import Agent
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, ShepardConfig, default_config
from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.plan import Plan, PlanStatus
from shepard_lib.sim import SimCluster
from shepard_lib.sim.scenario import web_scenario

SCALE = 20.0
KEYS = Keyspace()
SCOPE = TaskScope("web", "app", "server")


def scenario(count: int = 9, concurrency: int | None = 1, nodes: int = 3) -> dict[str, Any]:
    """``count`` web allocations over ``nodes`` nodes; config/web rendered with change_mode noop;
    ``concurrency`` is the job's ``shepard_concurrency`` meta (None: the agents' ``concurrency``)."""
    return web_scenario(
        count=count, nodes=[f"n{i}" for i in range(1, nodes + 1)], concurrency=concurrency, seed=5
    )


def agent_config(sim: SimCluster, node: str, **changes: Any) -> ShepardConfig:
    """The config of the agent on ``node``: its local Nomad agent, its data dir, the sim's clock."""
    values: dict[str, Any] = {
        "consul": ConsulConfig(address=sim.consul_addr),
        "nomad": NomadConfig(address=sim.nomad_agent_addr(node)),
        "nomad_data_dir": str(sim.node_data_dir(node)),
        "time_scale": sim.clock.scale,
        "settle_time": 2.0,
        "min_healthy_time": 1.0,
        "healthy_deadline": 60.0,
        "session_ttl": 30.0,  # 1.5 s real at SCALE: no sub-second real TTL on a busy machine
        "lock_delay": 1.0,
    }
    values.update(changes)
    return dataclasses.replace(default_config(), **values)


def make_agent(sim: SimCluster, node: str, **changes: Any) -> Agent:
    """An (unstarted) agent for ``node`` on the sim's clock."""
    cfg = agent_config(sim, node, **changes)
    return Agent(
        cfg, ConsulBackend(cfg.consul, sim.clock), NomadBackend(cfg.nomad, sim.clock), clock=sim.clock
    )


@contextmanager
def agents(sim: SimCluster, nodes: list[str], **changes: Any) -> Iterator[dict[str, Agent]]:
    """Started agents for ``nodes``, stopped on exit."""
    with ExitStack() as stack:
        started = {}
        for node in nodes:
            started[node] = stack.enter_context(make_agent(sim, node, **changes))
        yield started


def read_plan(sim: SimCluster, scope: TaskScope = SCOPE, keys: Keyspace = KEYS) -> tuple[Plan | None, int]:
    """The plan of ``scope`` and the Consul index it was read at."""
    index = sim.consul_state.index  # first: a write after it wakes the next wait_for_change at once
    entry = sim.consul_state.kv_get(keys.task_lock_key(scope))
    return (Plan.decode(entry.value) if entry is not None else None), index


def wait_plan(
    sim: SimCluster,
    done: Any,
    timeout: float = 600.0,
    scope: TaskScope = SCOPE,
    keys: Keyspace = KEYS,
) -> Plan:
    """Block (on Consul's index, in cluster seconds) until ``done(plan)`` holds; fail after ``timeout``."""
    deadline = sim.clock.monotonic() + timeout
    while True:
        plan, index = read_plan(sim, scope, keys)
        if plan is not None and done(plan):
            return plan
        left = deadline - sim.clock.monotonic()
        assert left > 0, f"plan never reached the expected state; last: {plan and plan.to_json()}"
        sim.consul_state.wait_for_change(index, sim.clock.real(min(left, 5.0)))


def complete(members: int, generation: int = 1) -> Any:
    """``done`` for :func:`wait_plan`: the plan is complete with ``members`` members, at ``generation``
    or later (an agent registers the changes it has seen so far, so a plan may complete early)."""
    return lambda plan: (
        plan.status is PlanStatus.COMPLETE and plan.generation >= generation and len(plan.members) >= members
    )


def wait_until(sim: SimCluster, condition: Any, what: str, timeout: float = 300.0) -> None:
    """Wait (``timeout`` cluster seconds) until ``condition()`` holds; fail saying ``what``.

    Looks again at every Consul write (a blocking wait on the sim's index), and at least every
    half cluster second for what Consul does not see (files, processes, Nomad).
    """
    deadline = sim.clock.monotonic() + timeout
    while True:
        index = sim.consul_state.index
        if condition():
            return
        assert sim.clock.monotonic() < deadline, f"timed out waiting until {what}"
        sim.consul_state.wait_for_change(index, sim.clock.real(0.5))


def scrape(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The agent's ``/metrics`` over HTTP, parsed: ``{(sample name, sorted labels): value}``."""
    text = requests.get(f"http://{agent.metrics_address}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, have), value in samples.items()
        if sample == name and set(labels.items()) <= set(have)
    )
