"""One blocking query per watched thing per process, its answers fanned out to every subscriber.

When c restarts of one service are in flight, c health gates want the same
``/v1/health/checks/<service>`` answers. Each running its own blocking query would cost c
requests per change, each answer carrying every instance. A :class:`WatchHub` holds one loop per
key (a service, an allocation) for as long as anyone subscribes, and hands every answer to every
subscriber: one request per change, whatever the number of waiters.

Freshness: a subscriber must not judge by an answer older than its subscription (a check that
passed before the restart is not the restarted task's). So :meth:`WatchHub.subscribe` registers
the subscriber, then reads the key now (a non-blocking query) and hands that answer over unless the
loop already delivered a newer one (answers are ordered by the server's index, never by clocks).
After that the subscriber sees every answer of the shared loop.

A loop ends when its last subscriber leaves (after its current query returns: a blocking query
waits at most ``max_wait`` cluster seconds), or at once when the hub is closed: :meth:`WatchHub.close`
cancels the query in flight (the query gets the loop's :class:`~shepard_lib.cancel.CancelEvent`)
and joins the threads. A failed query is reported to each subscriber
(``on_retry``, so each can say which of its waits is affected) and retried after ``backoff``;
an error that ``final`` accepts (say, Nomad no longer knows the allocation) is handed to every
subscriber and ends the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock

__all__ = ["Query", "Subscriber", "WatchHub"]

log = logging.getLogger(__name__)

V = TypeVar("V")

Query = Callable[[str, int, float, CancelEvent], "tuple[int, V]"]
"""``query(key, index, wait, cancel)``: index 0 answers at once; otherwise block until past ``index``
or ``wait``; setting ``cancel`` (the hub closes) ends it at once (it raises)."""
JOIN = 30.0
"""Real seconds :meth:`WatchHub.close` waits for each loop thread (they end at once once cancelled)."""


@dataclass(eq=False)
class Subscriber(Generic[V]):
    """One waiter: ``on_answer(value)`` for each answer, ``on_error(exc)`` for a final error,
    ``on_retry(exc)`` for a failed query that the loop retries (None: the hub logs it).

    They are called from the hub's loop thread (or the subscribing thread for the first answer),
    must be quick and must not raise.
    """

    on_answer: Callable[[V], None]
    on_error: Callable[[Exception], None]
    on_retry: Callable[[Exception], None] | None = None
    last_index: int = 0
    ready: bool = False  # the fresh first answer was handed over; until then answers wait in ``pending``
    pending: tuple[int, V] | None = None
    active: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(self, index: int, value: V) -> None:
        """Hand over an answer unless a newer one was handed over already (index 0: always new)."""
        with self.lock:
            if not self.active:
                return
            if not self.ready:
                if self.pending is None or not index or index >= self.pending[0]:
                    self.pending = (index, value)
                return
            if index and index < self.last_index:
                return
            self.last_index = index
            self.on_answer(value)

    def start(self, index: int, value: V) -> None:
        """Hand over the first answer: ``value`` read now, or a newer one the loop delivered meanwhile."""
        with self.lock:
            if not self.active:
                return
            if self.pending is not None and self.pending[0] > index:
                index, value = self.pending
            self.pending = None
            self.ready = True
            self.last_index = index
            self.on_answer(value)

    def fail(self, exc: Exception) -> None:
        """Hand over a final error; nothing is delivered afterwards."""
        with self.lock:
            if self.active:
                self.active = False
                self.on_error(exc)


class _Loop(Generic[V]):
    def __init__(self, index: int, value: V) -> None:
        self.index = index
        self.last: tuple[int, V] = (index, value)
        self.subscribers: list[Subscriber[V]] = []
        self.closed = CancelEvent()
        self.thread: threading.Thread | None = None


class WatchHub(Generic[V]):
    """Blocking-query loops shared by key (see the module docs); ``name`` appears in thread names and logs."""

    def __init__(
        self,
        name: str,
        query: Query[V],
        clock: Clock,
        *,
        max_wait: float,
        backoff: float,
        final: Callable[[Exception], bool] = lambda exc: False,
    ) -> None:
        self.name = name
        self._query = query
        self.clock = clock
        self._max_wait = max_wait
        self._backoff = backoff
        self._final = final
        self._lock = threading.Lock()
        self._loops: dict[str, _Loop[V]] = {}

    def subscribe(self, key: str, subscriber: Subscriber[V]) -> Callable[[], None]:
        """Watch ``key`` for ``subscriber``; returns the function that ends the subscription.

        Reads ``key`` once now (in the calling thread) so that the first answer is not older than
        the subscription; an exception of that read propagates and nothing stays subscribed.
        """
        with self._lock:
            loop = self._loops.get(key)
            if loop is not None:
                loop.subscribers.append(subscriber)
        try:
            index, value = self._query(key, 0, self._max_wait, CancelEvent())
        except Exception:
            self._leave(key, subscriber)
            raise
        if loop is None:
            with self._lock:
                loop = self._loops.get(key)
                start = loop is None
                if loop is None:
                    loop = self._loops[key] = _Loop(index, value)
                loop.subscribers.append(subscriber)
                newest = loop.last
            if start:
                loop.thread = threading.Thread(
                    target=self._run, args=(key, loop), name=f"shepard-watch-{self.name}[{key}]", daemon=True
                )
                loop.thread.start()
            else:
                subscriber.deliver(*newest)  # the loop may have seen a newer answer than ours
        subscriber.start(index, value)
        return lambda: self._leave(key, subscriber)

    def close(self) -> None:
        """End every loop now: cancel the queries in flight and wait for the threads.

        For the owner of the backends when it stops (an agent), once its waits are over: a
        subscriber still subscribed gets no further answer (its own deadline or cancel ends its
        wait; a shutdown is no verdict on a restart). The hub must not be used afterwards.
        """
        with self._lock:
            loops, self._loops = list(self._loops.values()), {}
        for loop in loops:
            loop.closed.set()
        for loop in loops:
            if loop.thread is not None and loop.thread is not threading.current_thread():
                loop.thread.join(JOIN)
                if loop.thread.is_alive():
                    log.warning("%s: %s did not end within %gs", self.name, loop.thread.name, JOIN)

    def _leave(self, key: str, subscriber: Subscriber[V]) -> None:
        with subscriber.lock:
            subscriber.active = False
        with self._lock:
            loop = self._loops.get(key)
            if loop is not None and subscriber in loop.subscribers:
                loop.subscribers.remove(subscriber)

    def _run(self, key: str, loop: _Loop[V]) -> None:
        while not loop.closed.is_set():
            with self._lock:
                if not loop.subscribers:
                    if self._loops.get(key) is loop:
                        del self._loops[key]
                    return
                index = loop.index
            try:
                index, value = self._query(key, index, self._max_wait, loop.closed)
            except Exception as exc:  # a loop thread must survive anything the backend raises
                if loop.closed.is_set():
                    return
                if self._final(exc):
                    with self._lock:
                        subscribers, loop.subscribers = loop.subscribers, []
                        if self._loops.get(key) is loop:
                            del self._loops[key]
                    for s in subscribers:
                        s.fail(exc)
                    return
                with self._lock:
                    subscribers = list(loop.subscribers)
                    if not subscribers:  # nobody waits for this answer any more: end quietly
                        if self._loops.get(key) is loop:
                            del self._loops[key]
                        return
                told = [s for s in subscribers if s.on_retry is not None and s.active]
                for s in told:
                    s.on_retry(exc)  # type: ignore[misc]
                if not told:
                    log.warning("%s watch of %s: query failed, retrying: %s", self.name, key, exc)
                self.clock.wait(loop.closed, self._backoff)
                continue
            with self._lock:
                loop.index = index
                loop.last = (index, value)
                subscribers = list(loop.subscribers)
            for s in subscribers:
                s.deliver(index, value)
