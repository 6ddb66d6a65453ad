"""The allocations of this node, from Nomad: where the log shipper learns what to ship."""

from __future__ import annotations

import dataclasses

from shepard_lib.backends import NomadAPI
from shepard_lib.errors import ConfigError, NomadError, NotFound
from shepard_lib.model import Allocation, NodeInfo

__all__ = ["NodeAllocations"]


class NodeAllocations:
    """Callable source of the allocations Nomad placed on one node (running or finished).

    The node is ``node_name`` when given (the config's ``node_name``), else the local agent's
    (``GET /v1/agent/self``); it is looked up once, by :meth:`resolve` or the first call.
    """

    def __init__(self, nomad: NomadAPI, node_name: str | None = None) -> None:
        self._nomad = nomad
        self._node_name = node_name
        self._node: NodeInfo | None = None

    def resolve(self) -> NodeInfo:
        """This node, looked up in Nomad (ConfigError or NomadError when it is no client node)."""
        if self._node is None:
            if self._node_name:
                node = next((n for n in self._nomad.nodes() if n.name == self._node_name), None)
                if node is None:
                    raise ConfigError(f"node_name: {self._node_name!r} is not a Nomad client node")
            else:
                agent = self._nomad.agent_self()
                if not agent.node_id:
                    reason = f"the local agent {agent.node_name} runs no client; set node_name"
                    raise NomadError("agent.self", reason)
                try:
                    node = self._nomad.node(agent.node_id)
                except NotFound:
                    raise NomadError(f"node {agent.node_id}", "unknown to Nomad; set node_name") from None
            self._node = node
        return self._node

    @property
    def datacenter(self) -> str:
        """The node's datacenter."""
        return self.resolve().datacenter

    def __call__(self) -> list[Allocation]:
        """The allocations on the node now (named after the node where Nomad leaves the name out)."""
        node = self.resolve()
        return [
            a if a.node_name else dataclasses.replace(a, node_name=node.name)
            for a in self._nomad.node_allocations(node.id)
        ]
