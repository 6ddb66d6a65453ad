"""The code's clock: real time, optionally sped up.

Every duration Shepard waits on (session TTL, renew interval, lock-delay, health deadlines,
blocking-query waits) is expressed in *cluster seconds* and goes through a :class:`Clock`. The
real clock has ``scale=1``. Tests and the demo run the simulator and the coordination code on one
clock with ``scale > 1``, so that a 15 s TTL passes in 15/scale real seconds while every protocol
step keeps its real proportions.

``time()`` is wall-clock-like: ``origin + (real Unix time - origin) * scale``, so it equals the
real time at ``origin`` and runs ``scale`` times faster. Two clocks with the same ``origin`` and
scale agree with each other, whenever and in whichever process they were made. A scaled clock's
default origin is the fixed :data:`SCALED_EPOCH`, not "now": the simulator and every Shepard
process of one test or demo then share one cluster-time origin without having to exchange it.
(Shepard never orders events by comparing clock readings anyway; see docs/design.md section 4.)
"""

from __future__ import annotations

import threading
import time as _time

SCALED_EPOCH = 1_767_225_600.0
"""2026-01-01T00:00:00Z: the default origin of every clock with ``scale != 1``."""


class Clock:
    """A clock that runs ``scale`` times faster than real time (see the module docs for ``origin``)."""

    def __init__(self, scale: float = 1.0, origin: float | None = None) -> None:
        if scale <= 0:
            raise ValueError(f"clock scale must be > 0, got {scale!r}")
        self.scale = float(scale)
        if origin is None:
            origin = _time.time() if self.scale == 1.0 else SCALED_EPOCH
        self._origin_wall = origin
        self._origin_mono = _time.monotonic() - (_time.time() - self._origin_wall)

    def time(self) -> float:
        """Cluster Unix time in seconds (real Unix time when ``scale == 1``)."""
        return self._origin_wall + (_time.monotonic() - self._origin_mono) * self.scale

    def monotonic(self) -> float:
        """Cluster seconds from an arbitrary origin; never goes backwards."""
        return _time.monotonic() * self.scale

    def real(self, seconds: float) -> float:
        """The real seconds that ``seconds`` cluster seconds take."""
        return seconds / self.scale

    def cluster(self, real_seconds: float) -> float:
        """The cluster seconds that ``real_seconds`` real seconds are."""
        return real_seconds * self.scale

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` cluster seconds."""
        if seconds > 0:
            _time.sleep(seconds / self.scale)

    def wait(self, event: threading.Event, seconds: float | None) -> bool:
        """Wait on ``event`` for at most ``seconds`` cluster seconds; True if it was set."""
        return event.wait(None if seconds is None else max(0.0, seconds / self.scale))

    def wait_for(self, condition: threading.Condition, predicate: object, seconds: float | None) -> bool:
        """``condition.wait_for(predicate, timeout)`` with the timeout in cluster seconds.

        The caller must hold ``condition``.
        """
        timeout = None if seconds is None else max(0.0, seconds / self.scale)
        return bool(condition.wait_for(predicate, timeout))  # type: ignore[arg-type]


SIM_TIME_SCALE_HEADER = "X-Shepard-Sim-Time-Scale"
"""The header in which the simulated Consul and Nomad tell their time scale (real ones never send it)."""

REAL_CLOCK = Clock()
"""The clock of production code: real time."""
