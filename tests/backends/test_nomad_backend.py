"""NomadBackend over real HTTP against a scripted server: parsing, the restart call, retries, secrets."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scripted_http import FAST_RETRY, Reply, ScriptedServer, refusing_socket

from shepard_lib.backends._http import NO_RETRY
from shepard_lib.backends.nomad import NomadBackend, alloc_index, parse_time
from shepard_lib.clock import Clock
from shepard_lib.config import NomadConfig
from shepard_lib.errors import NomadError, NotFound

TOKEN = "9f1d-nomad-tok3n-never-shown"
ZERO_TIME = "0001-01-01T00:00:00Z"


def alloc_json(alloc_id: str = "a1b2", name: str = "web.app[3]", **extra: Any) -> dict[str, Any]:
    return {
        "ID": alloc_id,
        "Name": name,
        "Namespace": "default",
        "NodeID": "node-1",
        "NodeName": "web-03",
        "JobID": "web",
        "TaskGroup": "app",
        "ClientStatus": "running",
        "DesiredStatus": "run",
        "ModifyIndex": 31,
        "TaskStates": {
            "server": {
                "State": "running",
                "Failed": False,
                "Restarts": 2,
                "LastRestart": "2024-03-01T10:00:05.123456789Z",
                "StartedAt": "2024-03-01T12:00:05+02:00",
                "FinishedAt": ZERO_TIME,
            }
        },
        **extra,
    }


@pytest.fixture
def nomad(server: ScriptedServer) -> Iterator[NomadBackend]:
    config = NomadConfig(address=server.address, token=TOKEN, namespace="prod", region="eu")
    backend = NomadBackend(config, Clock(scale=100), retry=FAST_RETRY)
    yield backend
    backend.close()


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2024-03-01T10:00:05Z", 1709287205.0),
        ("2024-03-01T10:00:05.5Z", 1709287205.5),
        ("2024-03-01T10:00:05.123456789Z", 1709287205.123456789),
        ("2024-03-01T12:00:05+02:00", 1709287205.0),
        ("2024-03-01T05:30:05-04:30", 1709287205.0),
        (1709287205_500_000_000, 1709287205.5),
    ],
)
def test_parse_time_reads_rfc3339_and_nanoseconds(text: str | int, seconds: float) -> None:
    assert parse_time(text) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("zero", [ZERO_TIME, "0001-01-01T00:00:00.000Z", "", None, 0])
def test_parse_time_of_nomads_zero_time_is_none(zero: str | int | None) -> None:
    assert parse_time(zero) is None


def test_parse_time_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time("yesterday")


@pytest.mark.parametrize(
    ("name", "index"), [("web.app[0]", 0), ("web.app[12]", 12), ("batch[1].grp[7]", 7), ("a.b.c[3]", 3)]
)
def test_alloc_index_is_the_last_bracketed_number(name: str, index: int) -> None:
    assert alloc_index(name) == index


def test_alloc_index_rejects_a_name_without_index() -> None:
    with pytest.raises(ValueError, match=r"\[<index>\]"):
        alloc_index("web.app")


def test_allocation_is_parsed_into_the_model(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(Reply(200, alloc_json()))
    alloc = nomad.allocation("a1b2")
    assert (alloc.id, alloc.index, alloc.node_name, alloc.job_id, alloc.task_group, alloc.modify_index) == (
        "a1b2",
        3,
        "web-03",
        "web",
        "app",
        31,
    )
    assert alloc.running
    state = alloc.task_states["server"]
    assert (state.state, state.restarts, state.failed, state.finished_at) == ("running", 2, False, None)
    assert state.last_restart == pytest.approx(1709287205.123456789)
    assert state.started_at == pytest.approx(1709287205.0)
    request = server.requests[0]
    assert (request.method, request.path) == ("GET", "/v1/allocation/a1b2")
    assert (request.param("namespace"), request.param("region")) == ("prod", "eu")
    assert request.headers["x-nomad-token"] == TOKEN


def test_an_unparseable_allocation_is_a_nomad_error(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(Reply(200, alloc_json(name="no-index")))
    with pytest.raises(NomadError, match=r"allocation a1b2 failed: unexpected response: ValueError"):
        nomad.allocation("a1b2")


def test_allocation_lists_of_node_and_job(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(
        Reply(200, [alloc_json("a1"), alloc_json("a2", "web.app[4]")]),
        Reply(200, [alloc_json("a3", "web.app[0]", TaskStates=None)]),
    )
    assert [(a.id, a.index) for a in nomad.node_allocations("node-1")] == [("a1", 3), ("a2", 4)]
    assert [(a.id, a.task_states) for a in nomad.job_allocations("web")] == [("a3", {})]
    assert [r.path for r in server.requests] == ["/v1/node/node-1/allocations", "/v1/job/web/allocations"]


def test_job_is_parsed_with_groups_tasks_templates_and_services(
    server: ScriptedServer, nomad: NomadBackend
) -> None:
    job = {
        "ID": "web",
        "Name": "web",
        "Namespace": "prod",
        "Status": "running",
        "Meta": {"shepard_concurrency": "2"},
        "Stop": False,
        "TaskGroups": [
            {
                "Name": "app",
                "Count": 3,
                "Meta": None,
                "Services": [{"Name": "web-group"}],
                "Tasks": [
                    {
                        "Name": "server",
                        "Driver": "docker",
                        "Meta": {"a": "b"},
                        "Services": [{"Name": "web"}],
                        "Templates": [
                            {
                                "DestPath": "local/shepard.tpl",
                                "ChangeMode": "restart",
                                "EmbeddedTmpl": "{{ key }}",
                            },
                            {"DestPath": "local/app.conf", "ChangeMode": "noop", "EmbeddedTmpl": ""},
                        ],
                    }
                ],
            }
        ],
    }
    server.script(Reply(200, job))
    parsed = nomad.job("web")
    group = parsed.group("app")
    assert group is not None and group.count == 3 and group.services == ("web-group",) and group.meta == {}
    task = group.task("server")
    assert task is not None and task.services == ("web",) and task.meta == {"a": "b"}
    assert [(t.dest_path, t.change_mode) for t in task.templates] == [
        ("local/shepard.tpl", "restart"),
        ("local/app.conf", "noop"),
    ]
    assert parsed.meta == {"shepard_concurrency": "2"} and not parsed.stop


def test_jobs_nodes_and_node(server: ScriptedServer, nomad: NomadBackend) -> None:
    node = {
        "ID": "n1",
        "Name": "web-03",
        "Status": "ready",
        "Datacenter": "dc1",
        "StatusUpdatedAt": 1709287205,
        "SchedulingEligibility": "ineligible",
    }
    server.script(Reply(200, [{"ID": "web"}, {"ID": "db"}]), Reply(200, [node]), Reply(200, node))
    assert nomad.jobs() == ["web", "db"]
    assert [(n.name, n.eligible) for n in nomad.nodes()] == [("web-03", False)]
    assert nomad.node("n1").status_updated_at == 1709287205.0
    assert [r.path for r in server.requests] == ["/v1/jobs", "/v1/nodes", "/v1/node/n1"]
    assert server.requests[0].param("namespace") == "prod"


def test_restart_task_posts_the_task_name(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(Reply(200, {}))
    nomad.restart_task("a1b2", "server")
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/client/allocation/a1b2/restart")
    assert request.json() == {"TaskName": "server"}
    assert request.headers["x-nomad-token"] == TOKEN and "token" not in request.query


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_restart_whose_answer_was_lost_is_not_sent_twice(
    server: ScriptedServer, nomad: NomadBackend, status: int
) -> None:
    """The restart may have happened before the error: repeating it would restart the task twice."""
    server.script(Reply(status, "rpc error: EOF"), Reply(200, {}))
    with pytest.raises(NomadError):
        nomad.restart_task("a1b2", "server")
    assert len(server.requests) == 1, f"the restart was sent {len(server.requests)} times"


def test_a_restart_refused_for_want_of_a_leader_is_retried(
    server: ScriptedServer, nomad: NomadBackend
) -> None:
    server.script(Reply(500, "No cluster leader"), Reply(200, {}))
    nomad.restart_task("a1b2", "server")
    assert len(server.requests) == 2


def test_ids_are_quoted_into_one_path_segment(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(Reply(404, "job not found"))
    with pytest.raises(NotFound):
        nomad.job("a/b?c")
    assert server.requests[0].path == "/v1/job/a/b?c" and server.requests[0].param("c") is None


def test_agent_self(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(
        Reply(
            200,
            {
                "config": {"NodeName": "web-03", "Datacenter": "dc1", "Region": "eu"},
                "member": {"Name": "web-03", "Tags": {"region": "eu", "dc": "dc1"}},
                "stats": {"client": {"node_id": "n1"}},
            },
        )
    )
    agent = nomad.agent_self()
    assert (agent.node_name, agent.node_id, agent.datacenter, agent.region) == ("web-03", "n1", "dc1", "eu")


def test_watch_allocation_blocks_with_index_and_wait(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(
        Reply(200, alloc_json(), {"X-Nomad-Index": "40"}), Reply(200, alloc_json(), {"X-Nomad-Index": "12"})
    )
    index, alloc = nomad.watch_allocation("a1b2", 31, 0.25)
    assert index == 40 and alloc.id == "a1b2"
    assert (server.requests[0].param("index"), server.requests[0].param("wait")) == ("31", "250ms")
    assert nomad.watch_allocation("a1b2", 40, 1)[0] == 0, "an index that went backwards resets to 0"


# --- errors -------------------------------------------------------------------------------------


def test_404_is_not_found_at_once(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(Reply(404, "alloc not found"))
    with pytest.raises(NotFound) as err:
        nomad.allocation("gone")
    assert isinstance(err.value, NomadError)
    assert str(err.value) == "nomad allocation gone failed (HTTP 404): alloc not found"
    assert len(server.requests) == 1


def test_5xx_and_429_are_retried(
    server: ScriptedServer, nomad: NomadBackend, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply(500, "No cluster leader"), Reply(429, "slow down"), Reply(200, {}))
    with caplog.at_level(logging.WARNING, logger="shepard_lib.backends"):
        nomad.restart_task("a1b2", "server")
    assert len(server.requests) == 3
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "nomad allocation.restart a1b2 task server failed (HTTP 500)"
    ], "one warning for the outage, not one per retry"


def test_403_is_an_error_at_once(server: ScriptedServer, nomad: NomadBackend) -> None:
    server.script(Reply(403, "Permission denied"))
    with pytest.raises(NomadError) as err:
        nomad.jobs()
    assert err.value.status == 403 and not err.value.transient and len(server.requests) == 1


def test_connection_refused_is_a_transient_nomad_error() -> None:
    sock = refusing_socket()
    host, port = sock.getsockname()
    backend = NomadBackend(NomadConfig(address=f"http://{host}:{port}"), Clock(scale=1000), retry=FAST_RETRY)
    try:
        with pytest.raises(
            NomadError,
            match=r"nodes failed: cannot reach Nomad at http://127\.0\.0\.1:\d+: connection refused$",
        ) as err:
            backend.nodes()
        assert err.value.transient
    finally:
        backend.close()
        sock.close()


def test_token_never_appears_in_errors_or_logs(
    server: ScriptedServer, nomad: NomadBackend, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply(503, f"proxy error for {TOKEN}"), Reply(400, f"bad token {TOKEN}"))
    with caplog.at_level(logging.DEBUG), pytest.raises(NomadError) as err:
        nomad.allocation("a1b2")
    assert TOKEN not in str(err.value) and TOKEN not in caplog.text
    assert "<redacted>" in str(err.value)


def test_environment_does_not_override_the_config(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOMAD_ADDR", "http://127.0.0.1:1")
    monkeypatch.setenv("NOMAD_TOKEN", "env-token")
    monkeypatch.setenv("NOMAD_NAMESPACE", "env-ns")
    monkeypatch.setenv("NOMAD_REGION", "env-region")
    backend = NomadBackend(NomadConfig(address=server.address), retry=NO_RETRY)
    server.script(Reply(200, []))
    assert backend.jobs() == []
    request = server.requests[0]
    assert "x-nomad-token" not in request.headers
    assert request.param("namespace") == "default" and request.param("region") is None
    backend.close()


# --- the lists garbage collection decides on ------------------------------------------------------

LEADER = {"X-Nomad-KnownLeader": "true", "X-Nomad-Index": "42"}


def test_gc_lists_read_every_namespace_and_carry_index_and_server_time(
    nomad: NomadBackend, server: ScriptedServer
) -> None:
    job = {"ID": "web", "Name": "web-name", "Namespace": "prod", "Status": "dead", "Stop": True}
    node = {"ID": "n1", "Name": "web-03", "Status": "down", "StatusUpdatedAt": 1709287000}
    server.script(
        Reply(200, [job], headers=LEADER),
        Reply(200, [alloc_json()], headers=LEADER),
        Reply(200, [alloc_json()], headers=LEADER),
        Reply(200, node, headers=LEADER),
    )
    jobs = nomad.list_jobs()
    assert [(j.id, j.name, j.namespace, j.status, j.stop) for j in jobs.items] == [
        ("web", "web-name", "prod", "dead", True)
    ]
    assert jobs.index == 42
    assert jobs.server_time is not None and abs(jobs.server_time - time.time()) < 60, "the answer's Date"
    assert nomad.list_allocations().items[0].index == 3
    assert nomad.list_allocations("n1").items[0].node_name == "web-03"
    (status,) = nomad.node_status("n1").items
    assert (status.status, status.status_updated_at) == ("down", 1709287000.0)
    paths = [(r.path, r.param("namespace")) for r in server.requests]
    assert paths == [
        ("/v1/jobs", "*"),
        ("/v1/allocations", "*"),
        ("/v1/node/n1/allocations", "prod"),
        ("/v1/node/n1", "prod"),
    ]


@pytest.mark.parametrize("leader", [None, "false"])
def test_a_gc_list_without_a_known_leader_is_an_error_never_a_view(
    server: ScriptedServer, leader: str | None
) -> None:
    headers = {} if leader is None else {"X-Nomad-KnownLeader": leader}
    backend = NomadBackend(NomadConfig(address=server.address), Clock(scale=100), retry=NO_RETRY)
    server.script(Reply(200, [], headers=headers))
    try:
        with pytest.raises(NomadError, match=r"X-Nomad-KnownLeader is (missing|'false')"):
            backend.list_nodes()
    finally:
        backend.close()
