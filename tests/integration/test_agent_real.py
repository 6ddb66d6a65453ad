"""The agent on a real Nomad client node (skipped unless a real cluster and the node's data dir are given).

Set ``CONSUL_HTTP_ADDR`` and ``NOMAD_ADDR`` (with ``CONSUL_HTTP_TOKEN`` / ``NOMAD_TOKEN`` under ACLs)
to the local agents of a Nomad client, and ``SHEPARD_TEST_NOMAD_DATA_DIR`` to that client's
``data_dir`` (readable by the test). The agent then starts with a key prefix of its own, must watch
exactly the managed tasks of the node's running allocations, be ready, and release its heartbeat
and session when stopped. It restarts nothing. The end-to-end restart tests are sim-only: they need
every node's data dir on one machine.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from shepard_lib.agent import Agent
from shepard_lib.agent.discovery import managed_tasks
from shepard_lib.agent.watcher import TaskKey
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import load_config

REAL = all(os.environ.get(v) for v in ("CONSUL_HTTP_ADDR", "NOMAD_ADDR", "SHEPARD_TEST_NOMAD_DATA_DIR"))
REAL_SKIP = (
    "set CONSUL_HTTP_ADDR, NOMAD_ADDR (and tokens) and SHEPARD_TEST_NOMAD_DATA_DIR (the local client's "
    "data_dir) to run the agent against a real Nomad client"
)


@pytest.mark.skipif(not REAL, reason=REAL_SKIP)
def test_agent_on_a_real_client_watches_exactly_its_managed_tasks() -> None:
    data_dir = os.environ["SHEPARD_TEST_NOMAD_DATA_DIR"]
    prefix = f"shepard-test-{uuid.uuid4().hex[:8]}"
    cfg = load_config(overrides={"nomad_data_dir": data_dir, "key_prefix": prefix})
    consul, nomad = ConsulBackend(cfg.consul), NomadBackend(cfg.nomad)
    try:
        with Agent(cfg, consul, nomad) as agent:
            allocs = nomad.node_allocations(agent.node_id)
            expected = {TaskKey(a.id, t) for a in allocs for t in managed_tasks(a, Path(data_dir))}
            assert agent.watched() == expected
            assert agent.ready()
            heartbeat = consul.get(agent.keyspace.node_key(agent.node_name))
            assert heartbeat is not None and heartbeat.session == agent.session_id
            session = agent.session_id
        assert session is not None and consul.session_info(session) is None, "the session was destroyed"
    finally:
        consul.delete(prefix + "/", recurse=True)
        consul.close()
        nomad.close()
