"""Backoff for a service that stopped answering, with one log line per outage (not one per retry).

:class:`Outage` is the agent's own bookkeeping. :func:`quiet_retries` is for the ``shepard agent``
process: the backends, the session and the health gate log every retry of a failed request at
WARNING, which during an outage would be a line per retry next to the agent's one line per outage;
it moves those retry lines to DEBUG (``--log-level DEBUG`` still shows them).
"""

from __future__ import annotations

import logging
import threading

from shepard_lib.clock import Clock

__all__ = ["Outage", "RetryNoise", "quiet_retries"]

log = logging.getLogger(__name__)

INITIAL = 1.0
MAXIMUM = 30.0


class Outage:
    """One service's outage (thread-safe): :meth:`failed` returns the backoff, :meth:`recovered` ends it.

    The first failure logs a warning naming the service, the call and the error; later failures of
    the same outage log only at debug level; the first success after it logs how long it lasted.
    """

    def __init__(self, service: str, clock: Clock) -> None:
        self.service = service
        self._clock = clock
        self._lock = threading.Lock()  # the agent's session keeper and heartbeat watcher share one
        self._since: float | None = None
        self._delay = INITIAL

    def failed(self, call: str, error: Exception) -> float:
        """Record a failure of ``call``; returns the cluster seconds to wait before retrying."""
        with self._lock:
            return self._failed(call, error)

    def _failed(self, call: str, error: Exception) -> float:
        if self._since is None:
            self._since = self._clock.monotonic()
            self._delay = INITIAL
            log.warning("%s unreachable (%s): %s; retrying with backoff", self.service, call, error)
        else:
            log.debug("%s still unreachable (%s): %s", self.service, call, error)
            self._delay = min(MAXIMUM, self._delay * 2)
        return self._delay

    def recovered(self) -> None:
        """Record a success; logs the end of an outage once."""
        with self._lock:
            self._recovered()

    def _recovered(self) -> None:
        if self._since is not None:
            log.warning("%s reachable again after %.0fs", self.service, self._clock.monotonic() - self._since)
            self._since = None


_RETRY_LINES = {
    "shepard_lib.backends": ("%s: attempt %d/%d failed, retrying in %.2fs: %s",),
    "shepard_lib.session": (
        "session %r: renew failed (%s); it counts as lost in %.1fs without a successful renew",
    ),
    "shepard_lib.health": ("health of %s: query to %s failed, retrying: %s",),
}


class RetryNoise(logging.Filter):
    """Moves the per-retry WARNING lines of one logger (see :data:`_RETRY_LINES`) down to DEBUG."""

    def __init__(self, templates: tuple[str, ...]) -> None:
        super().__init__()
        self.templates = templates

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.msg not in self.templates:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False  # the logger's level check already let it through as a WARNING
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_retries() -> None:
    """Install :class:`RetryNoise` on the loggers that log every retry (process-wide: the daemon only)."""
    for name, templates in _RETRY_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, RetryNoise) for f in logger.filters):
            logger.addFilter(RetryNoise(templates))
