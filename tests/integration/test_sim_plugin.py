"""The ``shepard_sim`` pytest plugin's fixtures."""

from __future__ import annotations

from typing import Any

import requests

from shepard_lib.sim import SimCluster


def test_sim_cluster_is_the_small_scenario_settled(sim_cluster: SimCluster) -> None:
    allocs = requests.get(f"{sim_cluster.nomad_addr}/v1/job/web/allocations", timeout=10).json()
    assert sorted(a["Name"] for a in allocs) == ["web.app[0]", "web.app[1]", "web.app[2]"]
    assert sim_cluster.nomad.unsettled() == []
    assert sim_cluster.get_key("config/web") == "v1"


def test_factory_builds_clusters_and_closes_them_at_teardown(sim_cluster_factory: Any) -> None:
    first = sim_cluster_factory({"nodes": 1}, time_scale=10)
    second = sim_cluster_factory()
    assert first.nomad_addr != second.nomad_addr
    assert first.clock.scale == 10 and second.clock.scale == 20
    assert requests.get(f"{first.nomad_addr}/v1/nodes", timeout=10).json()[0]["Name"] == "node-1"
