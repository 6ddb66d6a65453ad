"""KV endpoint contract: GET/PUT/DELETE with their options, through python-consul2 and raw HTTP."""

from __future__ import annotations

import base64

import pytest
from consul_contract import ConsulTarget


def test_put_then_get_returns_value_and_raft_indexes(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("a")
    assert c.kv.put(key, "hello") is True
    index, entry = c.kv.get(key)
    assert entry["Value"] == b"hello"
    assert entry["Key"] == key
    assert entry["CreateIndex"] == entry["ModifyIndex"] == int(index)
    assert entry["LockIndex"] == 0 and entry["Flags"] == 0
    assert "Session" not in entry


def test_wire_value_is_base64_and_empty_value_is_null(consul_target: ConsulTarget) -> None:
    key = consul_target.key("b64")
    consul_target.http("PUT", f"/v1/kv/{key}", data=b"\x00\xffbin")
    body = consul_target.http("GET", f"/v1/kv/{key}").json()
    assert base64.b64decode(body[0]["Value"]) == b"\x00\xffbin"
    consul_target.http("PUT", f"/v1/kv/{key}", data=b"")
    assert consul_target.http("GET", f"/v1/kv/{key}").json()[0]["Value"] is None


def test_missing_key_is_404_with_index_header(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    c.kv.put(consul_target.key("present"), "x")
    resp = consul_target.http("GET", f"/v1/kv/{consul_target.key('absent')}")
    assert resp.status_code == 404
    assert resp.text == ""
    assert int(resp.headers["X-Consul-Index"]) >= 1
    index, value = c.kv.get(consul_target.key("absent"))
    assert value is None and int(index) >= 1


def test_index_is_never_zero_even_before_any_kv_write(sim_consul: ConsulTarget) -> None:
    """Sim-only: a fresh datacenter has a KV table index of 0, which Consul reports as 1."""
    for path in ("/v1/kv/nothing", "/v1/kv/nothing/?recurse", "/v1/kv/nothing/?keys"):
        resp = sim_consul.http("GET", path)
        assert resp.status_code == 404
        assert resp.headers["X-Consul-Index"] == "1", path


def test_raw_returns_the_bare_value_as_text_plain(consul_target: ConsulTarget) -> None:
    key = consul_target.key("raw")
    consul_target.client().kv.put(key, '{"a": 1}')
    resp = consul_target.http("GET", f"/v1/kv/{key}?raw")
    assert resp.status_code == 200
    assert resp.content == b'{"a": 1}'
    assert resp.headers["Content-Type"] == "text/plain"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_recurse_lists_the_prefix_in_key_order(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    for name in ("t/b", "t/a", "t/c/d", "u"):
        c.kv.put(consul_target.key(name), name)
    index, entries = c.kv.get(consul_target.key("t/"), recurse=True)
    assert [e["Key"] for e in entries] == [consul_target.key(n) for n in ("t/a", "t/b", "t/c/d")]
    assert int(index) == max(e["ModifyIndex"] for e in entries)
    assert c.kv.get(consul_target.key("none/"), recurse=True)[1] is None


def test_keys_with_separator_folds_subtrees(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    for name in ("k/a", "k/b/1", "k/b/2", "k/c/x/y"):
        c.kv.put(consul_target.key(name), "v")
    _, keys = c.kv.get(consul_target.key("k/"), keys=True, separator="/")
    assert keys == [consul_target.key(n) for n in ("k/a", "k/b/", "k/c/")]
    _, flat = c.kv.get(consul_target.key("k/"), keys=True)
    assert flat == [consul_target.key(n) for n in ("k/a", "k/b/1", "k/b/2", "k/c/x/y")]
    assert consul_target.http("GET", f"/v1/kv/{consul_target.key('nope/')}?keys").status_code == 404


def test_keys_of_an_empty_root_is_an_empty_list_not_404(sim_consul: ConsulTarget) -> None:
    """Sim-only (a real Consul's root is rarely empty)."""
    resp = sim_consul.http("GET", "/v1/kv/?keys")
    assert resp.status_code == 200 and resp.json() == []


def test_cas_zero_creates_only_when_absent(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("cas0")
    assert c.kv.put(key, "first", cas=0) is True
    assert c.kv.put(key, "second", cas=0) is False
    assert c.kv.get(key)[1]["Value"] == b"first"


def test_cas_index_must_match_modify_index(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("cas")
    c.kv.put(key, "v1")
    modify = c.kv.get(key)[1]["ModifyIndex"]
    assert c.kv.put(key, "stale", cas=modify - 1) is False
    assert c.kv.put(key, "v2", cas=modify) is True
    assert c.kv.put(key, "v3", cas=modify) is False
    assert c.kv.get(key)[1]["Value"] == b"v2"
    assert c.kv.put(consul_target.key("absent"), "x", cas=modify) is False


def test_flags_are_stored_and_a_plain_put_resets_them(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("flags")
    c.kv.put(key, "v", flags=42)
    assert c.kv.get(key)[1]["Flags"] == 42
    c.kv.put(key, "v")
    assert c.kv.get(key)[1]["Flags"] == 0


def test_rewriting_the_same_value_keeps_the_modify_index(consul_target: ConsulTarget) -> None:
    c, key = consul_target.client(), consul_target.key("same")
    c.kv.put(key, "v")
    before = c.kv.get(key)[1]["ModifyIndex"]
    c.kv.put(key, "v")
    assert c.kv.get(key)[1]["ModifyIndex"] == before
    c.kv.put(key, "w")
    assert c.kv.get(key)[1]["ModifyIndex"] > before


def test_delete_with_cas_and_recurse(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    key = consul_target.key("d/one")
    c.kv.put(key, "1")
    c.kv.put(consul_target.key("d/two/three"), "3")
    c.kv.put(consul_target.key("dd"), "keep")
    modify = c.kv.get(key)[1]["ModifyIndex"]
    assert c.kv.delete(key, cas=modify + 100) is False
    assert c.kv.get(key)[1] is not None
    assert c.kv.delete(key, cas=modify) is True
    assert c.kv.get(key)[1] is None
    assert c.kv.delete(consul_target.key("d/"), recurse=True) is True
    assert c.kv.get(consul_target.key("d/"), recurse=True)[1] is None
    assert c.kv.get(consul_target.key("dd"))[1]["Value"] == b"keep"


def test_delete_cas_of_a_missing_key_succeeds(consul_target: ConsulTarget) -> None:
    assert consul_target.client().kv.delete(consul_target.key("never"), cas=5) is True


def test_delete_of_a_missing_key_is_true(consul_target: ConsulTarget) -> None:
    assert consul_target.client().kv.delete(consul_target.key("never")) is True


@pytest.mark.parametrize("query", ["cas=0&acquire=x", "acquire=x&release=x", "cas=1&release=x"])
def test_conflicting_put_flags_are_400(consul_target: ConsulTarget, query: str) -> None:
    resp = consul_target.http("PUT", f"/v1/kv/{consul_target.key('c')}?{query}", data=b"v")
    assert resp.status_code == 400
    assert resp.text.startswith("Conflicting flags: ")


def test_delete_with_recurse_and_cas_is_400(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("DELETE", f"/v1/kv/{consul_target.key('c')}?recurse&cas=1")
    assert resp.status_code == 400 and resp.text.startswith("Conflicting flags: ")


def test_get_and_put_without_a_key_are_400(consul_target: ConsulTarget) -> None:
    for method in ("GET", "PUT"):
        resp = consul_target.http(method, "/v1/kv/")
        assert resp.status_code == 400 and resp.text == "Missing key name", method


def test_list_index_does_not_go_backwards_when_the_newest_key_is_deleted(consul_target: ConsulTarget) -> None:
    c = consul_target.client()
    c.kv.put(consul_target.key("g/a"), "a")
    c.kv.put(consul_target.key("g/b"), "b")
    before, _ = c.kv.get(consul_target.key("g/"), recurse=True)
    c.kv.delete(consul_target.key("g/b"))
    after, entries = c.kv.get(consul_target.key("g/"), recurse=True)
    assert [e["Key"] for e in entries] == [consul_target.key("g/a")]
    assert int(after) > int(before)
    keys_index, _ = c.kv.get(consul_target.key("g/"), keys=True)
    assert int(keys_index) == int(after)


def test_bad_flags_number_is_500_with_go_parse_error(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("PUT", f"/v1/kv/{consul_target.key('f')}?flags=abc", data=b"v")
    assert resp.status_code == 500
    assert 'parsing "abc": invalid syntax' in resp.text


def test_value_above_512_kib_is_413(consul_target: ConsulTarget) -> None:
    resp = consul_target.http("PUT", f"/v1/kv/{consul_target.key('big')}", data=b"x" * (512 * 1024 + 1))
    assert resp.status_code == 413
    assert "too large" in resp.text


def test_strict_keys_mode_rejects_percent_escapes_like_consul_1_21_5() -> None:
    """Sim-only: Consul 1.21.5 refuses keys outside ``[a-zA-Z0-9,_./-?&=]`` (hashicorp/consul#22822)."""
    import requests

    from shepard_lib.clock import Clock
    from shepard_lib.sim.consul import ConsulServer, ConsulState

    with ConsulServer(ConsulState(Clock()), strict_keys=True) as server:
        resp = requests.put(f"{server.address}/v1/kv/shepard/keys/web%2541/x", data=b"v", timeout=5)
        assert resp.status_code == 500
        assert resp.text == 'invalid key name, keys should respect the "^[a-zA-Z0-9,_./\\\\-?&=]+$" format.'
        plain = requests.put(f"{server.address}/v1/kv/shepard/keys/web-1/x", data=b"v", timeout=5)
        assert plain.json() is True
