"""ConsulBackend over real HTTP against a scripted server: wire format, retries, errors, secrets.

These run under python-consul2 and, in CI's second venv, under py-consul: both install the
``consul`` package whose transport the backend uses.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator

import pytest
import requests
from scripted_http import FAST_RETRY, HookClock, Reply, ScriptedServer, refusing_socket

from shepard_lib.backends._http import NO_RETRY
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig
from shepard_lib.errors import ConsulError
from shepard_lib.model import CheckStatus, SessionBehavior, TxnOp, TxnVerb

TOKEN = "5e3ca1f0-tok3n-never-shown"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kv_json(key: str, value: str | None, modify: int = 7, session: str | None = None) -> dict[str, object]:
    item: dict[str, object] = {
        "Key": key,
        "Value": None if value is None else b64(value),
        "CreateIndex": 5,
        "ModifyIndex": modify,
        "LockIndex": 1,
        "Flags": 3,
    }
    if session:
        item["Session"] = session
    return item


@pytest.fixture
def consul(server: ScriptedServer) -> Iterator[ConsulBackend]:
    backend = ConsulBackend(
        ConsulConfig(address=server.address, token=TOKEN), Clock(scale=100), retry=FAST_RETRY
    )
    yield backend
    backend.close()


# --- wire format ------------------------------------------------------------------------------


def test_get_decodes_the_base64_value_and_metadata(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(200, [kv_json("shepard/a", "hello", session="s-1")], {"X-Consul-Index": "7"}))
    entry = consul.get("shepard/a", consistent=True)
    assert entry is not None
    assert (entry.key, entry.value, entry.modify_index, entry.lock_index, entry.flags, entry.session) == (
        "shepard/a",
        b"hello",
        7,
        1,
        3,
        "s-1",
    )
    request = server.requests[0]
    assert (request.method, request.path) == ("GET", "/v1/kv/shepard/a")
    assert "consistent" in request.query
    assert request.headers["x-consul-token"] == TOKEN
    assert "token" not in request.query


def test_get_of_a_missing_key_is_none_and_a_null_value_is_none(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    server.script(Reply(404, "", {"X-Consul-Index": "3"}), Reply(200, [kv_json("a", None)]))
    assert consul.get("a") is None
    entry = consul.get("a")
    assert entry is not None and entry.value is None and entry.text() == ""


def test_get_tree_and_keys_send_recurse_and_keys(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(
        Reply(200, [kv_json("p/a", "1"), kv_json("p/b", "2")]),
        Reply(404, "", {"X-Consul-Index": "3"}),
        Reply(200, ["p/a", "p/sub/"]),
    )
    assert [e.value for e in consul.get_tree("p/")] == [b"1", b"2"]
    assert consul.get_tree("q/") == []
    assert consul.keys("p/", separator="/") == ["p/a", "p/sub/"]
    assert "recurse" in server.requests[0].query
    assert "keys" in server.requests[2].query and server.requests[2].param("separator") == "/"


def test_put_sends_the_raw_body_with_cas_and_flags(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(200, True), Reply(200, False))
    assert consul.put("k", b"\x00\xffbin", cas=0, flags=9) is True
    assert consul.put("k", "text", cas=12) is False
    first, second = server.requests
    assert (first.method, first.body, first.param("cas"), first.param("flags")) == (
        "PUT",
        b"\x00\xffbin",
        "0",
        "9",
    )
    assert (second.body, second.param("cas"), second.param("flags")) == (b"text", "12", None)


def test_acquire_release_and_delete_use_the_lock_parameters(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    server.script(Reply(200, True), Reply(200, True), Reply(200, True))
    assert consul.acquire("lock", "holder", "sess-1") is True
    assert consul.release("lock", "sess-1") is True
    assert consul.delete("tree/", recurse=True, cas=4) is True
    acquire, release, delete = server.requests
    assert (acquire.param("acquire"), acquire.body) == ("sess-1", b"holder")
    assert (release.param("release"), release.body) == ("sess-1", b"")
    assert (delete.method, delete.param("cas")) == ("DELETE", "4") and "recurse" in delete.query


def test_watch_sends_index_and_wait_and_returns_the_new_index(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    server.script(
        Reply(200, [kv_json("k", "v")], {"X-Consul-Index": "42"}),
        Reply(404, "", {"X-Consul-Index": "50"}),
        Reply(200, [kv_json("k", "v")], {"X-Consul-Index": "3"}),
    )
    assert consul.watch("k", 41, 0.3)[0] == 42
    assert consul.watch("k/", 42, 5, recurse=True) == (50, [])
    assert consul.watch("k", 50, 5)[0] == 0, "an index that went backwards resets to 0"
    first, second, _ = server.requests
    assert (first.param("index"), first.param("wait")) == ("41", "300ms")
    assert (second.param("index"), second.param("wait")) == ("42", "5s") and "recurse" in second.query


def test_watch_with_index_zero_does_not_block(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(200, [kv_json("k", "v")], {"X-Consul-Index": "0"}))
    assert consul.watch("k", 0, 60)[0] == 1, "a zero index is sanitised to 1"
    assert "index" not in server.requests[0].query and "wait" not in server.requests[0].query


def test_txn_encodes_ops_and_sends_the_token_header(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(200, {"Results": [{"KV": kv_json("t", "new", modify=9)}], "Errors": None}))
    result = consul.txn(
        [
            TxnOp(TxnVerb.CHECK_SESSION, "slot/0", session="s-1"),
            TxnOp(TxnVerb.SET, "t", value=b"new"),
            TxnOp(TxnVerb.CAS, "u", value=b"x", index=4, flags=1),
        ]
    )
    assert result.ok and [e.value for e in result.results] == [b"new"]
    request = server.requests[0]
    assert (request.method, request.path) == ("PUT", "/v1/txn")
    assert request.headers.get("x-consul-token") == TOKEN, (
        "py-consul's txn.put drops the token; ours must not"
    )
    assert request.json() == [
        {"KV": {"Verb": "check-session", "Key": "slot/0", "Session": "s-1"}},
        {"KV": {"Verb": "set", "Key": "t", "Value": b64("new")}},
        {"KV": {"Verb": "cas", "Key": "u", "Value": b64("x"), "Index": 4, "Flags": 1}},
    ]


def test_a_txn_whose_answer_was_lost_is_not_sent_twice(server: ScriptedServer, consul: ConsulBackend) -> None:
    """A 500 after the trigger txn may come after it applied: a second fresh value would restart twice."""
    server.script(Reply(500, "rpc error making call: EOF"), Reply(200, {"Results": [], "Errors": None}))
    with pytest.raises(ConsulError) as failure:
        consul.txn([TxnOp(TxnVerb.SET, "t", value=b"new")])
    assert not failure.value.transient
    assert len(server.requests) == 1, f"the txn was sent {len(server.requests)} times"


def test_txn_rollback_is_a_result_not_an_error(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(
        Reply(409, {"Results": None, "Errors": [{"OpIndex": 0, "What": 'lock "slot/0" is not held'}]})
    )
    result = consul.txn(
        [TxnOp(TxnVerb.CHECK_SESSION, "slot/0", session="s-1"), TxnOp(TxnVerb.SET, "t", b"v")]
    )
    assert not result.ok and result.errors == ((0, 'lock "slot/0" is not held'),)
    assert len(server.requests) == 1, "a rollback is an answer: not retried"


def test_txn_refuses_more_than_64_ops_without_a_request(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    with pytest.raises(ConsulError, match="at most 64"):
        consul.txn([TxnOp(TxnVerb.DELETE, f"k{i}") for i in range(65)])
    assert server.requests == []


def test_session_create_sends_go_durations_and_node_checks(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    server.script(Reply(200, {"ID": "sess-9"}))
    session = consul.session_create(
        "shepard web-03", 15, behavior=SessionBehavior.DELETE, lock_delay=0.5, node="web-03", node_checks=[]
    )
    assert session == "sess-9"
    assert server.requests[0].json() == {
        "Name": "shepard web-03",
        "TTL": "15s",
        "Behavior": "delete",
        "LockDelay": "500ms",
        "Node": "web-03",
        "NodeChecks": [],
    }


def test_session_info_renew_and_destroy(server: ScriptedServer, consul: ConsulBackend) -> None:
    info = {
        "ID": "sess-9",
        "Name": "n",
        "Node": "web-03",
        "TTL": "15s",
        "Behavior": "release",
        "LockDelay": 15_000_000_000,
        "CreateIndex": 11,
    }
    server.script(Reply(200, [info]), Reply(200, None), Reply(200, [info]), Reply(404, ""), Reply(200, True))
    got = consul.session_info("sess-9")
    assert got is not None and (got.ttl, got.lock_delay, got.behavior, got.create_index) == (
        15.0,
        15.0,
        "release",
        11,
    )
    assert consul.session_info("gone") is None
    assert consul.session_renew("sess-9") is True
    assert consul.session_renew("gone") is False
    consul.session_destroy("sess-9")
    assert [(r.method, r.path) for r in server.requests][2:] == [
        ("PUT", "/v1/session/renew/sess-9"),
        ("PUT", "/v1/session/renew/gone"),
        ("PUT", "/v1/session/destroy/sess-9"),
    ]


def test_health_checks_are_parsed_and_block_on_index(server: ScriptedServer, consul: ConsulBackend) -> None:
    check = {
        "Node": "web-03",
        "CheckID": "_nomad-check-1",
        "Name": "http",
        "Status": "passing",
        "ServiceID": "_nomad-task-a",
        "ServiceName": "web",
        "Output": "OK",
    }
    server.script(
        Reply(200, [check, {**check, "CheckID": "c2", "Status": "bogus"}], {"X-Consul-Index": "20"}),
        Reply(
            200,
            [{**check, "CheckID": "serfHealth", "ServiceID": "", "ServiceName": ""}],
            {"X-Consul-Index": "31"},
        ),
    )
    index, checks = consul.service_checks("web", index=19, wait=2)
    assert index == 20
    assert [(c.check_id, c.status) for c in checks] == [
        ("_nomad-check-1", CheckStatus.PASSING),
        ("c2", CheckStatus.CRITICAL),
    ]
    assert checks[0].service_name == "web" and checks[0].output == "OK"
    node_index, node_checks = consul.node_checks("web-03", index=30, wait=5)
    assert (node_index, [c.check_id for c in node_checks]) == (31, ["serfHealth"])
    assert (server.requests[0].param("index"), server.requests[0].param("wait")) == ("19", "2s")
    assert (server.requests[1].path, server.requests[1].param("index"), server.requests[1].param("wait")) == (
        "/v1/health/node/web-03",
        "30",
        "5s",
    )


def test_agent_node_name_or_none_when_not_readable(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(
        Reply(200, {"Config": {"NodeName": "web-03"}, "Member": {"Name": "x"}}), Reply(403, "denied")
    )
    assert consul.agent_node_name() == "web-03"
    assert consul.agent_node_name() is None


def test_datacenter_is_sent_on_every_data_call(server: ScriptedServer) -> None:
    backend = ConsulBackend(ConsulConfig(address=server.address, datacenter="dc2"), retry=NO_RETRY)
    server.script(Reply(404, "", {"X-Consul-Index": "3"}), Reply(200, True))
    backend.get("a")
    backend.session_renew("s")
    assert [r.param("dc") for r in server.requests] == ["dc2", "dc2"]
    assert "x-consul-token" not in server.requests[0].headers, "no token configured: no header"


# --- retries and errors -------------------------------------------------------------------------


def test_5xx_is_retried_until_it_succeeds_with_one_warning_for_the_outage(
    server: ScriptedServer, consul: ConsulBackend, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply(503, "Service Unavailable"), Reply(500, "No cluster leader"), Reply(200, True))
    with caplog.at_level(logging.INFO, logger="shepard_lib.backends"):
        assert consul.put("k", "v") is True
    assert len(server.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "kv.put k failed (HTTP 503)" in warnings[0], warnings
    back = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert back == [f"Consul at {server.address} answers again"]


def test_429_is_retried(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(429, "rate limit exceeded"), Reply(200, [kv_json("k", "v")]))
    entry = consul.get("k")
    assert entry is not None and entry.value == b"v"
    assert len(server.requests) == 2


def test_a_semantic_500_is_not_retried(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(500, 'invalid session "sess-x"'))
    with pytest.raises(ConsulError) as err:
        consul.acquire("lock", "v", "sess-x")
    assert err.value.status == 500 and not err.value.transient
    assert "kv.acquire lock" in str(err.value) and "invalid session" in str(err.value)
    assert len(server.requests) == 1


def test_403_is_an_error_at_once(server: ScriptedServer, consul: ConsulBackend) -> None:
    server.script(Reply(403, "Permission denied"))
    with pytest.raises(ConsulError) as err:
        consul.put("shepard/x", "v")
    assert str(err.value) == "consul kv.put shepard/x failed (HTTP 403): Permission denied"
    assert len(server.requests) == 1


def test_persistent_5xx_gives_up_after_the_policy_attempts(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    server.script(*[Reply(503, f"down {i}") for i in range(10)])
    with pytest.raises(ConsulError, match="down 3") as err:
        consul.get("k")
    assert err.value.transient and len(server.requests) == FAST_RETRY.attempts


def test_connection_refused_is_retried_then_succeeds() -> None:
    sock = refusing_socket()
    started: list[ScriptedServer] = []

    def start_server(_: float) -> None:
        if not started:
            started.append(ScriptedServer(sock))
            started[0].script(Reply(200, True))

    host, port = sock.getsockname()
    clock = HookClock(start_server)
    backend = ConsulBackend(ConsulConfig(address=f"http://{host}:{port}"), clock, retry=FAST_RETRY)
    try:
        assert backend.session_renew("s") is True
        assert len(clock.sleeps) == 1, "one refused attempt, one retry"
    finally:
        backend.close()
        started[0].stop() if started else sock.close()


def test_connection_refused_for_good_is_a_transient_consul_error() -> None:
    sock = refusing_socket()
    host, port = sock.getsockname()
    backend = ConsulBackend(
        ConsulConfig(address=f"http://{host}:{port}"), Clock(scale=1000), retry=FAST_RETRY
    )
    try:
        with pytest.raises(
            ConsulError,
            match=r"session\.renew s failed: cannot reach Consul at http://[\d.:]+: connection refused",
        ) as err:
            backend.session_renew("s")
        assert err.value.transient and err.value.status is None
        assert err.value.__suppress_context__, "the requests exception (with its URL) is not chained"
    finally:
        backend.close()
        sock.close()


def test_a_dropped_connection_is_retried_for_a_read_but_not_for_a_write(
    server: ScriptedServer, consul: ConsulBackend
) -> None:
    server.script(Reply(drop=True), Reply(200, [kv_json("k", "v")]))
    entry = consul.get("k")
    assert entry is not None and entry.value == b"v"
    server.script(Reply(drop=True), Reply(200, True))
    with pytest.raises(ConsulError, match="the connection was closed before the answer") as err:
        consul.put("k", "v", cas=7)
    assert not err.value.transient, "the server may have applied the write before the connection dropped"
    assert len(server.requests) == 3


def test_token_never_appears_in_errors_or_logs(
    server: ScriptedServer, consul: ConsulBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # A server (or proxy) that echoes the token back must not get it into our messages.
    server.script(
        Reply(503, f"backend down for token {TOKEN}"),
        Reply(403, f"ACL not found: X-Consul-Token: {TOKEN}"),
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(ConsulError) as err:
        consul.get("k")
    assert TOKEN not in str(err.value) and "<redacted>" in str(err.value)
    assert TOKEN not in caplog.text


def test_environment_does_not_override_the_config(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "[::1]:1")  # python-consul2's Consul() would even raise on this
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    backend = ConsulBackend(ConsulConfig(address=server.address, token=TOKEN), retry=NO_RETRY)
    server.script(Reply(200, True))
    assert backend.put("k", "v") is True
    assert server.requests[0].headers["x-consul-token"] == TOKEN
    backend.close()


def test_host_port_address_means_http(server: ScriptedServer) -> None:
    backend = ConsulBackend(ConsulConfig(address=server.address.removeprefix("http://")), retry=NO_RETRY)
    server.script(Reply(200, True))
    assert backend.session_renew("s") is True
    backend.close()


# --- timeouts -----------------------------------------------------------------------------------


def test_blocking_get_timeout_covers_the_wait_but_a_plain_get_does_not(server: ScriptedServer) -> None:
    # Scale 10: a 5 cluster-second wait is 0.5 real s (+1/16 jitter); the plain timeout is 0.25 s.
    backend = ConsulBackend(
        ConsulConfig(address=server.address), Clock(scale=10), retry=NO_RETRY, timeout=0.25
    )
    try:
        server.script(Reply(200, [kv_json("k", "v")], {"X-Consul-Index": "8"}, delay=0.45))
        started = time.monotonic()
        assert backend.watch("k", 7, 5)[0] == 8
        assert time.monotonic() - started >= 0.45
        server.script(Reply(200, [kv_json("k", "v")], delay=0.45))
        with pytest.raises(ConsulError, match="no answer before the timeout") as err:
            backend.get("k")
        assert err.value.transient, "a timed-out read may be retried"
    finally:
        backend.close()


def test_a_timed_out_write_is_not_retried(server: ScriptedServer) -> None:
    backend = ConsulBackend(
        ConsulConfig(address=server.address), Clock(scale=1000), retry=FAST_RETRY, timeout=0.2
    )
    try:
        server.script(Reply(200, True, delay=0.4), Reply(200, True))
        with pytest.raises(ConsulError, match="no answer before the timeout") as err:
            backend.put("k", "v")
        assert not err.value.transient, "the write may have been applied"
        assert len(server.requests) == 1
    finally:
        backend.close()


def test_the_request_timeout_is_what_requests_gets(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    original = requests.Session.request

    def spy(
        self: requests.Session, method: str, url: str, *args: object, **kwargs: object
    ) -> requests.Response:
        seen.append(kwargs.get("timeout"))
        return original(self, method, url, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(requests.Session, "request", spy)
    backend = ConsulBackend(ConsulConfig(address=server.address), Clock(scale=4), retry=NO_RETRY, timeout=3.0)
    server.script(Reply(200, [], {"X-Consul-Index": "2"}), Reply(404, "", {"X-Consul-Index": "2"}))
    backend.watch("k", 1, 64)
    backend.get("k")
    backend.close()
    # (connect, read): connecting always gets the plain timeout (a connect cannot be cancelled)
    assert seen == [(3.0, pytest.approx(64 * 17 / 16 / 4 + 3.0)), (3.0, 3.0)]


def test_session_info_is_a_consistent_read(server: ScriptedServer, consul: ConsulBackend) -> None:
    """Issue 8 finding 7: the session read that decides a reclaim must not be served stale."""
    server.script(Reply(404, ""))
    assert consul.session_info("maybe-stale") is None
    assert "consistent" in server.requests[0].query, server.requests[0].query
