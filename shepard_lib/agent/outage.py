"""Backoff for a service that stopped answering, with one log line per outage (not one per retry)."""

from __future__ import annotations

import logging

from shepard_lib.clock import Clock

__all__ = ["Outage"]

log = logging.getLogger(__name__)

INITIAL = 1.0
MAXIMUM = 30.0


class Outage:
    """Tracks one service's outage: :meth:`failed` returns the backoff, :meth:`recovered` ends it.

    The first failure logs a warning naming the service, the call and the error; later failures of
    the same outage log only at debug level; the first success after it logs how long it lasted.
    """

    def __init__(self, service: str, clock: Clock) -> None:
        self.service = service
        self._clock = clock
        self._since: float | None = None
        self._delay = INITIAL

    @property
    def ongoing(self) -> bool:
        """An outage has begun and not ended."""
        return self._since is not None

    def failed(self, call: str, error: Exception) -> float:
        """Record a failure of ``call``; returns the cluster seconds to wait before retrying."""
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
        if self._since is not None:
            log.warning("%s reachable again after %.0fs", self.service, self._clock.monotonic() - self._since)
            self._since = None
