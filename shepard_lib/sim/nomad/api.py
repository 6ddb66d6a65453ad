"""Nomad's HTTP API over :class:`~shepard_lib.sim.nomad.sim.NomadSim`, on loopback.

Endpoints (``/v1``): ``nodes``, ``node/<id>``, ``node/<id>/allocations``, ``jobs``, ``job/<id>``,
``job/<id>/allocations``, ``job/<id>/dispatch``, ``allocations``, ``allocation/<id>``,
``allocation/<id>/stop``, ``agent/self``, ``client/allocation/<id>/restart``. Paths are matched
percent-decoded, as Go's ``URL.Path`` is, and a job ID is everything between ``/v1/job/`` and a
known suffix (``JobSpecificRequest``), so ``/v1/job/batch%2Fdispatch-1-ab/allocations`` reads the
allocations of the dispatched job ``batch/dispatch-1-ab``. A dispatch with a payload or an
``IdPrefixTemplate`` is answered 400 (not simulated). Reads support blocking queries
(``?index=&wait=``, answered with ``X-Nomad-Index``, ``X-Nomad-KnownLeader``,
``X-Nomad-LastContact``; waits follow ``nomad/rpc.go`` through
:func:`~shepard_lib.sim.blocking.blocking_wait`: default and maximum 5 minutes, a stagger of up to
wait/16 drawn from an RNG seeded by the scenario's seed), ``?namespace=`` (``*`` for all) and
``?prefix=`` on lists. With an ACL token configured, every ``/v1`` request needs it in
``X-Nomad-Token`` or ``Authorization: Bearer`` (403 ``Permission denied`` without one, 403
``ACL token not found`` for a wrong one).

Simulator endpoints (no ACL): ``GET /_sim/restarts`` (the restart record as JSON),
``GET /_sim/requests`` (request counts by method and endpoint) and ``GET /_sim/info``
(``{"service": "nomad", "time_scale": <scale>}``). Every answer carries
``X-Shepard-Sim-Time-Scale: <scale>``, so a client can tell that its clock runs at another speed.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from shepard_lib.clock import SIM_TIME_SCALE_HEADER
from shepard_lib.sim.blocking import NOMAD_WAIT, blocking_wait
from shepard_lib.sim.httpbase import (
    HTTPError,
    TrackedHandler,
    TrackingHTTPServer,
    bearer_token,
    parse_index,
    parse_wait,
)
from shepard_lib.sim.nomad import wire
from shepard_lib.sim.nomad.client import ClientError
from shepard_lib.sim.nomad.sim import DispatchError, NomadSim
from shepard_lib.sim.nomad.state import SimAlloc

__all__ = ["NomadFaults", "NomadServer"]

log = logging.getLogger(__name__)

# GET/POST /v1/job/<id>: any path under /v1/job/ that ends in no other endpoint's suffix
_JOB_CRUD = re.compile(r"/v1/job/(.+)(?<!/allocations)(?<!/dispatch)")
NO_LEADER = "No cluster leader"
INJECTED_ERROR = "rpc error: EOF"


@dataclass
class NomadFaults:
    """Fault knobs, safe to change while serving.

    ``error_rate`` (0..1) of ``/v1`` requests fail with 500 before doing anything (seeded draws);
    ``latency`` cluster seconds are added to each; ``leader_lost`` answers ``500 No cluster leader``;
    ``known_leader`` is the ``X-Nomad-KnownLeader`` value of read answers (``"false"``: a server
    without a leader answering from its own, possibly stale, state; None: no such header, as from
    a proxy that drops it).
    """

    error_rate: float = 0.0
    latency: float = 0.0
    leader_lost: bool = False
    known_leader: str | None = "true"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw_error(self) -> bool:
        """True when this request should fail."""
        if self.error_rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < self.error_rate

    def reset(self) -> None:
        """Clear every fault."""
        self.error_rate = 0.0
        self.latency = 0.0
        self.leader_lost = False
        self.known_leader = "true"


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def token(self) -> str | None:
        """``parseToken``: ``X-Nomad-Token`` (trimmed), else ``Authorization: Bearer``; no ``?token=``."""
        token = self.headers.get("x-nomad-token", "").strip() or bearer_token(
            self.headers.get("authorization", "")
        )
        return token or None

    def flag(self, name: str, default: bool) -> bool:
        value = self.query.get(name)
        return default if value is None else value.lower() in ("", "1", "true")


@dataclass
class _Answer:
    body: Any
    index: int | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


Route = tuple[str, re.Pattern[str], str, Callable[..., _Answer]]


class NomadServer:
    """An HTTP server speaking Nomad's API for ``sim``.

    ``local_node`` names the node whose client agent this server stands for (``/v1/agent/self``);
    by default the first node. Start with :meth:`start`; ``address`` is then ``http://127.0.0.1:<port>``.
    Blocking-query staggers are drawn from ``random.Random(scenario seed + 1)``, so seeded runs repeat.
    """

    def __init__(
        self,
        sim: NomadSim,
        host: str = "127.0.0.1",
        port: int = 0,
        acl_token: str | None = None,
        local_node: str | None = None,
        faults: NomadFaults | None = None,
    ) -> None:
        self.sim = sim
        self.acl_token = acl_token
        self.local_node = local_node
        self.faults = faults or NomadFaults(seed=sim.scenario.seed)
        self._wait_rng = random.Random(sim.scenario.seed + 1)
        self._httpd = TrackingHTTPServer((host, port), _handler_class(self))
        self._httpd.clock = sim.clock
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="sim-nomad-http", daemon=True
        )
        self._routes: list[Route] = [
            ("GET", re.compile(r"/v1/nodes"), "/v1/nodes", self._nodes),
            ("GET", re.compile(r"/v1/node/([^/]+)"), "/v1/node/:id", self._node),
            (
                "GET",
                re.compile(r"/v1/node/([^/]+)/allocations"),
                "/v1/node/:id/allocations",
                self._node_allocs,
            ),
            ("GET", re.compile(r"/v1/jobs"), "/v1/jobs", self._jobs),
            # a job ID may hold "/": the suffix decides, as in Nomad's JobSpecificRequest
            ("GET", re.compile(r"/v1/job/(.+)/allocations"), "/v1/job/:id/allocations", self._job_allocs),
            ("POST", re.compile(r"/v1/job/(.+)/dispatch"), "/v1/job/:id/dispatch", self._job_dispatch),
            ("GET", _JOB_CRUD, "/v1/job/:id", self._job),
            ("GET", re.compile(r"/v1/allocations"), "/v1/allocations", self._allocs),
            ("GET", re.compile(r"/v1/allocation/([^/]+)"), "/v1/allocation/:id", self._alloc),
            ("POST", re.compile(r"/v1/allocation/([^/]+)/stop"), "/v1/allocation/:id/stop", self._alloc_stop),
            ("POST", re.compile(r"/v1/node/([^/]+)/drain"), "/v1/node/:id/drain", self._node_drain),
            ("POST", _JOB_CRUD, "/v1/job/:id", self._job_update),
            ("GET", re.compile(r"/v1/agent/self"), "/v1/agent/self", self._agent_self),
            (
                "POST",
                re.compile(r"/v1/client/allocation/([^/]+)/restart"),
                "/v1/client/allocation/:id/restart",
                self._restart,
            ),
            ("GET", re.compile(r"/_sim/restarts"), "/_sim/restarts", self._sim_restarts),
            ("GET", re.compile(r"/_sim/requests"), "/_sim/requests", self._sim_requests),
            ("GET", re.compile(r"/_sim/info"), "/_sim/info", self._sim_info),
        ]

    @property
    def address(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close the listener and every open (keep-alive) connection."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        self._httpd.close_connections()

    # --- dispatch --------------------------------------------------------------------------------

    def handle(self, req: _Request) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: status, headers, body."""
        try:
            route, args = self._route(req)
            if req.path.startswith("/v1/"):
                self.sim.count_request(f"{req.method} {route[2]}")
                self._gate(req)
            answer = route[3](req, *args)
        except HTTPError as err:
            return err.status, {"Content-Type": "text/plain; charset=utf-8"}, err.text.encode()
        except ClientError as err:
            return err.status, {"Content-Type": "text/plain; charset=utf-8"}, str(err).encode()
        headers = {"Content-Type": "application/json", **answer.headers}
        if answer.index is not None:
            headers.update({"X-Nomad-Index": str(max(1, answer.index)), "X-Nomad-LastContact": "0"})
            if self.faults.known_leader is not None:
                headers["X-Nomad-KnownLeader"] = self.faults.known_leader
        return answer.status, headers, json.dumps(answer.body).encode()

    def _route(self, req: _Request) -> tuple[Route, tuple[str, ...]]:
        method = "POST" if req.method == "PUT" else req.method
        path_matched = False
        for route in self._routes:
            m = route[1].fullmatch(req.path)
            if m is None:
                continue
            path_matched = True
            if route[0] == method:
                return route, m.groups()
        if path_matched:
            raise HTTPError(405, "Invalid method")
        raise HTTPError(404, "404 page not found")

    def _gate(self, req: _Request) -> None:
        faults = self.faults
        if faults.latency > 0:
            time.sleep(self.sim.clock.real(faults.latency))
        if self.acl_token is not None:
            token = req.token()
            if token is None:
                raise HTTPError(403, "Permission denied")
            if token != self.acl_token:
                raise HTTPError(403, "ACL token not found")
        if faults.leader_lost and req.path != "/v1/agent/self":
            raise HTTPError(500, NO_LEADER)
        if faults.draw_error():
            raise HTTPError(500, INJECTED_ERROR)

    def _block(self, req: _Request, current: Callable[[], int]) -> None:
        """Nomad's blocking query: wait until ``current()`` passes ``?index=`` or ``?wait=`` runs out.

        ``parseWait`` checks ``?wait`` then ``?index`` (400 ``Invalid wait time`` / ``Invalid index``).
        """
        wait = parse_wait(req.query.get("wait", ""))
        index = parse_index(req.query.get("index", ""))
        if index == 0:
            return
        timeout = blocking_wait(wait, NOMAD_WAIT, self._wait_rng)
        self.sim.state.wait_past(current, index, self.sim.clock.real(timeout))

    def _namespace_ok(self, req: _Request, namespace: str) -> bool:
        wanted = req.query.get("namespace") or "default"
        return wanted in ("*", namespace)

    # --- handlers --------------------------------------------------------------------------------

    def _nodes(self, req: _Request) -> _Answer:
        state = self.sim.state
        self._block(req, lambda: state.table_index["nodes"])
        prefix = req.query.get("prefix", "")
        with state.lock:
            body = [wire.node_stub(n) for n in state.nodes.values() if n.id.startswith(prefix)]
            return _Answer(sorted(body, key=lambda n: n["ID"]), state.table_index["nodes"])

    def _node(self, req: _Request, node_id: str) -> _Answer:
        return self._one(
            req, "nodes", lambda: self.sim.state.nodes.get(node_id), "node not found", wire.node_json
        )

    def _node_allocs(self, req: _Request, node_id: str) -> _Answer:
        """``Node.GetAllocs``: its index is the highest ModifyIndex of the node's allocations."""
        state = self.sim.state

        def current() -> int:
            indexes = [a.modify_index for a in state.allocs.values() if a.node.id == node_id]
            return max(indexes, default=state.table_index["allocs"])

        self._block(req, current)
        with state.lock:
            allocs = [a for a in state.allocs.values() if a.node.id == node_id]
            return _Answer([self._alloc_json(a) for a in allocs], current())

    def _jobs(self, req: _Request) -> _Answer:
        state = self.sim.state
        self._block(req, lambda: state.table_index["jobs"])
        prefix = req.query.get("prefix", "")
        meta = req.flag("meta", False)
        with state.lock:
            body = [
                wire.job_stub(j, state.allocs_of(job=j), meta, state.children_of(j))
                for j in state.jobs.values()
                if self._namespace_ok(req, j.namespace) and j.id.startswith(prefix)
            ]
            return _Answer(sorted(body, key=lambda j: (j["Namespace"], j["ID"])), state.table_index["jobs"])

    def _job(self, req: _Request, job_id: str) -> _Answer:
        key = (req.query.get("namespace") or "default", job_id)
        scenario = self.sim.scenario

        def render(job: Any) -> Any:
            return wire.job_json(job, self.sim.state.region, scenario.logs, scenario.restart_policy)

        return self._one(req, "jobs", lambda: self.sim.state.jobs.get(key), "job not found", render)

    def _job_dispatch(self, req: _Request, job_id: str) -> _Answer:
        """``POST /v1/job/<id>/dispatch`` (``JobDispatchRequest``): a new child of a parameterized job.

        Refusals are Nomad's RPC errors, which its HTTP layer answers with a 500 and the message.
        """
        body = _json_body(req)
        if body.get("JobID") and body["JobID"] != job_id:
            raise HTTPError(400, "Job ID does not match")
        if body.get("Payload") or body.get("IdPrefixTemplate"):
            raise HTTPError(400, "simulated Nomad: dispatch payloads and IdPrefixTemplate are not simulated")
        meta = body.get("Meta") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise HTTPError(400, "failed to decode request body: Meta must map strings to strings")
        namespace = req.query.get("namespace") or "default"
        try:
            child, eval_id = self.sim.dispatch(
                job_id, namespace, meta, str(body.get("IdempotencyToken") or "")
            )
        except DispatchError as exc:
            raise HTTPError(500, str(exc)) from None
        state = self.sim.state
        index = state.index if eval_id else child.modify_index
        answer = {
            "DispatchedJobID": child.id,
            "EvalID": eval_id,
            "EvalCreateIndex": index if eval_id else 0,
            "JobCreateIndex": child.create_index,
            "Index": index,
        }
        return _Answer(answer, headers={"X-Nomad-Index": str(index)})

    def _job_allocs(self, req: _Request, job_id: str) -> _Answer:
        state = self.sim.state
        namespace = req.query.get("namespace") or "default"
        self._block(req, lambda: state.table_index["allocs"])
        with state.lock:
            job = state.jobs.get((namespace, job_id))
            allocs = state.allocs_of(job=job) if job else []
            return _Answer([wire.alloc_stub(a) for a in allocs], state.table_index["allocs"])

    def _allocs(self, req: _Request) -> _Answer:
        state = self.sim.state
        self._block(req, lambda: state.table_index["allocs"])
        prefix = req.query.get("prefix", "")
        task_states = req.flag("task_states", True)
        with state.lock:
            body = [
                wire.alloc_stub(a, task_states)
                for a in state.allocs.values()
                if self._namespace_ok(req, a.job.namespace) and a.id.startswith(prefix)
            ]
            return _Answer(body, state.table_index["allocs"])

    def _alloc(self, req: _Request, alloc_id: str) -> _Answer:
        return self._one(
            req, "allocs", lambda: self.sim.state.allocs.get(alloc_id), "alloc not found", self._alloc_json
        )

    def _one(
        self, req: _Request, table: str, find: Callable[[], Any], missing: str, render: Callable[[Any], Any]
    ) -> _Answer:
        """One object: blocks on its ModifyIndex (the table's while it does not exist); 404 when absent."""
        state = self.sim.state

        def current() -> int:
            found = find()
            return found.modify_index if found else state.table_index[table]

        self._block(req, current)
        with state.lock:
            found = find()
            if found is None:
                raise HTTPError(404, missing)
            return _Answer(render(found), found.modify_index)

    def _alloc_json(self, alloc: SimAlloc) -> dict[str, Any]:
        scenario = self.sim.scenario
        return wire.alloc_json(alloc, self.sim.state.region, scenario.logs, scenario.restart_policy)

    def _alloc_stop(self, req: _Request, alloc_id: str) -> _Answer:
        eval_id = self.sim.stop_allocation(alloc_id)
        return _Answer({"EvalID": eval_id, "Index": self.sim.state.index})

    def _node_drain(self, req: _Request, node_id: str) -> _Answer:
        """``NodeUpdateDrainRequest``: ``{"DrainSpec": {"Deadline": ns, ...}, "MarkEligible": bool}``."""
        body = _json_body(req)
        spec = body.get("DrainSpec")
        if not isinstance(spec, dict):
            raise HTTPError(400, "drain spec required: set DrainSpec (a null spec cancels a drain)")
        deadline = spec.get("Deadline", 0)
        if not isinstance(deadline, int):
            raise HTTPError(400, f"invalid DrainSpec.Deadline: {deadline!r}")
        evals = self.sim.drain_node(node_id, deadline / 1e9)
        state = self.sim.state
        return _Answer(
            {
                "EvalIDs": evals,
                "EvalCreateIndex": state.index,
                "NodeModifyIndex": state.index,
                "Index": state.index,
            }
        )

    def _job_update(self, req: _Request, job_id: str) -> _Answer:
        """``POST /v1/job/<id>`` (``JobRegisterRequest``): a changed task replaces every allocation.

        The simulator keeps running its scenario's tasks; what it models is that Nomad replaces
        each allocation (new IDs, same names) when a task changed, and does nothing otherwise.
        """
        body = _json_body(req)
        job = body.get("Job")
        if not isinstance(job, dict):
            raise HTTPError(400, "Job must be specified")
        if job.get("ID") != job_id:
            raise HTTPError(400, "Job ID does not match name")
        namespace = req.query.get("namespace") or "default"
        try:
            current = self.sim.job(job_id, namespace)
        except KeyError:
            raise HTTPError(404, "job not found") from None
        scenario = self.sim.scenario
        rendered = wire.job_json(current, self.sim.state.region, scenario.logs, scenario.restart_policy)
        changed = _tasks(job) != _tasks(rendered)
        eval_id = self.sim.update_job(job_id, namespace) if changed else ""
        state = self.sim.state
        return _Answer(
            {
                "EvalID": eval_id,
                "EvalCreateIndex": state.index,
                "JobModifyIndex": current.modify_index,
                "Warnings": "",
                "Index": state.index,
                "LastContact": 0,
                "KnownLeader": True,
            }
        )

    def _agent_self(self, req: _Request) -> _Answer:
        state = self.sim.state
        with state.lock:
            node = (
                state.node_by_name(self.local_node) if self.local_node else next(iter(state.nodes.values()))
            )
            num = len(state.allocs_of(node=node))
            return _Answer(wire.agent_self_json(node, state.region, self.sim.node_data_dir(node.name), num))

    def _restart(self, req: _Request, alloc_id: str) -> _Answer:
        task: str | None = None
        if req.body.strip():
            try:
                payload = json.loads(req.body)
            except ValueError as exc:
                raise HTTPError(400, f"failed to decode request body: {exc}") from exc
            if not isinstance(payload, dict):
                raise HTTPError(400, "failed to decode request body: expected an object")
            task = payload.get("TaskName") or None
        self.sim.restart(alloc_id, task)
        return _Answer({})

    def _sim_restarts(self, req: _Request) -> _Answer:
        return _Answer([r.to_json() for r in self.sim.restarts()])

    def _sim_requests(self, req: _Request) -> _Answer:
        return _Answer(self.sim.request_counts())

    def _sim_info(self, req: _Request) -> _Answer:
        return _Answer({"service": "nomad", "time_scale": self.sim.clock.scale})


def _json_body(req: _Request) -> dict[str, Any]:
    try:
        body = json.loads(req.body or b"{}")
    except ValueError as exc:
        raise HTTPError(400, f"failed to decode request body: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "failed to decode request body: not an object")
    return body


def _tasks(job: dict[str, Any]) -> list[Any]:
    """The task definitions of a job's JSON, the part whose change is destructive."""
    return [
        (
            group.get("Name"),
            [
                {k: t.get(k) for k in ("Name", "Driver", "Config", "Env", "Templates")}
                for t in group.get("Tasks") or []
            ],
        )
        for group in job.get("TaskGroups") or []
    ]


def _handler_class(server: NomadServer) -> type[BaseHTTPRequestHandler]:
    class Handler(TrackedHandler):
        def _serve(self) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)  # Go's URL.Path, which Nomad's handlers read
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            # Go's url.Values.Get: the first value of a repeated parameter
            query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            req = _Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()}, body)
            try:
                status, headers, payload = server.handle(req)
            except Exception:
                log.exception("simulated Nomad failed on %s %s", self.command, split.path)
                status, headers, payload = 500, {"Content-Type": "text/plain"}, b"internal error"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header(SIM_TIME_SCALE_HEADER, f"{server.sim.clock.scale:g}")
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("nomad-sim %s", format % args)

    return Handler
