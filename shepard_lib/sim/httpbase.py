"""Request pieces the simulated Consul and Nomad HTTP servers share, because both agents share them.

- :class:`HTTPError`: answer with a status and a plain-text body (both agents write error texts bare).
- :func:`bearer_token`: the ``Authorization: Bearer`` branch of the token parsers, which is the
  same code in Consul's ``agent/http.go`` (``parseTokenFromHeaders``) and Nomad's
  ``command/agent/http.go`` (``parseToken``). Where they differ (Consul reads ``?token=`` first and
  ``X-Consul-Token`` as is; Nomad has no ``?token=`` and trims ``X-Nomad-Token``) each server
  keeps its own lookup.
- :class:`TrackingHTTPServer` and :class:`TrackedHandler`: a threaded HTTP/1.1 keep-alive server
  that can close its open connections on stop, so no client (or blocking query) is left hanging.
- :func:`parse_wait` and :func:`parse_index`: ``?wait=`` and ``?index=`` as both ``parseWait``
  functions read them (``time.ParseDuration``, 400 ``Invalid wait time``; ``strconv.ParseUint``,
  400 ``Invalid index``). What a server then does with the wait differs only in its limits
  (:mod:`shepard_lib.sim.blocking`).
"""

from __future__ import annotations

import contextlib
import email.utils
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shepard_lib.clock import Clock
from shepard_lib.durations import parse_go_duration

__all__ = ["HTTPError", "TrackedHandler", "TrackingHTTPServer", "bearer_token", "parse_index", "parse_wait"]

_MAX_UINT64 = 2**64


class HTTPError(Exception):
    """Answer the request with ``status`` and the plain-text ``text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class TrackingHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` (daemon threads) that remembers its open connections."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = socket.SOMAXCONN
    """The listen backlog, as Go's servers (Consul, Nomad) have it; socketserver's default of 5 drops
    connections when hundreds of agents connect at once."""
    clock: Clock | None = None
    """The cluster's clock, when set: the ``Date`` header of every answer follows it, as a real
    agent's follows its host clock (so a sped-up sim's dates agree with the times in its answers)."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        """Remember (``alive``) or forget an accepted connection."""
        with self._conns_lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet when a client went away (reset, broken pipe, or shut down by ``close_connections``).

        ``socketserver`` would print a traceback between lines of dashes to stderr; anything else still does.
        """
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def close_connections(self) -> None:
        """Shut every open connection down (keep-alive ones and those in a blocking query)."""
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class TrackedHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 handler that registers its connection with its :class:`TrackingHTTPServer`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small answers go out at once, not after the 40 ms delayed ACK
    server: TrackingHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header: the server's clock when it has one (see :attr:`TrackingHTTPServer.clock`)."""
        if timestamp is None and self.server.clock is not None:
            timestamp = self.server.clock.time()
        return email.utils.formatdate(timestamp, usegmt=True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value, ``""`` for any other.

    As the Go code does: split on single spaces, the scheme matches case-insensitively, and
    only the first space-separated word of the trimmed rest is the token.
    """
    parts = authorization.split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return ""
    return " ".join(parts[1:]).strip().split(" ")[0].strip()


def parse_wait(text: str) -> float:
    """``?wait=`` in seconds (empty: 0, the server's default); HTTPError 400 ``Invalid wait time``."""
    if not text:
        return 0.0
    try:
        return parse_go_duration(text)
    except ValueError:
        raise HTTPError(400, "Invalid wait time") from None


def parse_index(text: str) -> int:
    """``?index=`` (empty: 0); HTTPError 400 ``Invalid index`` unless an unsigned 64-bit number."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) >= _MAX_UINT64:
        raise HTTPError(400, "Invalid index")
    return int(text)
