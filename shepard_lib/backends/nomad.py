"""Nomad over HTTP: :class:`NomadBackend` implements :class:`shepard_lib.backends.NomadAPI`.

Requests go through python-nomad's request layer (its endpoint classes' ``request()``: URL
building, namespace and region query parameters, the ``X-Nomad-Token`` header, TLS), built here
with explicit settings. ``nomad.Nomad()`` is not used because it falls back to ``NOMAD_ADDR``,
``NOMAD_TOKEN``, ``NOMAD_NAMESPACE``, ``NOMAD_REGION`` and ``NOMAD_CLIENT_CERT``/``_KEY`` from the
environment whenever an argument is empty: the backend talks to exactly its :class:`NomadConfig`.
python-nomad's own ``restart_allocation`` sends no task name (it restarts every task of the
allocation), so :meth:`NomadBackend.restart_task` posts ``{"TaskName": ...}`` itself.

The JSON is parsed into :mod:`shepard_lib.model` values: RFC 3339 times become Unix seconds
(Nomad's zero time ``0001-01-01T00:00:00Z`` becomes None), and the allocation index comes from
the allocation name ``<job>.<group>[<index>]``.

The blocking queries take ``cancel`` (a :class:`~shepard_lib.cancel.CancelEvent`): setting it
shuts down the socket of the query in flight (python-nomad sends through the backend's
``requests`` session, whose adapter tracks it), so a stopping agent's watch ends at once with
:class:`~shepard_lib.errors.Cancelled`; :meth:`NomadBackend.close` aborts every request in flight.
"""

from __future__ import annotations

import calendar
import email.utils
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import nomad.api
import nomad.api.client
import nomad.api.exceptions
import requests
from nomad.api.base import Requester

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.config import NomadConfig
from shepard_lib.errors import NomadError, NotFound
from shepard_lib.model import (
    AgentInfo,
    Allocation,
    Job,
    JobStub,
    Listing,
    NodeInfo,
    Service,
    Task,
    TaskGroup,
    TaskState,
    Template,
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
from ._servers import check_time_scale

__all__ = [
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "NomadBackend",
    "NomadNotFound",
    "RetryPolicy",
    "alloc_index",
    "parse_agent",
    "parse_allocation",
    "parse_job",
    "parse_job_stub",
    "parse_node",
    "parse_time",
]

DEFAULT_TIMEOUT = 10.0
"""Real seconds to wait for a non-blocking answer (and the margin added to a blocking query's wait)."""

T = TypeVar("T")

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
_ALLOC_INDEX = re.compile(r"\[(\d+)\]\Z")
_UNKNOWN_ALLOC = re.compile(r"unknown allocation|alloc(ation)? .*not found", re.IGNORECASE)


class NomadNotFound(NotFound, NomadError):
    """Nomad does not know the object asked for (an allocation, job or node)."""


def parse_time(value: Any) -> float | None:
    """Unix seconds of a Nomad timestamp: RFC 3339 text, or nanoseconds as a number.

    Nomad's zero time (``0001-01-01T00:00:00Z``, or 0) and empty values are None.
    """
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return None if value <= 0 else value / 1e9
    match = _RFC3339.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if year <= 1:
        return None
    fraction = float(match.group(7)) if match.group(7) else 0.0
    zone = match.group(8)
    offset = (
        0
        if zone in ("Z", "z")
        else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    )
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset + fraction


def alloc_index(name: str) -> int:
    """The ``NOMAD_ALLOC_INDEX`` of an allocation named ``<job>.<group>[<index>]``."""
    match = _ALLOC_INDEX.search(name)
    if not match:
        raise ValueError(f"allocation name {name!r} does not end in [<index>]")
    return int(match.group(1))


def _task_state(data: dict[str, Any]) -> TaskState:
    return TaskState(
        state=data.get("State") or "pending",
        failed=bool(data.get("Failed")),
        restarts=int(data.get("Restarts") or 0),
        last_restart=parse_time(data.get("LastRestart")),
        started_at=parse_time(data.get("StartedAt")),
        finished_at=parse_time(data.get("FinishedAt")),
    )


def parse_allocation(data: dict[str, Any]) -> Allocation:
    """An :class:`Allocation` from Nomad's allocation JSON (full or list stub)."""
    name = data.get("Name") or ""
    return Allocation(
        id=data["ID"],
        name=name,
        namespace=data.get("Namespace") or "default",
        node_id=data.get("NodeID") or "",
        node_name=data.get("NodeName") or "",
        job_id=data.get("JobID") or "",
        task_group=data.get("TaskGroup") or "",
        client_status=data.get("ClientStatus") or "",
        desired_status=data.get("DesiredStatus") or "",
        index=alloc_index(name),
        task_states={
            task: _task_state(state or {}) for task, state in (data.get("TaskStates") or {}).items()
        },
        modify_index=int(data.get("ModifyIndex") or 0),
        previous_allocation=data.get("PreviousAllocation") or "",
        next_allocation=data.get("NextAllocation") or "",
    )


def _meta(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (value or {}).items()}


def _service_names(services: Any) -> tuple[str, ...]:
    return tuple(s.get("Name") or "" for s in services or [])


def _service_blocks(services: Any) -> tuple[Service, ...]:
    return tuple(
        Service(
            name=s.get("Name") or "",
            provider=s.get("Provider") or "consul",
            checks=len(s.get("Checks") or []),
        )
        for s in services or []
    )


def _task(data: dict[str, Any]) -> Task:
    return Task(
        name=data["Name"],
        driver=data.get("Driver") or "",
        meta=_meta(data.get("Meta")),
        templates=tuple(
            Template(
                dest_path=t.get("DestPath") or "",
                change_mode=t.get("ChangeMode") or "restart",
                embedded_tmpl=t.get("EmbeddedTmpl") or "",
                source_path=t.get("SourcePath") or "",
                splay=(t.get("Splay") or 0) / 1e9,
            )
            for t in data.get("Templates") or []
        ),
        services=_service_names(data.get("Services")),
        service_blocks=_service_blocks(data.get("Services")),
    )


def parse_job(data: dict[str, Any]) -> Job:
    """A :class:`Job` from Nomad's job JSON."""
    return Job(
        id=data["ID"],
        name=data.get("Name") or data["ID"],
        namespace=data.get("Namespace") or "default",
        status=data.get("Status") or "",
        meta=_meta(data.get("Meta")),
        groups=tuple(
            TaskGroup(
                name=g["Name"],
                count=int(g.get("Count") or 0),
                meta=_meta(g.get("Meta")),
                tasks=tuple(_task(t) for t in g.get("Tasks") or []),
                services=_service_names(g.get("Services")),
                service_blocks=_service_blocks(g.get("Services")),
            )
            for g in data.get("TaskGroups") or []
        ),
        stop=bool(data.get("Stop")),
    )


def parse_job_stub(data: dict[str, Any]) -> JobStub:
    """A :class:`JobStub` from an entry of ``GET /v1/jobs``."""
    return JobStub(
        id=data["ID"],
        name=data.get("Name") or data["ID"],
        namespace=data.get("Namespace") or "default",
        status=data.get("Status") or "",
        stop=bool(data.get("Stop")),
    )


def parse_node(data: dict[str, Any]) -> NodeInfo:
    """A :class:`NodeInfo` from Nomad's node JSON (full or list stub)."""
    return NodeInfo(
        id=data["ID"],
        name=data.get("Name") or "",
        status=data.get("Status") or "",
        datacenter=data.get("Datacenter") or "",
        status_updated_at=float(data.get("StatusUpdatedAt") or 0),
        eligible=(data.get("SchedulingEligibility") or "eligible") == "eligible",
    )


def parse_agent(data: dict[str, Any]) -> AgentInfo:
    """An :class:`AgentInfo` from ``GET /v1/agent/self``."""
    config = data.get("config") or {}
    member = data.get("member") or {}
    tags = member.get("Tags") or {}
    client_stats = (data.get("stats") or {}).get("client") or {}
    return AgentInfo(
        node_name=config.get("NodeName") or member.get("Name") or "",
        node_id=client_stats.get("node_id") or None,
        datacenter=config.get("Datacenter") or tags.get("dc") or "",
        region=config.get("Region") or tags.get("region") or "",
    )


def _http_date(value: str | None) -> float | None:
    """Unix seconds of an HTTP ``Date`` header, or None when absent or unreadable."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _seg(value: str) -> str:
    """A URL path segment: IDs are quoted so that a ``/`` or ``?`` cannot change the path."""
    return urllib.parse.quote(value, safe="")


class NomadBackend:
    """:class:`~shepard_lib.backends.NomadAPI` over HTTP, talking to exactly ``config``'s agent.

    ``retry`` decides how transient failures are retried (delays in cluster seconds of ``clock``);
    ``timeout`` is the real-seconds timeout of a non-blocking request (and of connecting, for every
    request); ``pool_size`` the keep-alive connections kept (at least the number of threads using
    the backend at once).
    """

    def __init__(
        self,
        config: NomadConfig,
        clock: Clock = REAL_CLOCK,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self._clock = clock
        self._retry = retry or RetryPolicy()
        self._timeout = timeout
        self._token = config.token
        self._session = requests.Session()
        self._closed = CancelEvent()
        verify, cert = tls_settings(config.verify, config.ca_file, config.cert_file, config.key_file)
        address = config.address if "//" in config.address else f"http://{config.address}"
        verify = pinned_session(self._session, address, verify, pool_size)
        self._address = address.rstrip("/")
        settings: dict[str, Any] = {
            "address": address.rstrip("/"),
            "namespace": config.namespace or None,
            "token": config.token or None,
            "region": config.region or None,
            "timeout": timeout,
            "verify": verify,
            "cert": cert or (),
            "session": self._session,
        }
        self._endpoints: dict[str, Requester] = {
            "allocation": nomad.api.Allocation(**settings),
            "job": nomad.api.Job(**settings),
            "jobs": nomad.api.Jobs(**settings),
            "node": nomad.api.Node(**settings),
            "nodes": nomad.api.Nodes(**settings),
            "agent": nomad.api.Agent(**settings),
            "allocations": nomad.api.Allocations(**settings),
            "client/allocation": nomad.api.client.allocation(**settings),
        }

    def close(self) -> None:
        """Close the HTTP connections (the backend must not be used afterwards).

        A request in flight in another thread (a blocking query) is aborted: it raises
        :class:`~shepard_lib.errors.Cancelled`.
        """
        self._closed.set()
        self._session.close()

    def _request(
        self,
        call: str,
        endpoint: str,
        *path: str,
        method: str = "get",
        params: dict[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = None,
        cancel: CancelEvent | None = None,
    ) -> requests.Response:
        """Send one request through python-nomad (retrying transient failures); return the 2xx response.

        Setting ``cancel`` (or closing the backend) aborts it, in flight or between retries, with
        :class:`~shepard_lib.errors.Cancelled`.
        """
        requester = self._endpoints[endpoint]

        def attempt() -> requests.Response:
            try:
                response: requests.Response = requester.request(
                    *path,
                    method=method,
                    params=dict(params or {}),
                    json=json,
                    # connecting never waits longer than a plain request: a connect cannot be cancelled
                    timeout=(self._timeout, timeout or self._timeout),
                )
            except nomad.api.exceptions.BaseNomadException as exc:
                if isinstance(exc.nomad_resp, requests.Response):
                    check_time_scale("Nomad", self._address, exc.nomad_resp.headers, self._clock)
                raise self._error(call, exc.nomad_resp, idempotent=method == "get") from None
            except requests.RequestException as exc:
                raise self._error(call, exc, idempotent=method == "get") from None
            check_time_scale("Nomad", self._address, response.headers, self._clock)
            return response

        events = (self._closed,) if cancel is None else (cancel, self._closed)
        return call_with_retry(
            lambda: send_cancellable(attempt, call, events),
            call=call,
            policy=self._retry,
            clock=self._clock,
            server=f"Nomad at {self._address}",
            cancel=events,
        )

    def _error(self, call: str, cause: Any, *, idempotent: bool) -> NomadError:
        secrets = [self._token]
        if isinstance(cause, requests.RequestException):
            return transport_error(NomadError, call, cause, idempotent=idempotent, secrets=secrets)
        if isinstance(cause, requests.Response):
            status = cause.status_code
            body = (cause.text or "").strip()[:500]
            reason = redact(body or cause.reason or "no response body", secrets)
            if status == 404 or (status == 500 and _UNKNOWN_ALLOC.search(body)):
                return NomadNotFound(call, reason, status=status)
            # The only Nomad write Shepard sends is a task restart: never repeat one that may have happened.
            transient = transient_status(status, body, repeatable=idempotent)
            return NomadError(call, reason, status=status, transient=transient)
        return NomadError(call, redact(str(cause), secrets))

    def _json(self, call: str, response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise NomadError(
                call, redact(f"unexpected response body: {response.text[:200]!r}", [self._token])
            ) from None

    def _parse(self, call: str, parse: Callable[[Any], T], data: Any) -> T:
        try:
            return parse(data)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise NomadError(call, f"unexpected response: {type(exc).__name__}: {exc}") from None

    # --- allocations ----------------------------------------------------------------------------

    def allocation(self, alloc_id: str) -> Allocation:
        """One allocation; raises NotFound when Nomad does not know it."""
        call = f"allocation {alloc_id}"
        data = self._json(call, self._request(call, "allocation", _seg(alloc_id)))
        return self._parse(call, parse_allocation, data)

    def watch_allocation(
        self, alloc_id: str, index: int, wait: float, *, cancel: CancelEvent | None = None
    ) -> tuple[int, Allocation]:
        """Blocking query on one allocation: returns after it changes past ``index`` or after ``wait``.

        Returns the new ``X-Nomad-Index`` (0 when it went backwards, so the next query answers at
        once) and the allocation. ``index`` 0 does not block. Setting ``cancel`` ends the query at
        once with :class:`~shepard_lib.errors.Cancelled`.
        """
        call = f"allocation.watch {alloc_id}"
        params: dict[str, Any] = {}
        timeout = None
        if index > 0:
            params = {"index": index, "wait": go_duration(wait)}
            timeout = blocking_timeout(wait, self._clock, self._timeout)
        response = self._request(
            call, "allocation", _seg(alloc_id), params=params, timeout=timeout, cancel=cancel
        )
        alloc: Allocation = self._parse(call, parse_allocation, self._json(call, response))
        try:
            new_index = int(response.headers.get("X-Nomad-Index", 0))
        except ValueError:
            new_index = 0
        return (0 if new_index < index else max(new_index, 1)), alloc

    def node_allocations(self, node_id: str) -> list[Allocation]:
        """The allocations placed on a node."""
        call = f"node.allocations {node_id}"
        data = self._json(call, self._request(call, "node", _seg(node_id), "allocations"))
        return [self._parse(call, parse_allocation, a) for a in data or []]

    def watch_node_allocations(
        self, node_id: str, index: int, wait: float, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[Allocation]]:
        """Blocking query on a node's allocations (``GET /v1/node/<id>/allocations?index=&wait=``).

        Returns after an allocation of the node changes past ``index`` or after ``wait``, with the
        new ``X-Nomad-Index`` (0 when it went backwards, so the next query answers at once) and the
        allocations. ``index`` 0 does not block. Setting ``cancel`` ends the query at once with
        :class:`~shepard_lib.errors.Cancelled`.
        """
        call = f"node.allocations.watch {node_id}"
        params: dict[str, Any] = {}
        timeout = None
        if index > 0:
            params = {"index": index, "wait": go_duration(wait)}
            timeout = blocking_timeout(wait, self._clock, self._timeout)
        response = self._request(
            call, "node", _seg(node_id), "allocations", params=params, timeout=timeout, cancel=cancel
        )
        data = self._json(call, response)
        allocs = [self._parse(call, parse_allocation, a) for a in data or []]
        try:
            new_index = int(response.headers.get("X-Nomad-Index", 0))
        except ValueError:
            new_index = 0
        return (0 if new_index < index else max(new_index, 1)), allocs

    def job_allocations(self, job_id: str) -> list[Allocation]:
        """The allocations of a job."""
        call = f"job.allocations {job_id}"
        data = self._json(call, self._request(call, "job", _seg(job_id), "allocations"))
        return [self._parse(call, parse_allocation, a) for a in data or []]

    # --- jobs and nodes -------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """A job; raises NotFound when it does not exist."""
        call = f"job {job_id}"
        return self._parse(call, parse_job, self._json(call, self._request(call, "job", _seg(job_id))))

    def jobs(self) -> list[str]:
        """The IDs of every job in the namespace."""
        call = "jobs"
        return [str(j["ID"]) for j in self._json(call, self._request(call, "jobs")) or []]

    def nodes(self) -> list[NodeInfo]:
        """Every client node."""
        call = "nodes"
        return [
            self._parse(call, parse_node, n) for n in self._json(call, self._request(call, "nodes")) or []
        ]

    def node(self, node_id: str) -> NodeInfo:
        """One node; raises NotFound when it does not exist."""
        call = f"node {node_id}"
        return self._parse(call, parse_node, self._json(call, self._request(call, "node", _seg(node_id))))

    # --- lists a decision may rest on (garbage collection) --------------------------------------

    def list_jobs(self) -> Listing[JobStub]:
        """Every job of every namespace (``GET /v1/jobs?namespace=*``), from a server that knows the leader.

        Raises NomadError when the answer does not carry ``X-Nomad-KnownLeader: true``, as for any
        other failure: a view that may be stale or partial must not pass for the cluster's.
        """
        call = "jobs (all namespaces)"
        response = self._request(call, "jobs", params={"namespace": "*"})
        return self._listing(call, response, parse_job_stub)

    def list_nodes(self) -> Listing[NodeInfo]:
        """Every client node (``GET /v1/nodes``), from a server that knows the leader.

        The list stubs carry no ``StatusUpdatedAt``: :meth:`node_status` reads it for one node.
        """
        call = "nodes"
        return self._listing(call, self._request(call, "nodes"), parse_node)

    def node_status(self, node_id: str) -> Listing[NodeInfo]:
        """One node with its ``StatusUpdatedAt`` (``GET /v1/node/<id>``), from a server knowing the leader."""
        call = f"node {node_id}"
        response = self._request(call, "node", _seg(node_id))
        return self._listing(call, response, parse_node, single=True)

    def list_allocations(self, node_id: str | None = None) -> Listing[Allocation]:
        """The allocations of every namespace, or those on one node, from a server that knows the leader.

        ``GET /v1/allocations?namespace=*`` (stubs with task states), or ``GET /v1/node/<id>/allocations``.
        """
        if node_id is None:
            call = "allocations (all namespaces)"
            response = self._request(call, "allocations", params={"namespace": "*", "task_states": "true"})
        else:
            call = f"node.allocations {node_id}"
            response = self._request(call, "node", _seg(node_id), "allocations")
        return self._listing(call, response, parse_allocation)

    def _listing(
        self, call: str, response: requests.Response, parse: Callable[[Any], T], *, single: bool = False
    ) -> Listing[T]:
        leader = response.headers.get("X-Nomad-KnownLeader")
        if leader != "true":
            shown = "missing" if leader is None else repr(leader)
            raise NomadError(
                call,
                f"the answer may be stale or partial: X-Nomad-KnownLeader is {shown}, not 'true'",
                status=response.status_code,
                transient=True,
            )
        data = self._json(call, response)
        items = [data] if single else data or []
        try:
            index = int(response.headers.get("X-Nomad-Index", 0))
        except ValueError:
            index = 0
        return Listing(
            items=tuple(self._parse(call, parse, item) for item in items),
            index=index,
            server_time=_http_date(response.headers.get("Date")),
        )

    # --- actions and agent ----------------------------------------------------------------------

    def restart_task(self, alloc_id: str, task: str) -> None:
        """``POST /v1/client/allocation/<id>/restart`` with ``{"TaskName": task}``."""
        call = f"allocation.restart {alloc_id} task {task}"
        self._request(
            call, "client/allocation", _seg(alloc_id), "restart", method="post", json={"TaskName": task}
        )

    def agent_self(self) -> AgentInfo:
        """The local agent's node name, node ID, datacenter and region."""
        call = "agent.self"
        return self._parse(call, parse_agent, self._json(call, self._request(call, "agent", "self")))
