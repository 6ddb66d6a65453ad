"""The agent benchmark on a tiny case: its machinery works and its counts tell the truth.

``benchmarks/bench_agents.py`` runs the simulator (``shepard sim serve --agents``) and the agents in
processes of their own; here one case (6 allocations on 2 nodes, c = 2) checks the invariants it
reports and the consistency of its figures. Timings are measured but never asserted. Like the demo,
the benchmarks only run on the simulator (they create the cluster they measure), so there is no
real-cluster variant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common as common  # noqa: E402
import bench_agents  # noqa: E402

N, C = 6, 2


@pytest.fixture(scope="module")
def result(monkeypatch_module: pytest.MonkeyPatch) -> dict[str, Any]:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "NOMAD_ADDR", "NOMAD_TOKEN"):
        monkeypatch_module.delenv(name, raising=False)
    return bench_agents.run_case(bench_agents.Case(N, C, "lognormal"), time_scale=20.0)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_tiny_agent_rollout_keeps_the_limit_and_restarts_each_allocation_once(result: dict[str, Any]) -> None:
    assert bench_agents.invariant_problems(result) == []
    assert 1 <= result["peak_concurrent_restarts"] <= C
    assert result["restarted"] == N and result["restarted_exactly_once"]


def test_tiny_agent_rollout_figures_are_consistent(result: dict[str, Any]) -> None:
    # The ideal is list scheduling of the same durations in the same order with no overhead: a lower
    # bound of the real schedule; batches of c on the same durations can never beat it either.
    assert result["makespan_s"] >= result["ideal_makespan_s"] - 0.01
    assert result["batch_makespan_s"] >= result["ideal_makespan_s"] - 0.01
    assert result["batches"] == -(-N // C)
    by_endpoint = result["consul_requests_by_endpoint"]
    assert by_endpoint.get("/v1/txn", {}).get("PUT", 0) >= N, "each trigger is a txn"
    assert result["consul_requests"] == common.consul_total(by_endpoint) - 1
    # Every request has one purpose (the operator's write of the key aside, the costs per agent per
    # minute and the protocol's add up to all of them), and each restart has one accepted claim.
    purposes = result["consul_requests_by_purpose"]
    assert sum(purposes.values()) == sum(result["consul_requests_by_shape"].values())
    assert purposes.get("txn claim + trigger") == N, purposes
    waiting = result["consul_requests_per_restart_waiting"]
    protocol = result["consul_requests_per_restart_protocol"]
    assert abs(waiting + protocol - (sum(purposes.values()) - 1) / N) < 0.02
