"""An operator's request to stop a rollout, in two stages.

The first request (Ctrl-C, SIGTERM) sets :attr:`Interrupt.stop`: no new restart starts, the
restarts in flight are seen through (each is bounded by ``healthy_deadline``). The second request,
or the grace period running out, sets :attr:`Interrupt.abandon`: the rollout stops waiting for
them, destroys its sessions (so Consul frees their slots now, not at their TTL) and returns. A
member abandoned mid-restart stays ``restarting`` under a destroyed session, which the next
``shepard resume`` (or any participant) reclaims; see docs/design.md, "Interrupting a rollout".
"""

from __future__ import annotations

import threading

__all__ = ["Interrupt"]


class Interrupt:
    """Two events a rollout watches: ``stop`` (start nothing new) and ``abandon`` (stop waiting)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        """Set by the first request: no new restart starts."""
        self.abandon = threading.Event()
        """Set by the second request or after the grace period: restarts in flight are left behind."""
        self._timer: threading.Timer | None = None

    def request(self, grace: float | None = None) -> bool:
        """Ask the rollout to stop; True for the first request, False once it abandons.

        ``grace`` (real seconds) bounds the wait for restarts in flight after the first request.
        """
        if not self.stop.is_set():
            self.stop.set()
            if grace is not None:
                self._timer = threading.Timer(grace, self.abandon.set)
                self._timer.daemon = True
                self._timer.start()
            return True
        self.abandon.set()
        return False

    def close(self) -> None:
        """Cancel the grace timer (the rollout ended)."""
        if self._timer is not None:
            self._timer.cancel()
