"""``/v1/kv/<key>``: GET (``?recurse``, ``?keys``, ``?separator``, ``?raw``), PUT and DELETE.

Follows ``agent/kvs_endpoint.go`` (HTTP) and ``agent/consul/kvs_endpoint.go`` (RPC):

- a missing key, or an empty listing, is a bare 404 that still carries ``X-Consul-Index`` (the
  KV table index; an empty ``?keys`` listing of the root is ``[]``, not 404);
- a found key's index is its ModifyIndex; a listing's is the highest ModifyIndex or tombstone
  under the prefix (:meth:`KVStore.list_prefix`); never 0;
- ``?raw`` answers the bare value as ``text/plain`` with ``nosniff`` and a ``sandbox`` CSP;
- PUT answers ``true`` for a plain write and the outcome for ``?cas``/``?acquire``/``?release``;
  two of those flags together are a 400 ``Conflicting flags: <query>``; a bad number in
  ``?flags``/``?cas`` is a 500 with Go's ``strconv.ParseUint`` text; bodies above 512 KiB are 413;
- DELETE answers ``true`` except with ``?cas``; ``?recurse`` with ``?cas`` is a 400;
- with ``strict_keys`` the sim also refuses keys outside ``[a-zA-Z0-9,_./\\-?&=]`` as Consul
  1.21.5 does (500 ``invalid key name, ...``): percent-escaped keys break there;
- for the anonymous token (ACLs on, no token) a single-key GET, PUT and DELETE are 403 after the
  checks above, and listings are empty (see :mod:`.acl`).
"""

from __future__ import annotations

import base64
import re
from urllib.parse import urlencode

from shepard_lib.model import KVEntry
from shepard_lib.sim.consul import acl
from shepard_lib.sim.consul.http import Context, HTTPError, Request, Response, json_body, text_body
from shepard_lib.sim.consul.kv import KVError, key_names

PREFIX = "/v1/kv/"
KV_MAX_VALUE_SIZE = 512 * 1024
"""``kv_max_value_size`` default."""


def entry_json(entry: KVEntry) -> dict[str, object]:
    """``structs.DirEntry`` as JSON: base64 ``Value`` (null when empty), Session omitted when free."""
    out: dict[str, object] = {
        "LockIndex": entry.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
    if entry.session:
        out["Session"] = entry.session
    return out


STRICT_KEY_PATTERN = r"^[a-zA-Z0-9,_./\-?&=]+$"
"""The key check Consul 1.21.5 added (hashicorp/consul#22682; see issues #22822, #22835)."""
_STRICT_KEY = re.compile(STRICT_KEY_PATTERN)


def handle(ctx: Context, req: Request) -> Response:
    """Dispatch ``/v1/kv/`` by method."""
    key = req.path[len(PREFIX) :]
    if ctx.strict_keys and key and not _STRICT_KEY.match(key):
        quoted = STRICT_KEY_PATTERN.replace("\\", "\\\\")  # Go's %q
        raise HTTPError(500, f'invalid key name, keys should respect the "{quoted}" format.')
    if req.method == "GET":
        return _get_keys(ctx, req, key) if req.has("keys") else _get(ctx, req, key)
    if req.method == "PUT":
        return _put(ctx, req, key)
    if req.method == "DELETE":
        return _delete(ctx, req, key)
    raise HTTPError(405, f"method {req.method} not allowed")


def _get(ctx: Context, req: Request, key: str) -> Response:
    recurse = req.has("recurse")
    if not recurse and not key:
        raise HTTPError(400, "Missing key name")
    if not recurse:
        acl.check(req.anonymous, "key", "read", key)
    kv = ctx.state.kv
    if recurse:
        index, entries, opts = ctx.blocking(req, lambda: kv.list_prefix(key))
    else:

        def one() -> tuple[int, list[KVEntry]]:
            idx, entry = kv.get_index(key)
            return idx, [entry] if entry else []

        index, entries, opts = ctx.blocking(req, one)
    entries, filtered = acl.visible(req.anonymous, entries)
    headers = ctx.meta_headers(index, opts, filtered=filtered)
    if not entries:
        return text_body(404, "", headers)
    if req.has("raw") and not recurse:
        headers.update({"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})
        return Response(200, entries[0].value or b"", "text/plain", headers)
    return json_body([entry_json(e) for e in entries], headers=headers)


def _get_keys(ctx: Context, req: Request, prefix: str) -> Response:
    separator = req.arg("separator") if req.has("separator") else req.arg("seperator")
    kv = ctx.state.kv
    # Consul's ListKeys reads every entry under the prefix, so a change of a value there wakes it
    # too (the index moves), not only a change of the names.
    index, entries, opts = ctx.blocking(req, lambda: kv.list_prefix(prefix))
    keys, filtered = acl.visible(req.anonymous, key_names(entries, prefix, separator))
    headers = ctx.meta_headers(index, opts, filtered=filtered)
    if not keys and prefix:
        return text_body(404, "", headers)
    return json_body(keys, headers=headers)


def _put(ctx: Context, req: Request, key: str) -> Response:
    if not key:
        raise HTTPError(400, "Missing key name")
    _reject_conflicting(req, "cas", "acquire", "release")
    flags = _uint(req, "flags") if req.has("flags") else 0
    if len(req.body) > KV_MAX_VALUE_SIZE:
        raise HTTPError(
            413,
            f"Request body({len(req.body)} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. See "
            "https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
        )
    cas = _uint(req, "cas") if req.has("cas") else 0
    acl.check(req.anonymous, "key", "write", key)
    state, value = ctx.state, req.body
    try:
        if req.has("cas"):
            ok = state.kv_cas(key, value, flags, cas)
        elif req.has("acquire"):
            ok = state.kv_acquire(key, value, flags, req.arg("acquire"))
        elif req.has("release"):
            ok = state.kv_release(key, value, flags, req.arg("release"))
        else:
            state.kv_put(key, value, flags)
            ok = True
    except KVError as exc:
        raise HTTPError(500, str(exc)) from None
    return json_body(ok)


def _delete(ctx: Context, req: Request, key: str) -> Response:
    _reject_conflicting(req, "recurse", "cas")
    state = ctx.state
    if not key and not req.has("recurse"):
        raise HTTPError(400, "Missing key name")
    cas = _uint(req, "cas") if req.has("cas") else None
    acl.check(req.anonymous, "key", "write", key)
    if req.has("recurse"):
        state.kv_delete_tree(key)
    elif cas is not None:
        return json_body(state.kv_delete_cas(key, cas))
    else:
        state.kv_delete(key)
    return json_body(True)


def _reject_conflicting(req: Request, *flags: str) -> None:
    """``conflictingFlags``: at most one of ``flags`` may be given."""
    if sum(1 for f in flags if req.has(f)) > 1:
        pairs = sorted((k, v) for k, values in req.query.items() for v in values)
        raise HTTPError(400, f"Conflicting flags: {urlencode(pairs)}\n")


def _uint(req: Request, name: str) -> int:
    """``strconv.ParseUint(v, 10, 64)``; its error is a 500 with Go's text."""
    text = req.arg(name)
    if not text.isdigit() or int(text) >= 2**64:
        reason = "value out of range" if text.isdigit() else "invalid syntax"
        raise HTTPError(500, f'strconv.ParseUint: parsing "{text}": {reason}')
    return int(text)
