"""``/v1/agent/self`` as Consul returns it, where clients read it (python-consul2 reads leader_addr)."""

from __future__ import annotations

import pytest
from consul_contract import ConsulTarget


def test_a_server_agent_names_the_leader_in_its_stats_as_status_leader_does(
    consul_target: ConsulTarget,
) -> None:
    stats = consul_target.http("GET", "/v1/agent/self").json()["Stats"]["consul"]
    if stats.get("server") != "true":
        pytest.skip("the agent is a Consul client, whose stats name no leader")
    assert stats["leader"] in ("true", "false")
    assert stats["leader_addr"] == consul_target.client().status.leader()
    assert stats["leader_addr"], "a cluster with a leader names its address"
