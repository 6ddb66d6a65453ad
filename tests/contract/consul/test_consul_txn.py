"""``PUT /v1/txn``: all-or-nothing KV transactions, their result and error shapes, the 64-op limit."""

from __future__ import annotations

import base64
import re
from typing import Any

import requests
from consul_contract import ConsulTarget

from shepard_lib.sim.consul import ConsulServer


def op(verb: str, key: str, value: bytes | None = None, **extra: Any) -> dict[str, Any]:
    """One KV operation in wire form."""
    kv: dict[str, Any] = {"Verb": verb, "Key": key, **extra}
    if value is not None:
        kv["Value"] = base64.b64encode(value).decode()
    return {"KV": kv}


def test_successful_txn_applies_every_op_and_returns_results(consul_target: ConsulTarget) -> None:
    a, b = consul_target.key("a"), consul_target.key("b")
    resp = consul_target.http("PUT", "/v1/txn", json=[op("set", a, b"1"), op("set", b, b"2"), op("get", a)])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["Errors"] is None
    results = [r["KV"] for r in body["Results"]]
    assert [r["Key"] for r in results] == [a, b, a]
    assert results[0]["Value"] is None  # writes answer without the value
    assert base64.b64decode(results[2]["Value"]) == b"1"
    assert results[0]["ModifyIndex"] == results[1]["ModifyIndex"] == results[2]["ModifyIndex"]


def test_failed_txn_is_409_and_applies_nothing(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    a, b = consul_target.key("a"), consul_target.key("b")
    c.kv.put(b, "old")
    stale = c.kv.get(b)[1]["ModifyIndex"] - 1
    ops = [
        op("set", a, b"new"),
        op("delete", b),
        op("cas", b, b"x", Index=stale),
        op("get", consul_target.key("z")),
    ]
    resp = consul_target.http("PUT", "/v1/txn", json=ops)
    assert resp.status_code == 409
    assert resp.json() == {
        "Results": None,
        "Errors": [
            {"OpIndex": 2, "What": f'failed to set key "{b}", index is stale'},
            {"OpIndex": 3, "What": f'key "{consul_target.key("z")}" doesn\'t exist'},
        ],
    }
    assert c.kv.get(a)[1] is None
    assert c.kv.get(b)[1]["Value"] == b"old"


def test_too_many_ops_is_413_and_64_is_always_fine(consul_target: ConsulTarget) -> None:
    """Consul allows 64 ops before 1.14 and 128 since; 64 is safe everywhere."""
    ops = [op("set", consul_target.key(f"k{i}"), b"v") for i in range(129)]
    resp = consul_target.http("PUT", "/v1/txn", json=ops)
    assert resp.status_code == 413
    assert re.fullmatch(r"Transaction contains too many operations \(129 > (64|128)\)", resp.text), resp.text
    assert consul_target.client().kv.get(consul_target.key("k0"))[1] is None
    resp = consul_target.http("PUT", "/v1/txn", json=ops[:64])
    assert resp.status_code == 200 and len(resp.json()["Results"]) == 64


def test_sim_limit_is_64_ops_by_default_and_configurable(sim_consul: ConsulTarget) -> None:
    """Sim-only: the default is the pre-1.14 limit; ``max_txn_ops=128`` mirrors Consul 1.14+."""
    ops = [op("set", sim_consul.key(f"k{i}"), b"v") for i in range(65)]
    resp = sim_consul.http("PUT", "/v1/txn", json=ops)
    assert (resp.status_code, resp.text) == (413, "Transaction contains too many operations (65 > 64)")
    with ConsulServer(sim_consul.state, max_txn_ops=128) as modern:
        assert requests.put(f"{modern.address}/v1/txn", json=ops, timeout=5).status_code == 200


def test_fenced_write_needs_the_slot_session(consul_target: ConsulTarget) -> None:
    """The trigger write of docs/design.md section 3: check-session on the slot plus set of the trigger."""
    c = consul_target.client()
    slot, trigger = consul_target.key("slot/0"), consul_target.key("trigger")
    holder, intruder = consul_target.session(), consul_target.session()
    c.kv.put(slot, "holder", acquire=holder)
    fenced = [op("check-session", slot, Session=holder), op("set", trigger, b"restart-1")]
    assert consul_target.http("PUT", "/v1/txn", json=fenced).status_code == 200
    intruding = [op("check-session", slot, Session=intruder), op("set", trigger, b"restart-2")]
    resp = consul_target.http("PUT", "/v1/txn", json=intruding)
    assert resp.status_code == 409
    assert resp.json()["Errors"] == [
        {
            "OpIndex": 0,
            "What": f'failed session check for key "{slot}", current session "{holder}" != "{intruder}"',
        }
    ]
    assert c.kv.get(trigger)[1]["Value"] == b"restart-1"


def test_lock_and_unlock_verbs(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("txnlock")
    s1, s2 = consul_target.session(), consul_target.session()
    resp = consul_target.http("PUT", "/v1/txn", json=[op("lock", key, b"v", Session=s1)])
    assert resp.status_code == 200 and resp.json()["Results"][0]["KV"]["LockIndex"] == 1
    resp = consul_target.http("PUT", "/v1/txn", json=[op("lock", key, b"v", Session=s2)])
    assert resp.json()["Errors"][0]["What"] == f'failed to lock key "{key}", lock is already held'
    resp = consul_target.http("PUT", "/v1/txn", json=[op("unlock", key, b"v", Session=s2)])
    assert resp.status_code == 409
    resp = consul_target.http("PUT", "/v1/txn", json=[op("unlock", key, b"done", Session=s1)])
    assert resp.status_code == 200
    assert "Session" not in c.kv.get(key)[1]


def test_lock_refused_by_lock_delay_reports_it(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("delay")
    holder, other = consul_target.session(lock_delay=30), consul_target.session()
    c.kv.put(key, "v", acquire=holder)
    c.session.destroy(holder)
    resp = consul_target.http("PUT", "/v1/txn", json=[op("lock", key, b"v", Session=other)])
    assert resp.status_code == 409
    assert resp.json()["Errors"] == [{"OpIndex": 0, "What": f'failed to lock key "{key}" due to lock delay'}]


def test_check_index_check_not_exists_and_delete_variants(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    a, tree = consul_target.key("a"), consul_target.key("tree/")
    c.kv.put(a, "1")
    c.kv.put(tree + "x", "x")
    modify = c.kv.get(a)[1]["ModifyIndex"]
    ok = [
        op("check-index", a, Index=modify),
        op("check-not-exists", consul_target.key("nope")),
        op("delete-tree", tree),
        op("delete-cas", a, Index=modify),
    ]
    resp = consul_target.http("PUT", "/v1/txn", json=ok)
    assert resp.status_code == 200, resp.text
    assert [r["KV"]["Key"] for r in resp.json()["Results"]] == [a]  # only check-index answers
    assert c.kv.get(a)[1] is None and c.kv.get(tree, recurse=True)[1] is None
    c.kv.put(a, "2")
    bad = [op("check-index", a, Index=1), op("check-not-exists", a), op("delete-cas", a, Index=1)]
    errors = consul_target.http("PUT", "/v1/txn", json=bad).json()["Errors"]
    current = c.kv.get(a)[1]["ModifyIndex"]
    assert errors == [
        {"OpIndex": 0, "What": f'failed index check for key "{a}", current modify index {current} != 1'},
        {"OpIndex": 1, "What": f'key "{a}" exists'},
        {"OpIndex": 2, "What": f'failed to delete key "{a}", index is stale'},
    ]


def test_get_tree_returns_every_entry_with_values(consul_target: ConsulTarget) -> None:
    c, prefix = consul_target.client(), consul_target.key("gt/")
    c.kv.put(prefix + "1", "one")
    c.kv.put(prefix + "2", "two")
    resp = consul_target.http("PUT", "/v1/txn", json=[op("get-tree", prefix)])
    values = [base64.b64decode(r["KV"]["Value"]) for r in resp.json()["Results"]]
    assert values == [b"one", b"two"]


def test_unparsable_body_and_unknown_verb(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("PUT", "/v1/txn", data=b"[{")
    assert resp.status_code == 400 and resp.text.startswith("Failed to parse body")
    resp = consul_target.http("PUT", "/v1/txn", json=[op("frobnicate", consul_target.key("k"))])
    assert resp.status_code == 409
    assert resp.json()["Errors"] == [{"OpIndex": 0, "What": 'unknown KV verb "frobnicate"'}]


def test_txn_through_python_consul2(consul_target: ConsulTarget) -> None:
    key = consul_target.key("py")
    result = consul_target.client().txn.put([op("set", key, b"v"), op("get", key)])
    assert base64.b64decode(result["Results"][1]["KV"]["Value"]) == b"v"
