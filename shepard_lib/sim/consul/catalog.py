"""The catalog of the simulated Consul: nodes, services and health checks.

Records and their JSON follow ``agent/structs`` (``Node``, ``NodeService``, ``HealthCheck``,
``CheckServiceNode``) and the examples of the ``health`` and ``catalog`` API docs. Indexes follow
the state store: the ``nodes``, ``services`` and ``checks`` tables each keep their own, and every
service name keeps a ``service.<name>`` index bumped when an instance, one of its checks, or a
check of its node changes (``maxIndexForService``). The sim also keeps, per node, the index of the
last change of its checks (not an index Consul reports: what versions the memoised answers of
``/v1/health/node/<n>``, so a change elsewhere does not rebuild them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from shepard_lib.model import CheckStatus

T = TypeVar("T")

SERF_CHECK_ID = "serfHealth"


@dataclass(frozen=True)
class Node:
    """A catalog node."""

    name: str
    address: str
    id: str
    datacenter: str
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, object]:
        """``structs.Node`` as the catalog and health endpoints show it."""
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self.address,
                "lan_ipv4": self.address,
                "wan": self.address,
                "wan_ipv4": self.address,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(frozen=True)
class Service:
    """A service instance registered on a node."""

    node: str
    id: str
    name: str
    tags: tuple[str, ...]
    port: int
    address: str
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, object]:
        """``structs.NodeService`` as ``/v1/health/service`` shows it."""
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": None,
            "Port": self.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(frozen=True)
class Check:
    """A health check of a node (empty ``service_id``) or of a service instance."""

    node: str
    check_id: str
    name: str
    status: CheckStatus
    output: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    check_type: str
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, object]:
        """``structs.HealthCheck`` as the health endpoints show it."""
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": str(self.status),
            "Notes": "",
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.check_type,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Catalog:
    """Nodes, services and checks with their table indexes."""

    datacenter: str = "dc1"
    nodes: dict[str, Node] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)  # by service ID
    checks: dict[tuple[str, str], Check] = field(default_factory=dict)  # by (node, check ID)
    nodes_index: int = 0
    services_index: int = 0
    checks_index: int = 0
    service_index: dict[str, int] = field(default_factory=dict)  # by service name
    node_checks_index: dict[str, int] = field(default_factory=dict)  # by node: its checks' last change
    _answers: dict[tuple[object, ...], tuple[int, Any]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def memo(self, key: tuple[object, ...], version: int, build: Callable[[], T]) -> T:
        """``build()``, reused (the same object) under ``key`` while ``version`` stays; only the
        latest answer per key is kept. ``version`` must move whenever the answer may change (an
        index of the data ``build`` reads: :attr:`service_index`, :attr:`node_checks_index`)."""
        hit = self._answers.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = build()
        self._answers[key] = (version, value)
        return value

    # --- writes -----------------------------------------------------------------------------

    def register_node(self, idx: int, name: str, address: str, node_id: str) -> bool:
        """Add (or re-address) a node and its passing serfHealth check; False when unchanged."""
        existing = self.nodes.get(name)
        if existing is not None and existing.address == address:
            return False
        created = existing.create_index if existing else idx
        node_id = existing.id if existing else node_id
        self.nodes[name] = Node(name, address, node_id, self.datacenter, created, idx)
        self.nodes_index = idx
        if (name, SERF_CHECK_ID) not in self.checks:
            serf = Check(
                node=name,
                check_id=SERF_CHECK_ID,
                name="Serf Health Status",
                status=CheckStatus.PASSING,
                output="Agent alive and reachable",
                service_id="",
                service_name="",
                service_tags=(),
                check_type="",
                create_index=idx,
                modify_index=idx,
            )
            self.put_check(idx, serf)
        self._touch_node_services(idx, name)
        return True

    def register_service(self, idx: int, service: Service) -> None:
        """Add or replace a service instance (keeps CreateIndex on re-registration)."""
        old = self.services.get(service.id)
        if old is not None:
            service = replace(service, create_index=old.create_index)
            if old.name != service.name:
                self.service_index[old.name] = idx
        self.services[service.id] = service
        self.services_index = idx
        self.service_index[service.name] = idx

    def deregister_service(self, idx: int, service_id: str) -> list[Check]:
        """Remove a service instance and its checks; returns the removed checks."""
        service = self.services.pop(service_id, None)
        if service is None:
            return []
        self.services_index = idx
        self.service_index[service.name] = idx
        gone = [c for c in self.checks.values() if c.node == service.node and c.service_id == service_id]
        for check in gone:
            del self.checks[(check.node, check.check_id)]
        if gone:
            self.checks_index = idx
            self.node_checks_index[service.node] = idx
        return gone

    def remove_node(self, idx: int, name: str) -> None:
        """Remove a node and its remaining (node-level) checks; deregister its services first."""
        doomed = [k for k in self.checks if k[0] == name]
        for key in doomed:
            del self.checks[key]
        if doomed:
            self.checks_index = idx
            self.node_checks_index[name] = idx
        if self.nodes.pop(name, None) is not None:
            self.nodes_index = idx

    def put_check(self, idx: int, check: Check) -> None:
        """Add or replace a check (keeps CreateIndex; ModifyIndex moves only on a change)."""
        key = (check.node, check.check_id)
        old = self.checks.get(key)
        if old is not None:
            if (old.status, old.output, old.name, old.service_id) == (
                check.status,
                check.output,
                check.name,
                check.service_id,
            ):
                return
            check = replace(check, create_index=old.create_index)
        self.checks[key] = replace(check, modify_index=idx)
        self.checks_index = idx
        self.node_checks_index[check.node] = idx
        if check.service_id:
            service = self.services.get(check.service_id)
            if service is not None:
                self.service_index[service.name] = idx
        else:
            self._touch_node_services(idx, check.node)

    # --- reads ------------------------------------------------------------------------------

    def find_checks(self, check_id: str, node: str | None = None) -> list[Check]:
        """Checks with this ID (on ``node`` when given)."""
        return [c for (n, cid), c in self.checks.items() if cid == check_id and (node is None or n == node)]

    def node_checks(self, node: str) -> list[Check]:
        """Every check of a node, node-level first (``/v1/health/node``), ordered by check ID."""
        return sorted(
            (c for c in self.checks.values() if c.node == node),
            key=lambda c: (c.service_id != "", c.check_id),
        )

    def service_checks(self, name: str) -> list[Check]:
        """The checks of every instance of service ``name`` (``/v1/health/checks``)."""
        ids = {s.id: s.node for s in self.services.values() if s.name == name}
        return sorted(
            (c for c in self.checks.values() if c.service_id in ids and ids[c.service_id] == c.node),
            key=lambda c: (c.node, c.check_id),
        )

    def instances(self, name: str) -> list[tuple[Node, Service, list[Check]]]:
        """``CheckServiceNodes``: each instance with its node and all checks that apply to it."""
        out = []
        for service in sorted(self.services.values(), key=lambda s: (s.node, s.id)):
            if service.name != name or service.node not in self.nodes:
                continue
            checks = [c for c in self.node_checks(service.node) if c.service_id in ("", service.id)]
            out.append((self.nodes[service.node], service, checks))
        return out

    def index_for_service(self, name: str) -> int:
        """The index ``/v1/health/service/<name>`` reports."""
        return self.service_index.get(name) or max(self.services_index, self.nodes_index)

    def service_tags(self) -> dict[str, list[str]]:
        """``/v1/catalog/services``: every service name with the union of its tags."""
        out: dict[str, set[str]] = {}
        for service in self.services.values():
            out.setdefault(service.name, set()).update(service.tags)
        return {name: sorted(tags) for name, tags in sorted(out.items())}

    # --- internals --------------------------------------------------------------------------

    def _touch_node_services(self, idx: int, node: str) -> None:
        for service in self.services.values():
            if service.node == node:
                self.service_index[service.name] = idx
