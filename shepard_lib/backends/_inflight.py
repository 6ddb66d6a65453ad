"""Requests that another thread can abort: the socket of the request in flight is shut down.

A blocking query waits in a socket read until the server answers (minutes, for an idle watch).
Closing a ``requests`` session does not end it: the pool closes only its idle connections. So
the backends send every request inside :func:`cancellable`, which names the
:class:`~shepard_lib.cancel.CancelEvent` s that end it (the call's own, the backend's ``closed``);
the connections of the adapter that :func:`~shepard_lib.backends._http.pinned_session` mounts
(:class:`CancellableAdapter`) report themselves to it when they wait for an answer, and setting
one of the events shuts their socket down (``shutdown(SHUT_RDWR)``, which wakes a read blocked
in another thread at once, for plain and TLS sockets alike). The read then fails, urllib3 drops
the connection, and the backend, seeing the event set, raises
:class:`~shepard_lib.errors.Cancelled`.

A connection is the request's only while it is checked out of the pool: it is forgotten when the
pool takes it back (``_put_conn``), before another thread can reuse it, so a cancellation never
touches another thread's request.

Not covered: a connection still being opened (TCP connect, TLS handshake) when the event is set has
no socket to shut down yet; that request ends at its connect timeout (the backends give connecting
only the plain request timeout, never a blocking query's wait), then raises ``Cancelled``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import requests.adapters
from urllib3.poolmanager import PoolManager

from shepard_lib.cancel import CancelEvent

__all__ = ["CancellableAdapter", "cancellable"]

_LOCAL = threading.local()
_OWNER = "_shepard_in_flight"  # attribute of a connection: the _InFlight it waits for


class _InFlight:
    """The connections one request (with its retries) waits on; shut down once it is cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[Any, socket.socket] = {}  # by connection (hashed by identity)
        self.cancelled = False

    def track(self, connection: Any) -> None:
        sock = getattr(connection, "sock", None)
        if sock is None:
            return
        with self._lock:
            setattr(connection, _OWNER, self)
            self._sockets[connection] = sock
            if self.cancelled:
                _shut(sock)

    def untrack(self, connection: Any) -> None:
        with self._lock:
            self._sockets.pop(connection, None)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for sock in self._sockets.values():
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket: the TLS object is left to the reading thread.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


@contextlib.contextmanager
def cancellable(*events: CancelEvent | None) -> Iterator[_InFlight]:
    """Run the requests of this thread in the block so that setting any of ``events`` aborts them.

    The yielded object's ``cancelled`` tells whether it happened (the request then failed, or
    answered just before).
    """
    in_flight = _InFlight()
    unregister = [event.on_set(in_flight.cancel) for event in events if event is not None]
    outer = getattr(_LOCAL, "in_flight", None)
    _LOCAL.in_flight = in_flight
    try:
        yield in_flight
    finally:
        _LOCAL.in_flight = outer
        for forget in unregister:
            forget()


def _tracked_connection(base: Any) -> type:
    class Connection(base):
        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            in_flight = getattr(_LOCAL, "in_flight", None)
            if in_flight is not None:
                in_flight.track(self)  # the request is sent: its socket exists
            return super().getresponse(*args, **kwargs)

    Connection.__name__ = Connection.__qualname__ = f"Cancellable{base.__name__}"
    return Connection


def _tracked_pool(base: Any) -> type:
    class Pool(base):
        ConnectionCls = _tracked_connection(base.ConnectionCls)

        def _put_conn(self, conn: Any) -> None:
            owner = getattr(conn, _OWNER, None)
            if owner is not None:
                owner.untrack(conn)
                delattr(conn, _OWNER)
            super()._put_conn(conn)

    Pool.__name__ = Pool.__qualname__ = f"Cancellable{base.__name__}"
    return Pool


def _track(manager: PoolManager) -> PoolManager:
    manager.pool_classes_by_scheme = {
        scheme: _tracked_pool(pool) for scheme, pool in manager.pool_classes_by_scheme.items()
    }
    return manager


class CancellableAdapter(requests.adapters.HTTPAdapter):
    """An ``HTTPAdapter`` whose connections can be shut down by :func:`cancellable` (proxies too)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _track(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        known = proxy in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not known:
            _track(manager)
        return manager
