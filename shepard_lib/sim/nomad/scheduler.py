"""One background thread that runs callbacks after delays given in cluster seconds."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from shepard_lib.clock import Clock

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


class Scheduler:
    """Runs ``callback()`` ``delay`` cluster seconds from now, in due order, on one thread."""

    def __init__(self, clock: Clock, name: str = "sim-nomad-scheduler") -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._running = False  # a callback is running now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Drop pending callbacks and stop the thread."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Schedule ``callback`` after ``delay`` cluster seconds (0: as soon as possible)."""
        due = time.monotonic() + self.clock.real(max(0.0, delay))
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._queue, (due, next(self._seq), callback))
            self._cond.notify_all()

    def wait_due(self, timeout: float) -> bool:
        """Block until every callback due by now has run (``timeout`` real seconds); False on timeout."""
        mark = time.monotonic()
        with self._cond:

            def done() -> bool:
                return not self._running and (not self._queue or self._queue[0][0] > mark)

            return self._cond.wait_for(lambda: self._stopped or done(), timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._queue or self._queue[0][0] > time.monotonic()):
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._queue)
                self._running = True
            try:
                callback()
            except Exception:
                log.exception("simulated Nomad callback failed")
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
