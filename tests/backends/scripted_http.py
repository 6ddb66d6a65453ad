"""Helpers of the backend tests: a scripted HTTP server: replays canned responses, records requests.

The server binds port 0 on loopback. Each request takes the next scripted :class:`Reply` (or
the first reply whose ``path`` matches, when replies name one); a request nothing was scripted
for gets HTTP 418, which the backends treat as a plain client error, so a test fails loudly.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shepard_lib.backends._http import RetryPolicy
from shepard_lib.clock import Clock

CONSUL_ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY")
NOMAD_ENV = (
    "NOMAD_ADDR",
    "NOMAD_TOKEN",
    "NOMAD_NAMESPACE",
    "NOMAD_REGION",
    "NOMAD_CLIENT_CERT",
    "NOMAD_CLIENT_KEY",
)

FAST_RETRY = RetryPolicy(attempts=4, initial=0.01, maximum=0.05, jitter=0.01)
"""Retries in milliseconds: the tests check what is retried, not how long it waits."""


@dataclass(frozen=True)
class Reply:
    """One canned response; ``body`` is JSON-encoded unless it is bytes or str."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # real seconds before answering
    path: str | None = None  # only answer requests for this path (without query)
    drop: bool = False  # close the connection without answering
    hold: threading.Event | None = None  # answer only once this is set (or the server stops)


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 that it signed (PEM files)."""

    ca: str
    server_cert: str
    server_key: str


def make_tls_files(directory: Path) -> TLSFiles:
    """Create a CA and a 127.0.0.1 server certificate with the ``openssl`` command."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=shepard test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    )
    return TLSFiles(str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key"))


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


class ScriptedServer:
    """Serves scripted replies on ``address``; ``requests`` lists what it received, in order."""

    def __init__(self, sock: socket.socket | None = None, tls: TLSFiles | None = None) -> None:
        self.requests: list[Request] = []
        self.connections = 0
        """Connections accepted so far."""
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        self._received = threading.Condition(self._lock)
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    method=self.command,
                    path=urllib.parse.unquote(url.path),
                    query=urllib.parse.parse_qs(url.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                reply = server._record(request)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.hold is not None:
                    server._hold(reply.hold)
                if reply.drop:
                    self.close_connection = True
                    return
                body = reply.body
                if not isinstance(body, bytes | str):
                    body = json.dumps(body)
                data = body.encode() if isinstance(body, str) else body
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_PUT = do_POST = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        if sock is None:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        else:
            self._server = ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
            self._server.socket.close()
            self._server.socket = sock
            self._server.server_activate()
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.server_cert, tls.server_key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        host, port = self._server.socket.getsockname()[:2]
        self.address = f"{scheme}://{host}:{port}"

    def script(self, *replies: Reply) -> None:
        """Queue replies, answered in order (a reply with ``path`` waits for a request to that path)."""
        with self._lock:
            self._replies.extend(replies)

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Block until the server has received ``count`` requests (AssertionError after ``timeout``)."""
        with self._received:
            if not self._received.wait_for(lambda: len(self.requests) >= count, timeout):
                got = len(self.requests)
                raise AssertionError(f"expected {count} request(s) within {timeout}s, got {got}")

    def _hold(self, release: threading.Event) -> None:
        while not release.wait(0.05) and not self._stopping.is_set():
            pass

    def _record(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            self._received.notify_all()
            for i, reply in enumerate(self._replies):
                if reply.path is None or reply.path == request.path:
                    return self._replies.pop(i)
        return Reply(418, f"unscripted request {request.method} {request.path}")

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


class HookClock(Clock):
    """A fast clock that calls ``on_sleep`` before each sleep or timed wait (e.g. to bring a server up
    between retries: a backend waits between retries on its cancel events, with ``wait``)."""

    def __init__(self, on_sleep: Callable[[float], None], scale: float = 100.0) -> None:
        super().__init__(scale=scale)
        self.on_sleep = on_sleep
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.on_sleep(seconds)
        super().sleep(seconds)

    def wait(self, event: threading.Event, seconds: float | None) -> bool:
        if seconds is not None:
            self.sleeps.append(seconds)
            self.on_sleep(seconds)
        return super().wait(event, seconds)


def refusing_socket() -> socket.socket:
    """A loopback socket bound to a free port but not listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock
