"""ACLs of the simulated Consul: one management token, and the anonymous token with no rights.

A server started with ``acl_token`` behaves like Consul with ``acl.default_policy = "deny"`` and
an anonymous token without policies (``acl.enable_key_list_policy`` off):

- an unknown token is 403 ``ACL not found`` everywhere but ``/v1/status/*`` (``ResolveToken``);
- a request without a token runs as the anonymous token. Reads of one named thing and all writes
  are 403 with the text of ``acl.PermissionDeniedError.Error()`` (``acl/errors.go``); listings are
  filtered instead, so the anonymous token sees empty answers, and ``X-Consul-Results-Filtered-By-ACLs:
  true`` is set when something was removed (``setResultsFilteredByACLs`` in ``agent/http.go``:
  omitted when nothing was).

Per endpoint, as the RPC endpoints of ``agent/consul`` do it:

- ``KVS.Get`` (``kvs_endpoint.go``): ``KeyReadAllowed(key)`` fails: 403 ``key:read``, even for a
  missing key; ``KVS.Apply`` through ``kvsPreApply``: 403 ``key:write`` (delete-tree:
  ``KeyWritePrefixAllowed``, the same text);
- ``KVS.List`` / ``KVS.ListKeys``: ``FilterDirEnt`` leaves nothing, so ``?recurse`` and ``?keys``
  answer the bare 404 with ``X-Consul-Index`` (``?keys`` on the root: ``[]``);
- ``Txn.Apply`` / ``Txn.Read`` (``txn_endpoint.go``): ``preCheck`` runs ``kvsPreApply`` on every
  op and collects one error per op (409): check-index and check-session need ``key:read``, every
  verb but get/get-tree/get-or-empty ``key:write``; gets pass and their results are filtered out
  (``FilterTxnResults``);
- ``Session.Apply`` (``session_endpoint.go``): create needs ``session:write`` on the node; destroy
  of an unknown session is a no-op, of a known one needs ``session:write`` on its node;
  ``Session.Renew`` of an unknown session is the 404, of a known one 403;
  ``Session.Get``/``List``/``NodeSessions`` are filtered (``filterSessions``) to ``[]``;
- ``Health.ServiceNodes``/``ServiceChecks``/``NodeChecks`` and ``Catalog.ListNodes``/
  ``ListServices`` are filtered (``filterCheckServiceNodes``, ``filterHealthChecks``,
  ``filterNodes``, ``filterServices`` in ``acl.go``) to ``[]`` / ``{}``;
- ``/v1/agent/self`` needs ``AgentReadAllowed(node)``: 403 ``agent:read``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from shepard_lib.sim.httpbase import HTTPError

__all__ = ["ACL_NOT_FOUND", "check", "permission_denied", "visible"]

T = TypeVar("T")

ACL_NOT_FOUND = "ACL not found"
_ANONYMOUS_HINT = ". The anonymous token is used implicitly when a request does not specify a token."


def permission_denied(resource: str, level: str, name: str) -> HTTPError:
    """The 403 of ``PermissionDeniedByACL`` for the anonymous token (``level``: read or write)."""
    lacks = f"anonymous token lacks permission '{resource}:{level}' on \"{name}\""
    return HTTPError(403, f"Permission denied: {lacks}{_ANONYMOUS_HINT}")


def check(anonymous: bool, resource: str, level: str, name: str) -> None:
    """Raise the 403 when the request runs as the anonymous token (which may do nothing)."""
    if anonymous:
        raise permission_denied(resource, level, name)


def visible(anonymous: bool, items: Sequence[T]) -> tuple[list[T], bool]:
    """A listing as the request's token may see it, and whether ACLs removed anything."""
    if anonymous:
        return [], bool(items)
    return list(items), False
