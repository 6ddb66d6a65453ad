"""``PUT /v1/txn``: atomic KV transactions.

Follows ``agent/txn_endpoint.go``: the body is a JSON list of ``{"KV": {...}}`` operations with
fields matched case-insensitively and base64 ``Value``; an unreadable body is a 400
``Failed to parse body: ...``; more than ``max_txn_ops`` operations is a 413 ``Transaction
contains too many operations (N > max)`` (``maxTxnOps``: 64 up to Consul 1.13, 128 since 1.14 after
hashicorp/consul#14599; the sim defaults to 64, the strictest, so batches that pass it pass any
Consul); a rolled-back transaction is a 409 whose body is
``{"Results": null, "Errors": [{"OpIndex": i, "What": "..."}]}``; success is a 200 with
``{"Results": [{"KV": {...}}], "Errors": null}``. A transaction of reads only answers with the
``X-Consul-KnownLeader``/``X-Consul-LastContact`` headers and the read response's extra fields,
as ``Txn.Read`` does. Only KV operations are simulated. For the anonymous token (ACLs on, no
token) every op but a get fails ``preCheck`` with its own 403 text (a 409 listing them all), and
gets succeed with their results filtered out (see :mod:`.acl`).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from shepard_lib.model import TxnVerb
from shepard_lib.sim.consul import acl
from shepard_lib.sim.consul.http import Context, HTTPError, Request, Response, json_body
from shepard_lib.sim.consul.kv_api import KV_MAX_VALUE_SIZE, entry_json
from shepard_lib.sim.consul.txn import GET_OR_EMPTY, READ_VERBS, KVOp

_UNCHECKED_VERBS = frozenset({TxnVerb.GET, TxnVerb.GET_TREE, GET_OR_EMPTY})
"""Verbs ``kvsPreApply`` lets through: their results are filtered on the way out instead."""


def handle(ctx: Context, req: Request) -> Response:
    """Apply the transaction in the body."""
    if req.method != "PUT":
        raise HTTPError(405, f"method {req.method} not allowed")
    try:
        raw = json.loads(req.body or b"null")
    except ValueError as exc:
        raise HTTPError(400, f"Failed to parse body: {exc}") from None
    if not isinstance(raw, list):
        raise HTTPError(400, "Failed to parse body: json: cannot unmarshal into Go value of type api.TxnOps")
    if len(raw) > ctx.max_txn_ops:
        raise HTTPError(413, f"Transaction contains too many operations ({len(raw)} > {ctx.max_txn_ops})")
    ops = [_decode_op(item) for item in raw]
    denied = _pre_check(req.anonymous, ops)
    if denied:
        return json_body({"Results": None, "Errors": denied}, status=409)
    outcome = ctx.state.txn(ops)
    read_only = all(op.verb in READ_VERBS for op in ops)
    results, _ = acl.visible(req.anonymous, outcome.results)
    headers: dict[str, str] = {}
    body: dict[str, Any] = {
        "Results": [{"KV": entry_json(e)} for e in results] if not outcome.errors else None,
        "Errors": [{"OpIndex": i, "What": what} for i, what in outcome.errors] or None,
    }
    if read_only:
        meta = ctx.meta_headers(ctx.state.index)
        headers = {k: meta[k] for k in ("X-Consul-KnownLeader", "X-Consul-LastContact")}
        body.update(
            {"Index": 0, "LastContact": 0, "KnownLeader": not ctx.faults.leader_lost, "ConsistencyLevel": ""}
        )
    return json_body(body, status=409 if outcome.errors else 200, headers=headers)


def _pre_check(anonymous: bool, ops: list[KVOp]) -> list[dict[str, object]]:
    """``Txn.preCheck`` for the anonymous token: one error per op that ``kvsPreApply`` refuses."""
    if not anonymous:
        return []
    errors: list[dict[str, object]] = []
    for i, op in enumerate(ops):
        if op.verb in _UNCHECKED_VERBS:
            continue
        level = "read" if op.verb in (TxnVerb.CHECK_INDEX, TxnVerb.CHECK_SESSION) else "write"
        errors.append({"OpIndex": i, "What": acl.permission_denied("key", level, op.key).text})
    return errors


def _decode_op(item: object) -> KVOp:
    kv = _field(item, "kv")
    if not isinstance(kv, dict):
        raise HTTPError(400, "Failed to parse body: only KV operations are simulated")
    value = _field(kv, "value")
    data: bytes | None = None
    if value is not None:
        if not isinstance(value, str):
            raise HTTPError(400, f"Failed to parse body: unexpected value type: {type(value).__name__}")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPError(400, f"Failed to parse body: failed to decode value: {exc}") from None
    key = str(_field(kv, "key") or "")
    if data is not None and len(data) > KV_MAX_VALUE_SIZE:
        raise HTTPError(413, f'Value for key "{key}" is too large ({len(data)} > {KV_MAX_VALUE_SIZE} bytes)')
    try:
        index, flags = int(str(_field(kv, "index") or 0)), int(str(_field(kv, "flags") or 0))
    except (TypeError, ValueError) as exc:
        raise HTTPError(400, f"Failed to parse body: {exc}") from None
    return KVOp(str(_field(kv, "verb") or ""), key, data, index, str(_field(kv, "session") or ""), flags)


def _field(obj: object, name: str) -> object:
    if not isinstance(obj, dict):
        return None
    return next((v for k, v in obj.items() if k.lower() == name), None)
