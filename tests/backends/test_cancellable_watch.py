"""Blocking queries that another thread cancels: the socket of the query in flight is shut down.

The scripted server holds each query until the test releases it (it never answers on its own),
so a watch that returns did so because it was cancelled: no timing is involved.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from scripted_http import FAST_RETRY, Reply, ScriptedServer, TLSFiles

from shepard_lib.backends._http import NO_RETRY, pinned_session
from shepard_lib.backends._inflight import cancellable
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig
from shepard_lib.errors import BackendError, Cancelled

JOIN = 30.0
"""Real seconds a cancelled call gets to return: far more than a shut-down socket needs."""
NODE_PATH = "/v1/node/n1/allocations"
ALLOC = {
    "ID": "a1",
    "Name": "web.app[0]",
    "NodeID": "n1",
    "NodeName": "web-01",
    "JobID": "web",
    "TaskGroup": "app",
    "ClientStatus": "running",
    "DesiredStatus": "run",
    "ModifyIndex": 7,
    "TaskStates": {},
}


@dataclass
class Call:
    """A backend call running on its own thread; ``error`` / ``result`` once it returned."""

    thread: threading.Thread
    result: Any = None
    error: BaseException | None = None

    def join(self) -> None:
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), f"the call was still running {JOIN:g} real seconds later"


def in_thread(fn: Callable[[], Any]) -> Call:
    call = Call(threading.Thread(target=lambda: None, daemon=True))

    def run() -> None:
        try:
            call.result = fn()
        except BaseException as exc:  # the test reads it
            call.error = exc

    call.thread = threading.Thread(target=run, daemon=True)
    call.thread.start()
    return call


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of the test: the server then answers what it still holds."""
    event = threading.Event()
    yield event
    event.set()


def nomad_backend(address: str, **tls: Any) -> NomadBackend:
    return NomadBackend(NomadConfig(address=address, **tls), Clock(), retry=FAST_RETRY)


def consul_backend(address: str) -> ConsulBackend:
    return ConsulBackend(ConsulConfig(address=address), Clock(), retry=FAST_RETRY)


def held(path: str, release: threading.Event, body: Any = None, index: int = 9) -> Reply:
    return Reply(
        200,
        [] if body is None else body,
        {"X-Nomad-Index": str(index), "X-Consul-Index": str(index)},
        path=path,
        hold=release,
    )


# --- Nomad ----------------------------------------------------------------------------------------


def test_cancel_ends_a_nomad_node_watch_in_flight(
    server: ScriptedServer, release: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    nomad = nomad_backend(server.address)
    cancel = CancelEvent()
    server.script(held(NODE_PATH, release))
    with caplog.at_level(logging.WARNING):
        call = in_thread(lambda: nomad.watch_node_allocations("n1", 5, 300, cancel=cancel))
        server.wait_for_requests(1)
        cancel.set()
        call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"
    assert len(server.requests) == 1, "a cancelled query must not be retried"
    assert server.requests[0].param("index") == "5" and server.requests[0].param("wait") == "5m"
    assert not [r for r in caplog.records if r.name.startswith("shepard_lib")], (
        f"a cancel is not an outage, yet it logged: {[r.getMessage() for r in caplog.records]}"
    )
    nomad.close()


def test_cancel_ends_a_nomad_allocation_watch_in_flight(
    server: ScriptedServer, release: threading.Event
) -> None:
    nomad = nomad_backend(server.address)
    cancel = CancelEvent()
    server.script(held("/v1/allocation/a1", release, ALLOC))
    call = in_thread(lambda: nomad.watch_allocation("a1", 5, 300, cancel=cancel))
    server.wait_for_requests(1)
    cancel.set()
    call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"
    nomad.close()


def test_a_watch_cancelled_before_it_starts_sends_nothing(server: ScriptedServer) -> None:
    nomad = nomad_backend(server.address)
    cancel = CancelEvent()
    cancel.set()
    with pytest.raises(Cancelled):
        nomad.watch_node_allocations("n1", 5, 300, cancel=cancel)
    assert server.requests == []
    nomad.close()


def test_closing_the_nomad_backend_ends_its_watches_in_flight(
    server: ScriptedServer, release: threading.Event
) -> None:
    nomad = nomad_backend(server.address)
    server.script(held(NODE_PATH, release), held("/v1/allocation/a1", release, ALLOC))
    calls = [
        in_thread(lambda: nomad.watch_node_allocations("n1", 5, 300)),
        in_thread(lambda: nomad.watch_allocation("a1", 5, 300)),
    ]
    server.wait_for_requests(2)
    nomad.close()
    for call in calls:
        call.join()
        assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"


def test_an_answered_watch_is_returned_even_if_cancelled_afterwards(server: ScriptedServer) -> None:
    nomad = nomad_backend(server.address)
    cancel = CancelEvent()
    server.script(Reply(200, [ALLOC], {"X-Nomad-Index": "12"}, path=NODE_PATH))
    index, allocs = nomad.watch_node_allocations("n1", 5, 300, cancel=cancel)
    cancel.set()
    assert (index, [a.id for a in allocs]) == (12, ["a1"])
    nomad.close()


def test_a_cancel_never_touches_another_threads_request_on_the_reused_connection(
    server: ScriptedServer, release: threading.Event
) -> None:
    """A request's connection goes back to the pool once answered, and another thread reuses it.

    Cancelling the first request's scope afterwards (still open) must leave the other request alone.
    """
    session = requests.Session()
    pinned_session(session, server.address, True)
    cancel = CancelEvent()
    server.script(Reply(200, "first", path="/first"), Reply(200, "second", path="/second", hold=release))
    with cancellable(cancel):
        assert session.get(f"{server.address}/first", timeout=JOIN).text == "first"
        other = in_thread(lambda: session.get(f"{server.address}/second", timeout=JOIN).text)
        server.wait_for_requests(2)
        cancel.set()
    release.set()
    other.join()
    assert other.error is None, f"the other thread's request failed: {other.error!r}"
    assert other.result == "second"
    assert server.connections == 1, "the test needs the second request to reuse the first one's connection"
    session.close()


def test_cancel_ends_a_watch_over_tls(
    tls_server: ScriptedServer, tls_files: TLSFiles, release: threading.Event
) -> None:
    nomad = nomad_backend(tls_server.address, ca_file=tls_files.ca)
    cancel = CancelEvent()
    tls_server.script(held(NODE_PATH, release))
    call = in_thread(lambda: nomad.watch_node_allocations("n1", 5, 300, cancel=cancel))
    tls_server.wait_for_requests(1)
    cancel.set()
    call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"
    nomad.close()


def test_cancel_ends_the_waits_between_retries(server: ScriptedServer) -> None:
    """Nomad answering 503 (retried with backoff): the cancel ends the backoff too, not only a request."""
    nomad = NomadBackend(NomadConfig(address=server.address), Clock(scale=0.001), retry=FAST_RETRY)
    cancel = CancelEvent()
    server.script(Reply(503, "no leader", path=NODE_PATH))  # the next retry would wait 10 real seconds
    call = in_thread(lambda: nomad.watch_node_allocations("n1", 5, 300, cancel=cancel))
    server.wait_for_requests(1)
    cancel.set()
    call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"
    assert len(server.requests) == 1
    nomad.close()


# --- Consul ---------------------------------------------------------------------------------------


def test_cancel_ends_a_consul_watch_in_flight(server: ScriptedServer, release: threading.Event) -> None:
    consul = consul_backend(server.address)
    cancel = CancelEvent()
    server.script(held("/v1/kv/shepard/nodes/", release))
    call = in_thread(lambda: consul.watch("shepard/nodes/", 5, 300, recurse=True, cancel=cancel))
    server.wait_for_requests(1)
    cancel.set()
    call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"
    assert len(server.requests) == 1, "a cancelled query must not be retried"
    consul.close()


def test_cancel_ends_a_consul_session_renew_in_flight(
    server: ScriptedServer, release: threading.Event
) -> None:
    consul = consul_backend(server.address)
    cancel = CancelEvent()
    server.script(held("/v1/session/renew/s1", release))
    call = in_thread(lambda: consul.session_renew("s1", cancel=cancel))
    server.wait_for_requests(1)
    cancel.set()
    call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"
    consul.close()


def test_closing_the_consul_backend_ends_its_watches_in_flight(
    server: ScriptedServer, release: threading.Event
) -> None:
    consul = consul_backend(server.address)
    server.script(held("/v1/kv/k", release))
    call = in_thread(lambda: consul.watch("k", 5, 300))
    server.wait_for_requests(1)
    consul.close()
    call.join()
    assert isinstance(call.error, Cancelled), f"expected Cancelled, got {call.error!r} / {call.result!r}"


# --- the event ------------------------------------------------------------------------------------


def test_cancel_event_runs_its_callbacks_once_and_at_once_when_already_set() -> None:
    event = CancelEvent()
    ran: list[str] = []
    forget = event.on_set(lambda: ran.append("registered"))
    event.on_set(lambda: ran.append("kept"))
    forget()
    event.set()
    event.set()
    event.on_set(lambda: ran.append("late"))
    assert ran == ["kept", "late"]
    with pytest.raises(RuntimeError):
        event.clear()


# --- connecting ----------------------------------------------------------------------------------


@pytest.fixture
def unanswered_address() -> Iterator[str]:
    """An address whose connects hang: a listener with a full accept queue that never accepts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = socket.create_connection(address, timeout=5)  # takes the only place in the queue
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(address)
    except TimeoutError:
        pass
    else:
        pytest.skip("this kernel completes connects beyond a full accept queue: no hanging connect to test")
    finally:
        probe.close()
    yield f"http://{address[0]}:{address[1]}"
    filler.close()
    listener.close()


@pytest.mark.parametrize("backend", ["nomad", "consul"])
def test_a_hanging_connect_gives_up_after_the_request_timeout_not_the_querys_wait(
    backend: str, unanswered_address: str
) -> None:
    """A socket still connecting cannot be shut down, so connecting is bounded apart: by the plain
    request timeout (here 1 s), not by the blocking query's wait (here 10 minutes)."""
    if backend == "nomad":
        nomad = NomadBackend(NomadConfig(address=unanswered_address), Clock(), retry=NO_RETRY, timeout=1.0)
        call = in_thread(lambda: nomad.watch_node_allocations("n1", 5, 600))
    else:
        consul = ConsulBackend(ConsulConfig(address=unanswered_address), Clock(), retry=NO_RETRY, timeout=1.0)
        call = in_thread(lambda: consul.watch("k", 5, 600))
    call.join()
    assert isinstance(call.error, BackendError), f"expected a connect timeout, got {call.error!r}"
    assert call.error.transient, "a request that never connected may be retried"
