"""Connection trouble in Shepard's words, one warning per outage rather than one per retry.

:func:`unreachable` turns a ``requests`` transport exception (with urllib3's pool internals in its
text) into ``cannot reach Consul at http://127.0.0.1:8500: connection refused``. :data:`OUTAGES`
remembers which servers are failing: the first failed attempt of an outage is a warning, the
retries that follow are debug lines, and the first answer afterwards says the server is back.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import urllib.parse
from collections.abc import Iterator

import requests

from shepard_lib.errors import BackendError

__all__ = ["OUTAGES", "Outages", "unreachable"]

log = logging.getLogger("shepard_lib.backends")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception inside it (arguments, ``reason``, cause, context), depth first."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [*current.args, getattr(current, "reason", None), current.__cause__, current.__context__]
        stack.extend(reversed([e for e in inner if isinstance(e, BaseException)]))


def _why(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.SSLError):
        detail = next(
            (
                e.verify_message or e.reason or ""
                for e in _chain(exc)
                if isinstance(e, ssl.SSLCertVerificationError)
            ),
            "",
        ) or next((str(e.reason) for e in _chain(exc) if isinstance(e, ssl.SSLError) and e.reason), "")
        return f"TLS failed{': ' + detail if detail else ''} (check ca_file and the server's certificate)"
    if isinstance(exc, requests.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.ReadTimeout):
        return "no answer before the timeout"
    for inner in _chain(exc):
        if isinstance(inner, http.client.RemoteDisconnected | ConnectionResetError):
            return "the connection was closed before the answer"
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror[0].lower() + inner.strerror[1:]
    return "connection failed"


def unreachable(service: str, exc: requests.RequestException) -> str:
    """``cannot reach Consul at http://host:port: connection refused`` for a request that got no answer."""
    url = exc.request.url if exc.request is not None and exc.request.url else ""
    parts = urllib.parse.urlsplit(str(url))
    where = f" at {parts.scheme}://{parts.netloc}" if parts.netloc else ""
    return f"cannot reach {service}{where}: {_why(exc)}"


class Outages:
    """Which servers are failing now, so an outage is one warning, not one per retry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: set[str] = set()

    def failed(
        self, server: str, error: BaseException | None, attempt: int, attempts: int, delay: float
    ) -> None:
        """A retryable attempt against ``server`` failed: a warning if it starts an outage, else debug."""
        with self._lock:
            first = server not in self._down
            self._down.add(server)
        text = error.reason if isinstance(error, BackendError) and error.status is None else str(error)
        if first:
            log.warning("%s; retrying (until it answers, further failures are logged at DEBUG)", text)
        else:
            log.debug("%s (attempt %d/%d, next in %.2fs)", text, attempt, attempts, delay)

    def answered(self, server: str) -> None:
        """``server`` answered: if it was failing, say it is back."""
        with self._lock:
            if server not in self._down:
                return
            self._down.discard(server)
        log.info("%s answers again", server)


OUTAGES = Outages()
"""The process's outage record (a backend per thread still shares one server's outage)."""
