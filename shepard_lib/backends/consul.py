"""Consul over HTTP: :class:`ConsulBackend` implements :class:`shepard_lib.backends.ConsulAPI`.

The backend uses the client library only for its transport, ``consul.std.HTTPClient`` (base URI,
path quoting, TLS settings, a ``requests`` session), and builds the requests and decodes the JSON
itself. That transport is the part python-consul2 0.1.5 and its maintained fork py-consul (which
installs the same ``consul`` package) share; their high-level methods differ where it matters here:

- ``Consul()`` reads ``CONSUL_HTTP_ADDR`` / ``CONSUL_HTTP_TOKEN`` / ``CONSUL_HTTP_SSL*`` from the
  environment and overrides its arguments (python-consul2 even raises on an address it cannot
  split, such as an IPv6 one), and python-consul2 emits a DeprecationWarning on every ``Consul()``.
  The transport reads no environment: the backend talks to exactly its :class:`ConsulConfig`.
- py-consul 1.8.0's ``txn.put`` sends no ``X-Consul-Token``; here every request carries it.
- python-consul2 applies one fixed ``timeout`` to every request, py-consul adds the query's
  ``wait`` to ``connections_timeout``: here the session computes each request's timeout (below).
- Their exceptions drop or embed the HTTP status differently; here errors are classified from the
  response itself (see :mod:`shepard_lib.backends._http`).

The token travels only in the ``X-Consul-Token`` header (never ``?token=``), and every error
message is redacted before it is raised or logged.

:meth:`ConsulBackend.watch` and :meth:`ConsulBackend.session_renew` take ``cancel`` (a
:class:`~shepard_lib.cancel.CancelEvent`): setting it shuts down the socket of the request in
flight, so a stopping agent's blocking query ends at once with
:class:`~shepard_lib.errors.Cancelled`, as in the Nomad backend; :meth:`ConsulBackend.close`
aborts every request in flight.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import requests
from consul import std as consul_std

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import ConsulConfig
from shepard_lib.durations import parse_go_duration
from shepard_lib.errors import ConsulError
from shepard_lib.model import (
    CheckStatus,
    HealthCheck,
    KVEntry,
    SessionBehavior,
    SessionInfo,
    TxnOp,
    TxnResult,
)

from ._http import (
    DEFAULT_POOL_SIZE,
    NO_RETRY,
    RetryPolicy,
    blocking_timeout,
    call_with_retry,
    go_duration,
    pinned_session,
    redact,
    send_cancellable,
    tls_settings,
    transient_status,
    transport_error,
)
from ._servers import check_consul_kv_answer, check_time_scale

__all__ = ["DEFAULT_TIMEOUT", "NO_RETRY", "ConsulBackend", "RetryPolicy"]

DEFAULT_TIMEOUT = 10.0
"""Real seconds to wait for a non-blocking answer (and the margin added to a blocking query's wait)."""


class _Response(Protocol):
    """The part of the transport's ``Response`` named tuple (both forks) that the backend reads."""

    code: int
    headers: Any
    body: str


class _TimedSession(requests.Session):
    """A requests session that times each request out by what it is.

    A blocking query (``index`` and ``wait`` in the URL) gets ``clock.real(wait + wait/16) + margin``
    real seconds to answer, any other request ``margin``: Consul answers a blocking query only when
    its ``wait`` (plus jitter) has passed, so a shorter timeout would fail every idle watch.
    Connecting gets ``margin`` for every request.
    """

    def __init__(self, clock: Clock, margin: float) -> None:
        super().__init__()
        self._clock = clock
        self._margin = margin

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
        # connecting never waits longer than a plain request: a connect cannot be cancelled
        kwargs["timeout"] = (self._margin, self._timeout_for(str(url)))
        return super().request(method, url, *args, **kwargs)

    def _timeout_for(self, url: str) -> float:
        if "wait=" not in url:
            return self._margin
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        if "index" in query and "wait" in query:
            return blocking_timeout(parse_go_duration(query["wait"][0]), self._clock, self._margin)
        return self._margin


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _entry(item: dict[str, Any]) -> KVEntry:
    """A :class:`KVEntry` from Consul's KV JSON (``Value`` is base64 or null)."""
    value = item.get("Value")
    return KVEntry(
        key=item["Key"],
        value=None if value is None else base64.b64decode(value, validate=True),
        create_index=int(item.get("CreateIndex", 0)),
        modify_index=int(item.get("ModifyIndex", 0)),
        lock_index=int(item.get("LockIndex", 0)),
        flags=int(item.get("Flags", 0)),
        session=item.get("Session") or None,
    )


_CHECK_STATUS = {s.value: s for s in CheckStatus}


def _check(item: dict[str, Any]) -> HealthCheck:
    status = str(item.get("Status", "")).lower()
    return HealthCheck(
        node=item.get("Node", ""),
        check_id=item.get("CheckID", ""),
        name=item.get("Name", ""),
        # A status this code does not know is treated as the one that blocks a rollout.
        status=_CHECK_STATUS.get(status, CheckStatus.CRITICAL),
        service_id=item.get("ServiceID", "") or "",
        service_name=item.get("ServiceName", "") or "",
        output=item.get("Output", "") or "",
    )


def _seconds(value: Any) -> float:
    """A Consul duration: nanoseconds as a number, or a Go duration string (empty: none)."""
    if isinstance(value, int | float):
        return value / 1e9
    return parse_go_duration(str(value)) if value else 0.0


def _session(item: dict[str, Any]) -> SessionInfo:
    ttl = item.get("TTL") or ""
    return SessionInfo(
        id=item["ID"],
        name=item.get("Name", ""),
        node=item.get("Node", ""),
        ttl=parse_go_duration(ttl) if ttl else None,
        behavior=SessionBehavior(item.get("Behavior") or SessionBehavior.RELEASE),
        lock_delay=_seconds(item.get("LockDelay", 0)),
        create_index=int(item.get("CreateIndex", 0)),
    )


def _txn_op(op: TxnOp) -> dict[str, Any]:
    kv: dict[str, Any] = {"Verb": op.verb.value, "Key": op.key}
    if op.value is not None:
        kv["Value"] = _b64(op.value)
    if op.index is not None:
        kv["Index"] = op.index
    if op.session is not None:
        kv["Session"] = op.session
    if op.flags is not None:
        kv["Flags"] = op.flags
    return {"KV": kv}


class ConsulBackend:
    """:class:`~shepard_lib.backends.ConsulAPI` over HTTP, talking to exactly ``config``'s agent.

    ``retry`` decides how transient failures are retried (delays in cluster seconds of ``clock``);
    ``timeout`` is the real-seconds timeout of a non-blocking request; ``pool_size`` the keep-alive
    connections kept (at least the number of threads using the backend at once, see
    :func:`~shepard_lib.backends._http.pinned_session`).
    """

    def __init__(
        self,
        config: ConsulConfig,
        clock: Clock = REAL_CLOCK,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self._clock = clock
        self._retry = retry or RetryPolicy()
        self._token = config.token
        self._dc = config.datacenter
        url = urllib.parse.urlsplit(config.address if "//" in config.address else f"http://{config.address}")
        scheme = url.scheme or "http"
        port = url.port or (443 if scheme == "https" else 8500)
        host = url.hostname or "127.0.0.1"
        verify, cert = tls_settings(config.verify, config.ca_file, config.cert_file, config.key_file)
        self._http = consul_std.HTTPClient(host, port, scheme, verify, cert)
        # IPv6 hosts need brackets, and an address may carry a path prefix (a proxy in front of Consul).
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._http.base_uri = f"{scheme}://{netloc}{url.path.rstrip('/')}"
        self._http.session = _TimedSession(clock, timeout)
        self._http.verify = pinned_session(self._http.session, self._http.base_uri, verify, pool_size)
        self._closed = CancelEvent()

    def close(self) -> None:
        """Close the HTTP connections (the backend must not be used afterwards).

        A request in flight in another thread (a blocking query) is aborted: it raises
        :class:`~shepard_lib.errors.Cancelled`.
        """
        self._closed.set()
        self._http.session.close()

    # --- transport ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        call: str,
        path: str,
        *,
        params: Sequence[tuple[str, Any]] = (),
        data: bytes | str = b"",
        allow: Sequence[int] = (),
        dc: bool = True,
        repeatable: bool = True,
        cancel: CancelEvent | None = None,
    ) -> _Response:
        """Send one request (retrying transient failures); 2xx and ``allow`` statuses are returned.

        ``repeatable=False`` marks a write that must not be applied twice (see ``transient_status``).
        Setting ``cancel`` (or closing the backend) aborts it, in flight or between retries, with
        :class:`~shepard_lib.errors.Cancelled`.
        """
        query = list(params)
        if dc and self._dc:
            query.append(("dc", self._dc))
        headers = {"X-Consul-Token": self._token} if self._token else {}
        send: Callable[..., _Response] = getattr(self._http, method.lower())

        def attempt() -> _Response:
            try:
                if method == "GET":
                    response = send(lambda r: r, path, params=query, headers=headers)
                else:
                    response = send(lambda r: r, path, params=query, data=data, headers=headers)
            except requests.RequestException as exc:
                raise transport_error(
                    ConsulError, call, exc, idempotent=method == "GET", secrets=[self._token]
                ) from None
            check_time_scale("Consul", self._http.base_uri, response.headers, self._clock)
            if 200 <= response.code < 300 or response.code in allow:
                return response
            body = response.body.strip()[:500]
            raise ConsulError(
                call,
                redact(body or "no response body", [self._token]),
                status=response.code,
                transient=transient_status(response.code, body, repeatable=repeatable),
            )

        events = (self._closed,) if cancel is None else (cancel, self._closed)
        return call_with_retry(
            lambda: send_cancellable(attempt, call, events),
            call=call,
            policy=self._retry,
            clock=self._clock,
            server=f"Consul at {self._http.base_uri}",
            cancel=events,
        )

    def _json(self, call: str, response: _Response) -> Any:
        try:
            return json.loads(response.body)
        except ValueError:
            raise ConsulError(
                call, redact(f"unexpected response body: {response.body[:200]!r}", [self._token])
            ) from None

    def _kv_answer(self, call: str, response: _Response) -> None:
        """ConfigError unless ``response`` is Consul's KV answer with nothing hidden by ACLs."""
        check_consul_kv_answer(self._http.base_uri, response.code, response.headers, call.partition(" ")[2])

    def _entries(self, call: str, response: _Response) -> list[KVEntry]:
        self._kv_answer(call, response)
        if response.code == 404:
            return []
        try:
            return [_entry(item) for item in self._json(call, response) or []]
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ConsulError(call, f"unexpected KV entry: {exc}") from None

    @staticmethod
    def _index(response: _Response) -> int:
        try:
            return int(response.headers.get("X-Consul-Index", 0))
        except (TypeError, ValueError):
            return 0

    @staticmethod
    def _body(value: bytes | str | None) -> bytes:
        if value is None:
            return b""
        return value.encode("utf-8") if isinstance(value, str) else value

    def _bool(self, call: str, response: _Response) -> bool:
        return self._json(call, response) is True

    # --- KV -------------------------------------------------------------------------------------

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        """The entry at ``key``, or None when it does not exist."""
        call = f"kv.get {key}"
        params = [("consistent", "1")] if consistent else []
        entries = self._entries(call, self._request("GET", call, f"/v1/kv/{key}", params=params, allow=[404]))
        return entries[0] if entries else None

    def get_tree(self, prefix: str, *, consistent: bool = False) -> list[KVEntry]:
        """Every entry under ``prefix`` (``?recurse``); empty when there is none."""
        call = f"kv.get_tree {prefix}"
        params = [("recurse", "1"), *([("consistent", "1")] if consistent else [])]
        return self._entries(call, self._request("GET", call, f"/v1/kv/{prefix}", params=params, allow=[404]))

    def keys(self, prefix: str, separator: str | None = None) -> list[str]:
        """Key names under ``prefix`` (``?keys``), folded at ``separator`` when given."""
        call = f"kv.keys {prefix}"
        params = [("keys", "1"), *([("separator", separator)] if separator else [])]
        response = self._request("GET", call, f"/v1/kv/{prefix}", params=params, allow=[404])
        self._kv_answer(call, response)
        return [] if response.code == 404 else [str(k) for k in self._json(call, response) or []]

    def watch(
        self,
        key: str,
        index: int,
        wait: float,
        *,
        recurse: bool = False,
        cancel: CancelEvent | None = None,
    ) -> tuple[int, list[KVEntry]]:
        """Blocking query: return once the key (or prefix) changes past ``index``, or after ``wait``.

        Returns the new ``X-Consul-Index`` and the entries (an empty list for a missing key). As
        Consul's blocking-query rules ask, an index that went backwards comes back as 0 (the next
        query then answers at once) and a zero index as 1. ``index`` 0 does not block. Setting
        ``cancel`` ends the query at once with :class:`~shepard_lib.errors.Cancelled`.
        """
        call = f"kv.watch {key}"
        params: list[tuple[str, Any]] = [("index", index), ("wait", go_duration(wait))] if index > 0 else []
        if recurse:
            params.append(("recurse", "1"))
        response = self._request("GET", call, f"/v1/kv/{key}", params=params, allow=[404], cancel=cancel)
        return _next_index(index, self._index(response)), self._entries(call, response)

    def put(self, key: str, value: bytes | str, *, cas: int | None = None, flags: int | None = None) -> bool:
        """Write ``value``; with ``cas`` only if ModifyIndex matches (0: only if absent)."""
        call = f"kv.put {key}"
        params = [
            *([("cas", cas)] if cas is not None else []),
            *([("flags", flags)] if flags is not None else []),
        ]
        return self._bool(
            call, self._request("PUT", call, f"/v1/kv/{key}", params=params, data=self._body(value))
        )

    def acquire(self, key: str, value: bytes | str, session: str) -> bool:
        """``PUT ?acquire=session``: take the lock at ``key`` and store ``value``."""
        call = f"kv.acquire {key}"
        response = self._request(
            "PUT", call, f"/v1/kv/{key}", params=[("acquire", session)], data=self._body(value)
        )
        return self._bool(call, response)

    def release(self, key: str, session: str, value: bytes | str | None = None) -> bool:
        """``PUT ?release=session``; the body (when not None) becomes the new value.

        Consul stores the request body as the value on release, so ``None`` sends an empty body.
        """
        call = f"kv.release {key}"
        response = self._request(
            "PUT", call, f"/v1/kv/{key}", params=[("release", session)], data=self._body(value)
        )
        return self._bool(call, response)

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete a key (or a prefix); with ``cas`` only if ModifyIndex matches."""
        call = f"kv.delete {key}"
        params = [*([("cas", cas)] if cas is not None else []), *([("recurse", "1")] if recurse else [])]
        return self._bool(call, self._request("DELETE", call, f"/v1/kv/{key}", params=params))

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        """Apply up to 64 KV operations atomically; a rollback (HTTP 409) is ``TxnResult(ok=False)``."""
        call = f"txn ({len(ops)} ops)"
        if not ops:
            return TxnResult(ok=True)
        if len(ops) > 64:
            raise ConsulError(call, "Consul allows at most 64 operations per transaction")
        payload = json.dumps([_txn_op(op) for op in ops])
        # Not repeatable: a txn that set a fresh trigger value and lost its answer must not set another.
        response = self._request("PUT", call, "/v1/txn", data=payload, allow=[409], repeatable=False)
        body = self._json(call, response) or {}
        try:
            results = tuple(_entry(r["KV"]) for r in body.get("Results") or [] if r.get("KV"))
            errors = tuple(
                (int(e.get("OpIndex", 0)), str(e.get("What", ""))) for e in body.get("Errors") or []
            )
        except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ConsulError(call, f"unexpected txn response: {exc}") from None
        if response.code == 409:
            return TxnResult(ok=False, errors=errors)
        return TxnResult(ok=True, results=results)

    # --- sessions -------------------------------------------------------------------------------

    def session_create(
        self,
        name: str,
        ttl: float,
        *,
        behavior: SessionBehavior = SessionBehavior.RELEASE,
        lock_delay: float = 15.0,
        node: str | None = None,
        node_checks: Sequence[str] | None = None,
    ) -> str:
        """Create a session and return its ID.

        ``node_checks`` None keeps Consul's default (the node's ``serfHealth``); an empty list
        ties the session to no check, so only its TTL ends it.
        """
        call = f"session.create {name}"
        body: dict[str, Any] = {
            "Name": name,
            "TTL": go_duration(ttl),
            "Behavior": SessionBehavior(behavior).value,
            "LockDelay": go_duration(lock_delay) if lock_delay > 0 else "0s",
        }
        if node is not None:
            body["Node"] = node
        if node_checks is not None:
            body["NodeChecks"] = list(node_checks)
        response = self._request("PUT", call, "/v1/session/create", data=json.dumps(body))
        data = self._json(call, response)
        if not isinstance(data, dict) or not data.get("ID"):
            raise ConsulError(call, "the response carries no session ID")
        return str(data["ID"])

    def session_renew(self, session: str, *, cancel: CancelEvent | None = None) -> bool:
        """Renew a session; False when Consul no longer knows it (404).

        Setting ``cancel`` (the session is being destroyed) ends a renew in flight with
        :class:`~shepard_lib.errors.Cancelled`.
        """
        call = f"session.renew {session}"
        response = self._request("PUT", call, f"/v1/session/renew/{session}", allow=[404], cancel=cancel)
        return response.code != 404

    def session_destroy(self, session: str) -> None:
        """Destroy a session (idempotent)."""
        call = f"session.destroy {session}"
        self._request("PUT", call, f"/v1/session/destroy/{session}", allow=[404])

    def session_info(self, session: str) -> SessionInfo | None:
        """The session, or None when it does not exist, from a ``?consistent`` read.

        Every caller decides with it (a holder is gone, so its member may be reclaimed; our own
        session is lost): a stale 404 for a live session would lead to a second trigger.
        """
        call = f"session.info {session}"
        response = self._request(
            "GET", call, f"/v1/session/info/{session}", params=[("consistent", "1")], allow=[404]
        )
        items = [] if response.code == 404 else self._json(call, response) or []
        try:
            return _session(items[0]) if items else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ConsulError(call, f"unexpected session: {exc}") from None

    # --- health ---------------------------------------------------------------------------------

    def service_checks(
        self, service: str, index: int = 0, wait: float | None = None, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[HealthCheck]]:
        """Checks of all instances of ``service`` (``/v1/health/checks/<service>``), blocking on ``index``.

        Setting ``cancel`` ends the blocking query at once with :class:`~shepard_lib.errors.Cancelled`.
        """
        call = f"health.checks {service}"
        params: list[tuple[str, Any]] = []
        if index > 0:
            params = [("index", index), ("wait", go_duration(wait if wait is not None else 300.0))]
        response = self._request("GET", call, f"/v1/health/checks/{service}", params=params, cancel=cancel)
        return _next_index(index, self._index(response)), self._checks(call, response)

    def node_checks(
        self, node: str, index: int = 0, wait: float | None = None, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[HealthCheck]]:
        """Checks of a Consul node, its own and its services' (``/v1/health/node/<node>``), blocking on
        ``index`` as :meth:`service_checks` does; only the node's checks wake the query."""
        call = f"health.node {node}"
        params: list[tuple[str, Any]] = []
        if index > 0:
            params = [("index", index), ("wait", go_duration(wait if wait is not None else 300.0))]
        response = self._request("GET", call, f"/v1/health/node/{node}", params=params, cancel=cancel)
        return _next_index(index, self._index(response)), self._checks(call, response)

    def _checks(self, call: str, response: _Response) -> list[HealthCheck]:
        try:
            return [_check(item) for item in self._json(call, response) or []]
        except (AttributeError, TypeError) as exc:
            raise ConsulError(call, f"unexpected health check: {exc}") from None

    def agent_node_name(self) -> str | None:
        """The Consul node name of the local agent, or None when unknown (or not readable with this token)."""
        call = "agent.self"
        response = self._request("GET", call, "/v1/agent/self", allow=[403, 404], dc=False)
        if response.code != 200:
            return None
        data = self._json(call, response)
        if not isinstance(data, dict):
            return None
        name = (data.get("Config") or {}).get("NodeName") or (data.get("Member") or {}).get("Name")
        return str(name) if name else None


def _next_index(previous: int, returned: int) -> int:
    """The index to pass to the next blocking query, by Consul's rules (reset if it went backwards)."""
    if returned < previous:
        return 0
    return max(returned, 1)
