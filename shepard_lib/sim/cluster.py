"""A whole simulated cluster (Consul + Nomad) from a scenario, as a context manager.

::

    with SimCluster.from_scenario("examples/scenarios/web-9.yaml", time_scale=20) as sim:
        nomad = nomad_client(sim.nomad_addr)
        sim.set_key("config/web", "v2")
        ...
        assert sim.peak_concurrency("web", "app", "server") <= 2

Both servers listen on loopback ports chosen by the OS. Every task is running and healthy when
``__enter__`` returns (unless ``settle=False``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from shepard_lib.clock import Clock
from shepard_lib.sim.consul import ConsulServer
from shepard_lib.sim.consul.faults import Faults as ConsulFaults
from shepard_lib.sim.consul.state import ConsulState
from shepard_lib.sim.nomad.api import NomadFaults, NomadServer
from shepard_lib.sim.nomad.restarts import RestartRecord
from shepard_lib.sim.nomad.sim import NomadSim
from shepard_lib.sim.scenario import Scenario, load_scenario

__all__ = ["SimCluster"]


class SimCluster:
    """Simulated Consul and Nomad sharing one :class:`Clock`, serving HTTP on loopback."""

    def __init__(
        self,
        scenario: Scenario,
        data_dir: str | Path | None = None,
        time_scale: float = 1.0,
        acl_token: str | None = None,
        clock: Clock | None = None,
        settle: bool = True,
        consul_port: int = 0,
        nomad_port: int = 0,
    ) -> None:
        self.scenario = scenario
        self.clock = clock or Clock(time_scale)
        self.acl_token = acl_token
        self.settle = settle
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="shepard-sim-")) if data_dir is None else Path(data_dir)
        self._agents: dict[str, NomadServer] = {}
        self._started = False
        try:  # a port in use fails here: leave no empty temp dir behind
            self.consul_state = ConsulState(self.clock, seed=scenario.seed)
            for key, value in scenario.keys.items():
                self.consul_state.kv_put(key, value.encode("utf-8"))
            self.consul_server = ConsulServer(
                self.consul_state, port=consul_port, acl_token=acl_token, seed=scenario.seed
            )
            try:
                self.nomad = NomadSim(scenario, self.consul_state, self.clock, self.data_dir)
                self.nomad_server = NomadServer(self.nomad, port=nomad_port, acl_token=acl_token)
            except BaseException:
                self.consul_server.stop()
                raise
        except BaseException:
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            raise

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario | Mapping[str, Any] | str | Path,
        data_dir: str | Path | None = None,
        time_scale: float = 1.0,
        acl_token: str | None = None,
        clock: Clock | None = None,
        settle: bool = True,
        consul_port: int = 0,
        nomad_port: int = 0,
    ) -> SimCluster:
        """A cluster for a :class:`Scenario`, a scenario dict, or a YAML file path (validated).

        ``clock`` (optional) is shared with the code under test; otherwise a ``Clock(time_scale)``.
        Ports 0 let the OS choose.
        """
        if not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario)
        return cls(scenario, data_dir, time_scale, acl_token, clock, settle, consul_port, nomad_port)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> SimCluster:
        """Start both servers, register nodes, place and start every allocation."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.consul_server.start()
        self.nomad_server.start()
        self._started = True
        try:
            host_port = self.nomad_addr.split("://", 1)[1]
            self.nomad.start(http_addr=host_port)
            if self.settle:
                self.wait_settled()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop everything; remove the data dir when the cluster created it."""
        if self._started:
            self._started = False
            for agent in self._agents.values():
                agent.stop()
            self.nomad.stop()
            self.nomad_server.stop()
            self.consul_server.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- addresses -------------------------------------------------------------------------------

    @property
    def consul_addr(self) -> str:
        """``http://127.0.0.1:<port>`` of the simulated Consul."""
        return str(self.consul_server.address)

    @property
    def nomad_addr(self) -> str:
        """``http://127.0.0.1:<port>`` of the simulated Nomad (its ``agent/self`` is the first node)."""
        return self.nomad_server.address

    def nomad_agent_addr(self, node: str) -> str:
        """Address of a Nomad API whose ``/v1/agent/self`` is the client agent on ``node``.

        Every such server serves the same cluster; only the local agent differs, as when a Shepard
        agent talks to the Nomad agent of its own node.
        """
        self.nomad.node(node)
        if node not in self._agents:
            agent = NomadServer(
                self.nomad, acl_token=self.acl_token, local_node=node, faults=self.nomad_server.faults
            )
            agent.start()
            self._agents[node] = agent
        return self._agents[node].address

    def node_data_dir(self, node: str) -> Path:
        """The Nomad data dir of ``node`` (allocations under ``alloc/<id>/``)."""
        self.nomad.node(node)
        return self.nomad.node_data_dir(node)

    # --- controls --------------------------------------------------------------------------------

    @property
    def consul_faults(self) -> ConsulFaults:
        """Fault knobs of the Consul server."""
        faults: ConsulFaults = self.consul_server.faults
        return faults

    @property
    def nomad_faults(self) -> NomadFaults:
        """Fault knobs of the Nomad servers."""
        return self.nomad_server.faults

    def set_key(self, key: str, value: str | bytes) -> None:
        """Write a Consul KV key (as an operator would)."""
        self.consul_state.kv_put(key, value.encode("utf-8") if isinstance(value, str) else value)

    def get_key(self, key: str) -> str | None:
        """A Consul KV value as text, or None when absent."""
        entry = self.consul_state.kv_get(key)
        return None if entry is None else entry.text()

    def wait_settled(self, timeout: float = 120.0) -> None:
        """Wait (``timeout`` cluster seconds) until every task is running with passing checks."""
        self.nomad.wait_settled(timeout)

    def wait_caught_up(self, timeout: float = 120.0) -> None:
        """Wait until the simulated clients have acted on every Consul KV write so far.

        Templates are re-rendered and the restarts and signals due by now are done, so a write that
        restarted nothing by then never will. ``timeout`` is in cluster seconds.
        """
        self.nomad.wait_caught_up(timeout)

    # --- the record ------------------------------------------------------------------------------

    def restarts(self) -> list[RestartRecord]:
        """Every task restart so far, oldest first."""
        return self.nomad.restarts()

    def peak_concurrency(
        self, job: str | None = None, group: str | None = None, task: str | None = None
    ) -> int:
        """Most restarts of the job/group/task active at one instant."""
        return self.nomad.peak_concurrency(job, group, task)

    def makespan(self, job: str | None = None, group: str | None = None, task: str | None = None) -> float:
        """Cluster seconds from the first stop to the last end of the matching restarts."""
        return self.nomad.makespan(job, group, task)
