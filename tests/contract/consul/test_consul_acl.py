"""ACLs with ``default_policy = deny``: what the anonymous token (no token given) and an unknown token get.

Runs against the sim with ACLs on and, with ``CONSUL_HTTP_ADDR`` and ``CONSUL_HTTP_TOKEN`` set,
against a real Consul whose anonymous token may not read KV. Texts are compared exactly only on
the sim: real Consul versions word the 403 differently after ``Permission denied``.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
import requests
from consul_contract import ConsulException, ConsulTarget, anonymous_client

FILTERED = "X-Consul-Results-Filtered-By-ACLs"


def anonymous(target: ConsulTarget, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A request without any token."""
    return requests.request(method, target.address + path, timeout=30, **kwargs)


def assert_denied(resp: requests.Response, target: ConsulTarget, resource: str, name: str) -> None:
    """A 403 ``Permission denied``; on the sim, with the exact text of ``PermissionDeniedError``."""
    assert resp.status_code == 403, (resp.status_code, resp.text)
    assert resp.text.startswith("Permission denied"), resp.text
    if target.kind == "sim":
        assert resp.text == (
            f"Permission denied: anonymous token lacks permission '{resource}' on \"{name}\". "
            "The anonymous token is used implicitly when a request does not specify a token."
        )


def test_an_unknown_token_is_acl_not_found_everywhere(acl_consul: ConsulTarget) -> None:
    wrong = {"X-Consul-Token": str(uuid.uuid4())}
    key = acl_consul.key("k")
    txn = [{"KV": {"Verb": "get", "Key": key}}]
    for method, path, body in (
        ("GET", f"/v1/kv/{key}", None),
        ("GET", f"/v1/kv/{acl_consul.prefix}?recurse", None),
        ("PUT", f"/v1/kv/{key}", None),
        ("GET", "/v1/catalog/nodes", None),
        ("GET", "/v1/health/service/consul", None),
        ("GET", "/v1/session/list", None),
        ("PUT", "/v1/session/create", None),
        ("PUT", "/v1/txn", txn),
    ):
        resp = requests.request(method, acl_consul.address + path, headers=wrong, json=body, timeout=30)
        assert (resp.status_code, resp.text) == (403, "ACL not found"), path


def test_anonymous_single_key_read_is_denied_even_for_a_missing_key(acl_consul: ConsulTarget) -> None:
    key, missing = acl_consul.key("present"), acl_consul.key("missing")
    acl_consul.client().kv.put(key, "v")
    assert_denied(anonymous(acl_consul, "GET", f"/v1/kv/{key}"), acl_consul, "key:read", key)
    assert_denied(anonymous(acl_consul, "GET", f"/v1/kv/{missing}"), acl_consul, "key:read", missing)
    assert_denied(anonymous(acl_consul, "GET", f"/v1/kv/{key}?raw"), acl_consul, "key:read", key)


def test_anonymous_writes_are_denied_and_change_nothing(acl_consul: ConsulTarget) -> None:
    key = acl_consul.key("guarded")
    c = acl_consul.client()
    c.kv.put(key, "original")
    for method, query in (("PUT", ""), ("PUT", "?cas=0"), ("DELETE", ""), ("DELETE", "?cas=1")):
        resp = anonymous(acl_consul, method, f"/v1/kv/{key}{query}", data=b"changed")
        assert_denied(resp, acl_consul, "key:write", key)
    resp = anonymous(acl_consul, "DELETE", f"/v1/kv/{acl_consul.prefix}?recurse")
    assert_denied(resp, acl_consul, "key:write", acl_consul.prefix)
    assert c.kv.get(key)[1]["Value"] == b"original"


def test_anonymous_recurse_and_keys_are_filtered_to_a_404_with_the_index(acl_consul: ConsulTarget) -> None:
    prefix = acl_consul.key("dir/")
    c = acl_consul.client()
    c.kv.put(prefix + "a", "1")
    c.kv.put(prefix + "b", "2")
    index, entries = c.kv.get(prefix, recurse=True)
    assert len(entries) == 2
    for query in ("?recurse", "?keys", "?keys&separator=/"):
        resp = anonymous(acl_consul, "GET", f"/v1/kv/{prefix}{query}")
        assert (resp.status_code, resp.text) == (404, ""), query
        assert resp.headers["X-Consul-Index"] == index, query
        assert resp.headers.get(FILTERED) == "true", query


def test_an_empty_listing_is_not_marked_as_filtered(acl_consul: ConsulTarget) -> None:
    resp = anonymous(acl_consul, "GET", f"/v1/kv/{acl_consul.key('nothing/')}?recurse")
    assert resp.status_code == 404
    assert int(resp.headers["X-Consul-Index"]) >= 1
    assert FILTERED not in resp.headers


def test_anonymous_may_not_create_renew_or_destroy_sessions(acl_consul: ConsulTarget) -> None:
    with_token = acl_consul.client()
    node = acl_consul.node_name()
    assert_denied(anonymous(acl_consul, "PUT", "/v1/session/create"), acl_consul, "session:write", node)
    with pytest.raises(ConsulException, match="Permission denied"):
        anonymous_client(acl_consul.address).session.create()
    session_id = acl_consul.session(ttl=60)
    for verb in ("renew", "destroy"):
        resp = anonymous(acl_consul, "PUT", f"/v1/session/{verb}/{session_id}")
        assert_denied(resp, acl_consul, "session:write", node)
    assert with_token.session.info(session_id)[1]["ID"] == session_id
    unknown = str(uuid.uuid4())
    assert anonymous(acl_consul, "PUT", f"/v1/session/renew/{unknown}").status_code == 404


def test_anonymous_txn_fails_every_write_and_check_and_applies_nothing(acl_consul: ConsulTarget) -> None:
    key = acl_consul.key("txn")
    acl_consul.client().kv.put(key, "before")
    value = base64.b64encode(b"after").decode()
    ops = [
        {"KV": {"Verb": "set", "Key": key, "Value": value}},
        {"KV": {"Verb": "get", "Key": key}},
        {"KV": {"Verb": "check-index", "Key": key, "Index": 1}},
    ]
    resp = anonymous(acl_consul, "PUT", "/v1/txn", json=ops)
    assert resp.status_code == 409
    body = resp.json()
    assert body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [0, 2]
    assert all(e["What"].startswith("Permission denied") for e in body["Errors"])
    if acl_consul.kind == "sim":
        assert "'key:write'" in body["Errors"][0]["What"] and "'key:read'" in body["Errors"][1]["What"]
    assert acl_consul.client().kv.get(key)[1]["Value"] == b"before"


def test_anonymous_txn_gets_succeed_with_their_results_filtered_out(acl_consul: ConsulTarget) -> None:
    key = acl_consul.key("txn-read")
    acl_consul.client().kv.put(key, "secret")
    resp = anonymous(acl_consul, "PUT", "/v1/txn", json=[{"KV": {"Verb": "get", "Key": key}}])
    assert resp.status_code == 200, resp.text
    assert not resp.json()["Results"]
    assert "secret" not in resp.text and base64.b64encode(b"secret").decode() not in resp.text


def test_anonymous_agent_self_is_denied_but_status_needs_no_token(acl_consul: ConsulTarget) -> None:
    node = acl_consul.node_name()
    assert_denied(anonymous(acl_consul, "GET", "/v1/agent/self"), acl_consul, "agent:read", node)
    assert anonymous(acl_consul, "GET", "/v1/status/leader").status_code == 200


def test_anonymous_session_health_and_catalog_lists_are_empty_and_marked_filtered(
    acl_consul: ConsulTarget,
) -> None:
    """Sim-only: real clusters often grant the anonymous token node and service reads for DNS."""
    if acl_consul.kind != "sim":
        pytest.skip("sim-only: the real anonymous policy may allow catalog reads")
    state = acl_consul.state
    state.register_node("n1")
    state.register_service("n1", "web-1", "web", 80, check_id="web-1-c")
    session_id = acl_consul.session(ttl=60)
    expected: list[tuple[str, object]] = [
        ("/v1/session/list", []),
        (f"/v1/session/info/{session_id}", []),
        (f"/v1/session/node/{state.server_node}", []),
        ("/v1/health/service/web", []),
        ("/v1/health/checks/web", []),
        ("/v1/health/node/n1", []),
        ("/v1/catalog/nodes", []),
        ("/v1/catalog/services", {}),
    ]
    for path, empty in expected:
        resp = anonymous(acl_consul, "GET", path)
        assert (resp.status_code, resp.json()) == (200, empty), path
        assert resp.headers.get(FILTERED) == "true", path
        assert int(resp.headers["X-Consul-Index"]) >= 1, path
    resp = anonymous(acl_consul, "GET", "/v1/health/service/no-such-service")
    assert resp.json() == [] and FILTERED not in resp.headers


def test_the_management_token_is_read_from_the_query_header_or_bearer(acl_consul: ConsulTarget) -> None:
    url, token = f"{acl_consul.address}/v1/kv/{acl_consul.key('k')}", acl_consul.token
    assert requests.get(url, headers={"X-Consul-Token": token}, timeout=10).status_code == 404
    assert requests.get(url, headers={"x-consul-token": token}, timeout=10).status_code == 404
    assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 404
    # Only the first word after "Bearer" is the token (RFC 6750 tokens have no spaces).
    bearer = {"Authorization": f"bearer {token} trailing-words"}
    assert requests.get(url, headers=bearer, timeout=10).status_code == 404
    assert requests.get(f"{url}?token={token}", timeout=10).status_code == 404
    assert acl_consul.client().kv.put(acl_consul.key("k"), "v") is True
