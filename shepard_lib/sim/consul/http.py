"""Request and response primitives of the simulated Consul HTTP API.

Encoding and the query-option parsing follow ``agent/http.go``: JSON bodies without a trailing
newline (``json.Marshal``), errors as plain text with the status code (``handleErr``: 403 for
ACL errors, 500 for everything else), ``?index``/``?wait`` parsing with the texts
``Invalid index`` / ``Invalid wait time``, and ``?stale`` with ``?consistent`` rejected.
Blocking waits follow ``agent/consul/rpc.go`` through :func:`shepard_lib.sim.blocking.blocking_wait`
(default 5 minutes, maximum 10, a seeded stagger of up to wait/16). With ACLs on, a request without
a token is the anonymous token's (:mod:`.acl`); handlers see that as :attr:`Request.anonymous`.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from shepard_lib.clock import Clock
from shepard_lib.sim.blocking import CONSUL_WAIT, blocking_wait
from shepard_lib.sim.consul.faults import Faults
from shepard_lib.sim.consul.state import ConsulState
from shepard_lib.sim.httpbase import HTTPError as HTTPError
from shepard_lib.sim.httpbase import bearer_token, parse_index, parse_wait

T = TypeVar("T")

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


@dataclass
class Request:
    """A parsed request: decoded path, query with blank values kept, headers (lowercased names), body.

    ``anonymous`` is set by the server when ACLs are on and the request names no token.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""
    anonymous: bool = False

    @classmethod
    def parse(cls, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Request:
        """Split ``target`` (``/v1/kv/a%2Fb?recurse``) like Go's ``req.URL``."""
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        lowered = {k.lower(): v for k, v in headers.items()}
        return cls(method, unquote(parts.path), query, lowered, body)

    def has(self, name: str) -> bool:
        """The query names ``name`` (``?recurse`` counts, with or without a value)."""
        return name in self.query

    def arg(self, name: str, default: str = "") -> str:
        """The first value of query parameter ``name`` (Go's ``Query().Get``)."""
        values = self.query.get(name)
        return values[0] if values else default

    def token(self) -> str:
        """The ACL token: ``?token=``, else ``X-Consul-Token``, else ``Authorization: Bearer``."""
        return (
            self.arg("token")
            or self.headers.get("x-consul-token", "")
            or bearer_token(self.headers.get("authorization", ""))
        )


@dataclass
class Response:
    """What goes back on the wire."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_body(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``json.Marshal`` of ``obj`` (compact, no trailing newline)."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, data, JSON, headers or {})


def text_body(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    """A plain-text answer (errors, and the bare 404 of a missing key)."""
    return Response(status, text.encode(), TEXT, headers or {})


@dataclass(frozen=True)
class QueryOptions:
    """``?index``, ``?wait`` (cluster seconds, 0 when absent), ``?stale``/``?consistent``."""

    min_index: int
    wait: float
    stale: bool
    consistent: bool

    @classmethod
    def parse(cls, req: Request) -> QueryOptions:
        """Consul's ``parseConsistency`` then ``parseWait``; HTTPError 400 on bad input."""
        stale, consistent = req.has("stale"), req.has("consistent")
        if stale and consistent:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        return cls(parse_index(req.arg("index")), parse_wait(req.arg("wait")), stale, consistent)


@dataclass
class Context:
    """What every endpoint handler needs: the state, the agent's identity, faults, jitter RNG, limits."""

    state: ConsulState
    node_name: str
    faults: Faults
    rng: random.Random
    max_txn_ops: int = 64
    strict_keys: bool = False
    abort: threading.Event = field(default_factory=threading.Event)

    @property
    def clock(self) -> Clock:
        """The cluster clock."""
        return self.state.clock

    def query_timeout_real(self, wait: float) -> float:
        """Real seconds a blocking query may wait (:func:`~shepard_lib.sim.blocking.blocking_wait`)."""
        return self.clock.real(blocking_wait(wait, CONSUL_WAIT, self.rng))

    def meta_headers(
        self, index: int, opts: QueryOptions | None = None, *, filtered: bool = False
    ) -> dict[str, str]:
        """``setMeta``: X-Consul-Index (at least 1), KnownLeader, LastContact, consistency, and
        ``X-Consul-Results-Filtered-By-ACLs: true`` when ACLs removed results (omitted otherwise)."""
        level = "leader"
        if opts is not None and opts.consistent:
            level = "consistent"
        elif opts is not None and opts.stale:
            level = "stale"
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "false" if self.faults.leader_lost else "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": level,
        }
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return headers

    def blocking(
        self,
        req: Request,
        read: Callable[[], tuple[int, T]],
        watch: Callable[[int, T], object] | None = None,
    ) -> tuple[int, T, QueryOptions]:
        """Run ``read`` as a blocking query per the request's ``?index``/``?wait``, woken by a change
        of ``watch(index, answer)`` (default: the answer; see :meth:`ConsulState.blocking_read`)."""
        opts = QueryOptions.parse(req)
        timeout = self.query_timeout_real(opts.wait) if opts.min_index > 0 else 0.0
        index, result = self.state.blocking_read(read, opts.min_index, timeout, self.abort, watch)
        return index, result, opts


Handler = Callable[[Context, Request], Response]
