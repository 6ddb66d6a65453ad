"""WatchHub: one blocking-query loop per key shared by its subscribers (a scripted query, no sockets)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.errors import Cancelled, NotFound
from shepard_lib.watchhub import Subscriber, WatchHub

CLOCK = Clock(scale=1000)


class Source:
    """A key-value source answering blocking queries like Consul: at once past ``index``, else on a change."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.index = 1
        self.value = "v1"
        self.queries: list[tuple[str, int]] = []
        self.error: Exception | None = None

    def set(self, value: str) -> None:
        with self.cond:
            self.index += 1
            self.value = value
            self.cond.notify_all()

    def fail(self, exc: Exception) -> None:
        with self.cond:
            self.error = exc
            self.cond.notify_all()

    def query(self, key: str, index: int, wait: float, cancel: CancelEvent) -> tuple[int, str]:
        forget = cancel.on_set(self._wake)
        try:
            with self.cond:
                self.queries.append((key, index))
                self.cond.wait_for(
                    lambda: cancel.is_set() or self.error is not None or self.index > index, CLOCK.real(wait)
                )
                if cancel.is_set():
                    raise Cancelled(f"query {key}: cancelled")
                if self.error is not None:
                    raise self.error
                return self.index, self.value
        finally:
            forget()

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class Collector:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.values: list[str] = []
        self.errors: list[Exception] = []

    def subscriber(self) -> Subscriber[str]:
        return Subscriber(self._answer, self._error)

    def _answer(self, value: str) -> None:
        with self.cond:
            self.values.append(value)
            self.cond.notify_all()

    def _error(self, exc: Exception) -> None:
        with self.cond:
            self.errors.append(exc)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, 10), f"timed out: values {self.values}, errors {self.errors}"


def hub(source: Source) -> WatchHub[str]:
    return WatchHub(
        "test", source.query, CLOCK, max_wait=5.0, backoff=0.1, final=lambda exc: isinstance(exc, NotFound)
    )


def test_a_subscription_starts_with_an_answer_read_after_it_began() -> None:
    source = Source()
    watch = hub(source)
    first = Collector()
    leave = watch.subscribe("k", first.subscriber())
    assert first.values == ["v1"]
    source.set("v2")
    first.wait(lambda: first.values == ["v1", "v2"])
    second = Collector()
    leave_second = watch.subscribe("k", second.subscriber())
    assert second.values == ["v2"], "a later subscriber gets the current value, not an old one"
    leave()
    leave_second()


def test_every_change_costs_one_query_whatever_the_number_of_subscribers() -> None:
    source = Source()
    watch = hub(source)
    collectors = [Collector() for _ in range(5)]
    leaves = [watch.subscribe("k", c.subscriber()) for c in collectors]
    before = len(source.queries)
    for n in range(2, 5):
        source.set(f"v{n}")
        for c in collectors:
            c.wait(lambda c=c, n=n: c.values[-1] == f"v{n}")  # type: ignore[misc]
    # One query per change, plus the one blocking now: not one per subscriber.
    assert len(source.queries) - before <= 3 + 1
    for leave in leaves:
        leave()


def test_the_loop_ends_after_the_last_subscriber_left() -> None:
    source = Source()
    watch = hub(source)
    collector = Collector()
    watch.subscribe("k", collector.subscriber())()
    source.set("v2")  # the query in flight returns; with nobody subscribed the loop stops there
    deadline = CLOCK.monotonic() + 5_000
    while [t for t in threading.enumerate() if t.name == "shepard-watch-test[k]"]:
        assert CLOCK.monotonic() < deadline, "the loop outlived its subscribers"
        CLOCK.sleep(10)
    assert collector.values == ["v1"], "nothing is delivered after leaving"


def test_a_final_error_reaches_every_subscriber_and_ends_the_loop() -> None:
    source = Source()
    watch = hub(source)
    collectors = [Collector() for _ in range(2)]
    for c in collectors:
        watch.subscribe("k", c.subscriber())
    source.fail(NotFound("allocation.watch k", "Unknown allocation"))
    for c in collectors:
        c.wait(lambda c=c: len(c.errors) == 1)  # type: ignore[misc]


def test_a_failed_first_read_propagates_and_leaves_nothing_subscribed() -> None:
    source = Source()
    source.fail(RuntimeError("connection refused"))
    watch = hub(source)
    with pytest.raises(RuntimeError):
        watch.subscribe("k", Collector().subscriber())
    assert not [t for t in threading.enumerate() if t.name == "shepard-watch-test[k]"]


def test_a_newer_answer_the_loop_delivered_first_wins_over_an_older_first_read() -> None:
    subscriber: Subscriber[str] = Collector().subscriber()
    seen: list[str] = []
    subscriber.on_answer = seen.append
    subscriber.deliver(7, "from the loop, index 7")
    subscriber.start(5, "read at index 5")
    subscriber.deliver(6, "an older loop answer")
    subscriber.deliver(8, "index 8")
    assert seen == ["from the loop, index 7", "index 8"]


def test_a_failed_query_is_reported_to_each_subscriber_and_retried() -> None:
    source = Source()
    watch = hub(source)
    retries: list[Exception] = []
    collector = Collector()
    subscriber = collector.subscriber()

    def retried(exc: Exception) -> None:
        with collector.cond:
            retries.append(exc)
            collector.cond.notify_all()

    subscriber.on_retry = retried
    leave = watch.subscribe("k", subscriber)
    source.fail(RuntimeError("500 rpc error"))
    collector.wait(lambda: bool(retries))
    with source.cond:
        source.error = None
    source.set("v2")
    collector.wait(lambda: collector.values[-1] == "v2")
    assert collector.errors == [], "a retried error is not final"
    leave()


def test_close_cancels_the_queries_in_flight_and_ends_every_loop_thread() -> None:
    source = Source()
    # Queries of 600 real seconds: a loop still in one after close() could only have been cancelled.
    watch = WatchHub("test", source.query, CLOCK, max_wait=600_000.0, backoff=0.1)
    collectors = [Collector(), Collector()]
    keys = ("closed-a", "closed-b")
    for key, collector in zip(keys, collectors, strict=True):
        watch.subscribe(key, collector.subscriber())
        collector.wait(lambda c=collector: c.values == ["v1"])  # type: ignore[misc]
    with source.cond:
        assert source.cond.wait_for(lambda: len(source.queries) >= 4, 10), source.queries  # 2 reads, 2 waits
    watch.close()
    names = {f"shepard-watch-test[{key}]" for key in keys}
    left = [t.name for t in threading.enumerate() if t.name in names]
    assert left == [], f"loop threads still running after close: {left}"
    assert all(c.errors == [] for c in collectors), "a closed hub is no verdict: nothing is failed"
