"""An Event that also ends the blocking calls waiting on it.

A thread in a blocking query (Consul's ``?index=&wait=``, Nomad's node allocations) sits in a
socket read for up to minutes; setting a plain :class:`threading.Event` does not wake it.
:class:`CancelEvent` is an Event whose :meth:`~CancelEvent.set` also runs the callbacks registered
with :meth:`~CancelEvent.on_set`: the backends register one that shuts down the socket of the
request in flight, so the call returns at once with :class:`~shepard_lib.errors.Cancelled`.

Usage::

    stopping = CancelEvent()
    # thread:  nomad.watch_node_allocations(node, index, 300, cancel=stopping)
    stopping.set()   # the query's socket is shut down; the watch raises Cancelled
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from shepard_lib.clock import Clock

__all__ = ["CancelEvent", "wait_any"]


class CancelEvent(threading.Event):
    """A :class:`threading.Event` whose :meth:`set` also runs the callbacks of :meth:`on_set`, once."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks_lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next_id = 0

    def set(self) -> None:
        """Set the event, then run every registered callback (in the caller's thread)."""
        with self._callbacks_lock:
            super().set()
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for callback in callbacks:
            callback()

    def clear(self) -> None:
        """Not supported: a cancellation is final (callbacks already ran)."""
        raise RuntimeError("a CancelEvent cannot be cleared")

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when the event is set (now, if it already is); returns the unregister call."""
        with self._callbacks_lock:
            if not self.is_set():
                key = self._next_id
                self._next_id += 1
                self._callbacks[key] = callback
                return lambda: self._forget(key)
        callback()
        return lambda: None

    def _forget(self, key: int) -> None:
        with self._callbacks_lock:
            self._callbacks.pop(key, None)


def wait_any(clock: Clock, events: tuple[CancelEvent, ...], seconds: float | None) -> bool:
    """Wait until one of ``events`` is set, for at most ``seconds`` cluster seconds; True if one is."""
    woken = threading.Event()
    unregister = [event.on_set(woken.set) for event in events]
    try:
        return clock.wait(woken, seconds)
    finally:
        for forget in unregister:
            forget()
