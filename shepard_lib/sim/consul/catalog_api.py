"""Health, catalog, agent and status endpoints.

Shapes follow the ``health``, ``catalog``, ``agent`` and ``status`` API docs; indexes follow the
state store: ``/v1/health/service/<s>`` reports the service's own index (``maxIndexForService``),
``/v1/health/checks/<s>`` and ``/v1/health/node/<n>`` the checks table's, ``/v1/catalog/nodes``
the nodes table's and ``/v1/catalog/services`` the services table's. All four block on ``?index``.
``?passing`` keeps only instances whose every check is passing (``filterNonPassing``: warning and
maintenance fail it too); ``?passing=false`` does not filter. The anonymous token (ACLs on, no
token) sees empty lists and may not read ``/v1/agent/self`` (see :mod:`.acl`).
"""

from __future__ import annotations

from collections.abc import Callable

from shepard_lib.model import CheckStatus
from shepard_lib.sim.consul import acl
from shepard_lib.sim.consul.http import JSON, Context, HTTPError, Request, Response, json_body
from shepard_lib.sim.consul.state import watch_index

CONSUL_VERSION = "1.17.0"
SERVER_RPC_PORT = 8300


def health(ctx: Context, req: Request) -> Response:
    """``/v1/health/{service,checks,node}/<name>``.

    Blocking, each wakes on what Consul's query watches (:meth:`ConsulState.blocking_read`): the
    service's instances, their nodes and all their checks for ``service`` (whose index is that
    data's own, so a move of it is the wake-up, whatever ``?passing`` keeps); the listed checks
    for ``checks`` and ``node``, whose answers carry the checks table's index, so that they return
    at once when any check changed since the client's index, but while blocked wake only for
    their own checks.
    """
    if req.method != "GET":
        raise HTTPError(405, f"method {req.method} not allowed")
    kind, _, name = req.path[len("/v1/health/") :].partition("/")
    if not name:
        raise HTTPError(400, "Missing node name" if kind == "node" else "Missing service name")
    catalog = ctx.state.catalog
    if kind == "service":
        passing = _passing(req)
        key: tuple[object, ...] = (kind, name, passing)

        def build() -> _Answer:
            out: list[dict[str, object]] = []
            for node, service, checks in catalog.instances(name):
                if passing and any(c.status != CheckStatus.PASSING for c in checks):
                    continue
                out.append(
                    {
                        "Node": node.to_json(),
                        "Service": service.to_json(),
                        "Checks": [c.to_json() for c in checks],
                    }
                )
            return _with_json(out)

        def read() -> tuple[int, _Answer]:
            index = catalog.index_for_service(name)
            return index, catalog.memo(key, index, build)

        watch: Callable[[int, _Answer], object] = watch_index

    elif kind in ("checks", "node"):
        listed = catalog.service_checks if kind == "checks" else catalog.node_checks
        versions = catalog.service_index if kind == "checks" else catalog.node_checks_index
        key = (kind, name)

        def build() -> _Answer:
            return _with_json([c.to_json() for c in listed(name)])

        def read() -> tuple[int, _Answer]:
            return catalog.checks_index, catalog.memo(key, versions.get(name, 0), build)

        watch = _encoded

    else:
        raise HTTPError(404, "Not found")
    index, (body, data), opts = ctx.blocking(req, read, watch)
    body, filtered = acl.visible(req.anonymous, body)
    headers = ctx.meta_headers(index, opts, filtered=filtered)
    return Response(200, json_body(body).body if filtered else data, JSON, headers)


_Answer = tuple[list[dict[str, object]], bytes]
"""A health answer with its JSON."""


def _with_json(body: list[dict[str, object]]) -> _Answer:
    """An answer with its JSON. Kept while what it was built from stays (:meth:`Catalog.memo`): the
    waiters of one service or node all wake at each change and are all sent the same bytes, encoded
    once (this saves the simulator's CPU; what is answered does not change)."""
    return body, json_body(body).body


def _encoded(index: int, answer: _Answer) -> object:
    """What a blocked ``checks``/``node`` query compares: the answer's JSON (the memoised object
    itself while nothing it lists changed, so the comparison is by identity)."""
    return answer[1]


def _passing(req: Request) -> bool:
    """``?passing`` as ``getBoolQueryParam`` reads it: bare means true, else Go's ``ParseBool``."""
    if not req.has("passing"):
        return False
    value = req.arg("passing")
    if value in ("", "1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise HTTPError(400, "Invalid value for ?passing")


def catalog_nodes(ctx: Context, req: Request) -> Response:
    """``/v1/catalog/nodes``."""
    catalog = ctx.state.catalog
    # Consul reads (and watches) the whole nodes table.
    index, body, opts = ctx.blocking(
        req,
        lambda: (catalog.nodes_index, [n.to_json() for _, n in sorted(catalog.nodes.items())]),
        watch_index,
    )
    body, filtered = acl.visible(req.anonymous, body)
    return json_body(body, headers=ctx.meta_headers(index, opts, filtered=filtered))


def catalog_services(ctx: Context, req: Request) -> Response:
    """``/v1/catalog/services``: service name to the union of its tags."""
    catalog = ctx.state.catalog
    # Consul reads (and watches) the whole services table: any change of an instance wakes it.
    index, tags, opts = ctx.blocking(
        req, lambda: (catalog.services_index, catalog.service_tags()), watch_index
    )
    names, filtered = acl.visible(req.anonymous, sorted(tags))
    body = {name: tags[name] for name in names}
    return json_body(body, headers=ctx.meta_headers(index, opts, filtered=filtered))


def agent_self(ctx: Context, req: Request) -> Response:
    """``/v1/agent/self``: the agent's Config, Member and Meta, as far as clients read them."""
    acl.check(req.anonymous, "agent", "read", ctx.node_name)
    node = ctx.state.read(lambda: ctx.state.catalog.nodes.get(ctx.node_name))
    address = node.address if node else "127.0.0.1"
    return json_body(
        {
            "Config": {
                "Datacenter": ctx.state.datacenter,
                "PrimaryDatacenter": ctx.state.datacenter,
                "NodeName": ctx.node_name,
                "NodeID": node.id if node else "",
                "Server": ctx.node_name == ctx.state.server_node,
                "Revision": "sim",
                "Version": CONSUL_VERSION,
            },
            "Member": {
                "Name": ctx.node_name,
                "Addr": address,
                "Port": 8301,
                "Tags": {
                    "dc": ctx.state.datacenter,
                    "role": "consul" if ctx.node_name == ctx.state.server_node else "node",
                    "build": CONSUL_VERSION,
                },
                "Status": 1,
            },
            "Meta": {"consul-network-segment": ""},
            "Stats": {"consul": _consul_stats(ctx)},
        }
    )


def _consul_stats(ctx: Context) -> dict[str, str]:
    """``Stats.consul`` as Consul's ``Server.Stats`` (a server agent) or ``Client.Stats`` returns it."""
    if ctx.node_name != ctx.state.server_node:
        return {"server": "false", "known_servers": "1"}
    leader = not ctx.faults.leader_lost
    return {
        "server": "true",
        "leader": str(leader).lower(),
        "leader_addr": f"127.0.0.1:{SERVER_RPC_PORT}" if leader else "",
        "bootstrap": "true",
        "known_datacenters": "1",
    }


def status_leader(ctx: Context, req: Request) -> Response:
    """``/v1/status/leader``: the leader's RPC address, ``""`` when there is none."""
    return json_body("" if ctx.faults.leader_lost else f"127.0.0.1:{SERVER_RPC_PORT}")


def status_peers(ctx: Context, req: Request) -> Response:
    """``/v1/status/peers``: the one server."""
    return json_body([f"127.0.0.1:{SERVER_RPC_PORT}"])
