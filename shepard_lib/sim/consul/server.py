"""The simulated Consul agent's HTTP server: routing, ACL, faults and request counts.

A stdlib :class:`http.server.ThreadingHTTPServer` speaking HTTP/1.1 with keep-alive (one daemon
thread per connection, so a blocking query holds only its own connection). Besides the Consul
API it answers ``GET /_sim/requests`` with the request counts by endpoint and method
(``{"/v1/kv": {"GET": 3, "PUT": 1}, ...}``; ``DELETE /_sim/requests`` resets them),
``GET /_sim/requests?detail`` with the same requests counted by their shape (method, KV key or
txn operations, the query flags that change what a request does, and the answer's status: see
:func:`request_shape`), and
``GET /_sim/info`` with ``{"service": "consul", "time_scale": <scale>}``. The ``/_sim/``
endpoints are never counted, delayed, failed or ACL-checked. Every answer carries
``X-Shepard-Sim-Time-Scale: <scale>``, so a client can tell that its clock runs at another speed.

ACL (when started with ``acl_token``, the one management token): a request with any other token
is 403 ``ACL not found``, as ``ResolveToken`` answers for an unknown secret; a request without a
token runs as the anonymous token of ``default_policy = deny``, which each endpoint answers as
Consul does (403 for reads of one thing and writes, filtered listings; see :mod:`.acl`).
``/v1/status/*`` needs no token.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections import Counter
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs

from shepard_lib.clock import SIM_TIME_SCALE_HEADER
from shepard_lib.sim.consul import catalog_api, kv_api, session_api, txn_api
from shepard_lib.sim.consul.acl import ACL_NOT_FOUND
from shepard_lib.sim.consul.faults import NO_LEADER, RPC_FAILED, Fault, Faults
from shepard_lib.sim.consul.http import Context, Handler, HTTPError, Request, Response, json_body, text_body
from shepard_lib.sim.consul.state import ConsulState
from shepard_lib.sim.httpbase import TrackedHandler, TrackingHTTPServer

log = logging.getLogger(__name__)

_PREFIX_ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/v1/kv/", kv_api.handle),
    ("/v1/session/", session_api.handle),
    ("/v1/health/", catalog_api.health),
)
_EXACT_ROUTES: dict[str, Handler] = {
    "/v1/txn": txn_api.handle,
    "/v1/catalog/nodes": catalog_api.catalog_nodes,
    "/v1/catalog/services": catalog_api.catalog_services,
    "/v1/agent/self": catalog_api.agent_self,
    "/v1/status/leader": catalog_api.status_leader,
    "/v1/status/peers": catalog_api.status_peers,
}
_NO_LEADER_NEEDED = ("/v1/agent/", "/v1/status/")
_TOKEN_PARAM = re.compile(r"([?&]token=)[^&\s]*")


class RequestCounter:
    """Thread-safe counts of requests by endpoint and method, and by shape (:func:`request_shape`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._shapes: Counter[str] = Counter()

    def add(self, endpoint: str, method: str) -> None:
        """Count one request."""
        with self._lock:
            self._counts[(endpoint, method)] += 1

    def add_shape(self, shape: str) -> None:
        """Count one answered request by its shape."""
        with self._lock:
            self._shapes[shape] += 1

    def shapes(self) -> dict[str, int]:
        """``{shape: count}``."""
        with self._lock:
            return dict(sorted(self._shapes.items()))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{endpoint: {method: count}}``."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (endpoint, method), n in sorted(self._counts.items()):
                out.setdefault(endpoint, {})[method] = n
        return out

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._counts.clear()
            self._shapes.clear()


class ConsulServer:
    """One simulated Consul agent serving ``state`` over HTTP on ``host:port`` (0: any free port).

    ``acl_token`` turns ACLs on with that one (management) token; requests without a token are
    the anonymous token's (no rights, see :mod:`.acl`). ``node_name`` is the agent's
    node (default: the state's server node; registered if new): sessions created without a Node
    belong to it and ``/v1/agent/self`` names it. ``seed`` seeds the fault and jitter RNGs.
    ``max_txn_ops`` is the transaction size limit (64: Consul before 1.14; 128 since).
    ``strict_keys`` rejects KV keys the way Consul 1.21.5 does (see :mod:`.kv_api`).
    Fault controls are on :attr:`faults`; counts on :attr:`requests`.
    """

    def __init__(
        self,
        state: ConsulState,
        host: str = "127.0.0.1",
        port: int = 0,
        acl_token: str | None = None,
        *,
        node_name: str | None = None,
        seed: int = 0,
        max_txn_ops: int = 64,
        strict_keys: bool = False,
    ) -> None:
        self.state = state
        self.acl_token = acl_token
        self.faults = Faults(seed)
        self.requests = RequestCounter()
        self.node_name = node_name or state.server_node
        if self.node_name not in state.read(lambda: set(state.catalog.nodes)):
            state.register_node(self.node_name)
        self._ctx = Context(
            state,
            self.node_name,
            self.faults,
            random.Random(seed + 1),
            max_txn_ops=max_txn_ops,
            strict_keys=strict_keys,
        )
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``http://<host>:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    def start(self) -> ConsulServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=f"consul-sim:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: close the listener and every open connection, end pending blocking queries."""
        self._ctx.abort.set()
        self.state.wake_waiters()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        self._httpd.close_connections()

    def __enter__(self) -> ConsulServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dispatch(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request (the HTTP handler's whole job, callable without a socket)."""
        if target.startswith("/_sim/"):
            return self._sim_endpoint(method, target)
        req = Request.parse(method, target, headers, body)
        endpoint, handler = _route(req.path)
        self.requests.add(endpoint, method)
        resp = self._answer(req, endpoint, handler)
        self.requests.add_shape(request_shape(req, endpoint, resp.status))
        return resp

    def _answer(self, req: Request, endpoint: str, handler: Handler | None) -> Response:
        """The answer to ``req`` (routed to ``endpoint``), with the faults injected into it."""
        method = req.method
        write = method in ("PUT", "POST", "DELETE")
        faults = self.faults
        planned = faults.planned(endpoint) if write else frozenset()
        try:
            if handler is None:
                raise HTTPError(404, "404 page not found\n")
            self._before(req, endpoint, planned)
            if write and (Fault.LATE_WRITE in planned or faults.draw_late_write()):
                faults.count(Fault.LATE_WRITE, endpoint)
                self.state.clock.sleep(faults.late_delay)  # applied after the client may have left
            resp = handler(self._ctx, req)
        except HTTPError as exc:
            return text_body(exc.status, exc.text)
        if write and (Fault.LATE_REPLY in planned or faults.draw_late_reply()):
            faults.count(Fault.LATE_REPLY, endpoint)
            self.state.clock.sleep(faults.late_delay)  # applied; the answer comes late
        if Fault.LOST_REPLY in planned or faults.draw_lost_reply():
            faults.count(Fault.LOST_REPLY, endpoint)
            return text_body(500, RPC_FAILED)
        return resp

    def _before(self, req: Request, endpoint: str, planned: frozenset[Fault]) -> None:
        """Faults, datacenter, then the ACL check; raises HTTPError to answer instead of the handler.

        ``?dc=`` naming another datacenter fails as Consul's ``forwardDC`` does without a route.
        """
        faults = self.faults
        if faults.latency > 0:
            self.state.clock.sleep(faults.latency)
        # A random error never replaces a planned fault (which would then not happen).
        if Fault.ERROR in planned or (not planned and faults.draw_error()):
            faults.count(Fault.ERROR, endpoint)
            raise HTTPError(500, RPC_FAILED)
        if (
            faults.leader_lost
            and not req.path.startswith(_NO_LEADER_NEEDED)
            and not (req.method == "GET" and req.has("stale"))
        ):
            raise HTTPError(500, NO_LEADER)
        dc = req.arg("dc")
        if dc and dc != self.state.datacenter:
            raise HTTPError(500, "No path to datacenter")
        if self.acl_token is not None and not req.path.startswith("/v1/status/"):
            token = req.token()
            if not token:
                req.anonymous = True
            elif token != self.acl_token:
                raise HTTPError(403, ACL_NOT_FOUND)

    def _sim_endpoint(self, method: str, target: str) -> Response:
        if target.split("?")[0] == "/_sim/info":
            return json_body({"service": "consul", "time_scale": self.state.clock.scale})
        if target.split("?")[0] != "/_sim/requests":
            return text_body(404, "404 page not found\n")
        if method == "DELETE":
            self.requests.reset()
            return json_body(True)
        if "detail" in parse_qs(target.partition("?")[2], keep_blank_values=True):
            return json_body(self.requests.shapes())
        return json_body(self.requests.snapshot())


_SHAPE_FLAGS = ("acquire", "cas", "consistent", "keys", "recurse", "release", "stale")


def request_shape(req: Request, endpoint: str, status: int) -> str:
    """What a request did, for counting: ``"PUT /v1/txn [cas <key>, unlock <key>] 200"``.

    The method; the KV key, the txn's operations (verb and key) or the endpoint (IDs left out);
    the query flags that change what a request does (``index`` only when it blocks: non-zero);
    the status of the answer.
    """
    if endpoint == "/v1/txn":
        try:
            ops = json.loads(req.body or b"null")
            what = "/v1/txn [" + ", ".join(f"{op['KV']['Verb']} {op['KV']['Key']}" for op in ops) + "]"
        except (ValueError, TypeError, KeyError):
            what = "/v1/txn [?]"
    elif endpoint == "/v1/kv":
        what = req.path
    else:
        what = endpoint
    flags = [name for name in _SHAPE_FLAGS if req.has(name)]
    if req.arg("index") not in ("", "0"):
        flags.append("index")
    return " ".join([req.method, what, *(f"?{flag}" for flag in flags), str(status)])


def _route(path: str) -> tuple[str, Handler | None]:
    """The counted endpoint name and its handler (None: unknown path)."""
    exact = _EXACT_ROUTES.get(path)
    if exact is not None:
        return path, exact
    for prefix, handler in _PREFIX_ROUTES:
        if path.startswith(prefix):
            if prefix == "/v1/kv/":
                return "/v1/kv", handler
            return prefix + path[len(prefix) :].partition("/")[0], handler
    return path, None


class _HTTPServer(TrackingHTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], sim: ConsulServer):
        self.sim = sim
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("consul sim: connection from %s ended with an error", client_address, exc_info=True)


class _Handler(TrackedHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Debug-log the request line with any ``?token=`` hidden, as Consul's own logs do."""
        log.debug("consul sim: %s", _TOKEN_PARAM.sub(r"\1<hidden>", format % args))

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            headers = dict(self.headers.items())
            resp = self.server.sim.dispatch(self.command, self.path, headers, body)
        except Exception as exc:
            log.exception("consul sim: %s %s failed", self.command, self.path.split("?")[0])
            resp = text_body(500, str(exc))
        self._write(resp)

    do_GET = do_PUT = do_DELETE = do_POST = _serve

    def _write(self, resp: Response) -> None:
        reason = HTTPStatus(resp.status).phrase
        head = [
            f"HTTP/1.1 {resp.status} {reason}",
            f"Content-Type: {resp.content_type}",
            f"Content-Length: {len(resp.body)}",
        ]
        head.extend(f"{k}: {v}" for k, v in resp.headers.items())
        head.append(f"{SIM_TIME_SCALE_HEADER}: {self.server.sim.state.clock.scale:g}")
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body
        self.wfile.write(data)
