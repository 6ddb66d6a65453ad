"""``/v1/session/*``: create, destroy, renew, info, list, node.

Follows ``agent/session_endpoint.go``:

- create defaults to the agent's node, ``serfHealth``, LockDelay 15 s and behavior ``release``;
  body fields match case-insensitively (mapstructure), so python-consul2's lowercase keys work;
  ``LockDelay`` is a Go duration string or a number of nanoseconds, where values below 1000 are
  taken as seconds (``FixupLockDelay``); only a ``Checks`` key drops the default ``serfHealth``
  (``FixupChecks``), which ``NodeChecks`` add to (``Session.CheckIDs`` merges all three lists; the
  sim shows the merged node checks as ``NodeChecks``); a bad body is a 400
  ``Request decode failed: ...``; rejections from ``Session.Apply`` are 500s with its text;
- destroy answers ``true``, also for an unknown session;
- renew answers the one-element session list, or 404 ``Session id '<id>' not found``;
- info, list and node are blocking reads on the sessions table index; info of an unknown
  session is ``[]``;
- the anonymous token (ACLs on, no token) may not create, renew or destroy a session (403
  ``session:write`` on its node; destroying or renewing an unknown one answers as without ACLs)
  and sees no sessions (see :mod:`.acl`).
"""

from __future__ import annotations

import json
from typing import Any

from shepard_lib.durations import parse_go_duration
from shepard_lib.sim.consul import acl
from shepard_lib.sim.consul.faults import RPC_FAILED
from shepard_lib.sim.consul.http import Context, HTTPError, Request, Response, json_body
from shepard_lib.sim.consul.sessions import (
    DEFAULT_LOCK_DELAY,
    SERF_CHECK_ID,
    ServiceCheckRef,
    Session,
    SessionError,
    validate_request,
)

LOCK_DELAY_MIN_THRESHOLD = 1000
"""``lockDelayMinThreshold`` (nanoseconds): smaller numbers are seconds."""


def handle(ctx: Context, req: Request) -> Response:
    """Dispatch ``/v1/session/<verb>[/<arg>]``."""
    verb, _, arg = req.path[len("/v1/session/") :].partition("/")
    if verb == "create" and req.method == "PUT":
        return _create(ctx, req)
    if verb == "destroy" and req.method == "PUT":
        return _destroy(ctx, req, arg)
    if verb == "renew" and req.method == "PUT":
        return _renew(ctx, req, arg)
    if verb in ("info", "list", "node") and req.method == "GET":
        return _read(ctx, req, verb, arg)
    raise HTTPError(
        405 if verb in ("create", "destroy", "renew", "info", "list", "node") else 404,
        f"method {req.method} not allowed" if verb else "Not found",
    )


def _create(ctx: Context, req: Request) -> Response:
    fields: dict[str, Any] = {}
    if req.body:
        try:
            raw = json.loads(req.body)
            if not isinstance(raw, dict):
                raise ValueError(f"'' expected a map, got '{type(raw).__name__}'")
            fields = {k.lower(): v for k, v in raw.items()}
            lock_delay = _lock_delay(fields.get("lockdelay", DEFAULT_LOCK_DELAY * 1e9))
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
    else:
        lock_delay = DEFAULT_LOCK_DELAY
    checks = (fields.get("checks") or []) if "checks" in fields else [SERF_CHECK_ID]
    node_checks = list(dict.fromkeys([*checks, *(fields.get("nodechecks") or [])]))
    service_checks = [
        ServiceCheckRef(str(_ci(c, "id")), str(_ci(c, "namespace") or ""))
        for c in fields.get("servicechecks") or []
    ]
    node = str(fields.get("node") or ctx.node_name)
    acl.check(req.anonymous, "session", "write", node)
    try:
        request = validate_request(
            node=node,
            behavior=str(fields.get("behavior") or ""),
            ttl=str(fields.get("ttl") or ""),
            ttl_min=ctx.state.session_ttl_min,
            name=str(fields.get("name") or ""),
            lock_delay=lock_delay,
            node_checks=[str(c) for c in node_checks],
            service_checks=service_checks,
        )
        session = ctx.state.session_create(request)
    except SessionError as exc:
        raise HTTPError(500, str(exc)) from None
    return json_body({"ID": session.id})


def _destroy(ctx: Context, req: Request, session_id: str) -> Response:
    if not session_id:
        raise HTTPError(400, "Missing session")
    _check_write(ctx, req, session_id)
    ctx.state.session_destroy(session_id)
    return json_body(True)


def _renew(ctx: Context, req: Request, session_id: str) -> Response:
    if not session_id:
        raise HTTPError(400, "Missing session")
    if ctx.faults.renewals_paused(session_id):
        raise HTTPError(500, RPC_FAILED)
    _check_write(ctx, req, session_id)
    session = ctx.state.session_renew(session_id)
    if session is None:
        raise HTTPError(404, f"Session id '{session_id}' not found")
    return json_body([session.to_json()])


def _check_write(ctx: Context, req: Request, session_id: str) -> None:
    """``SessionWriteAllowed`` on an existing session's node (an unknown session is not checked)."""
    if req.anonymous:
        existing = ctx.state.read(lambda: ctx.state.sessions.get(session_id))
        if existing is not None:
            raise acl.permission_denied("session", "write", existing.node)


def _read(ctx: Context, req: Request, verb: str, arg: str) -> Response:
    if verb in ("info", "node") and not arg:
        raise HTTPError(400, "Missing node name" if verb == "node" else "Missing session")
    table = ctx.state.sessions

    def read() -> tuple[int, list[Session]]:
        if verb == "info":
            found = table.get(arg)
            sessions = [found] if found else []
        elif verb == "node":
            sessions = table.for_node(arg)
        else:
            sessions = table.all()
        return table.table_index, sessions

    index, sessions, opts = ctx.blocking(req, read)
    sessions, filtered = acl.visible(req.anonymous, sessions)
    headers = ctx.meta_headers(index, opts, filtered=filtered)
    return json_body([s.to_json() for s in sessions], headers=headers)


def _lock_delay(value: object) -> float:
    """``FixupLockDelay``: seconds from a duration string or a nanosecond count (small: seconds)."""
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return seconds if seconds * 1e9 >= LOCK_DELAY_MIN_THRESHOLD else seconds * 1e9
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1e9 if value >= LOCK_DELAY_MIN_THRESHOLD else float(value)
    raise ValueError(f"'LockDelay' expected type 'time.Duration', got '{type(value).__name__}'")


def _ci(obj: object, name: str) -> object:
    """A field of a JSON object matched case-insensitively (``None`` when absent)."""
    if not isinstance(obj, dict):
        return None
    return next((v for k, v in obj.items() if k.lower() == name), None)
