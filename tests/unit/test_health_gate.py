"""HealthGate's verdicts, decision by decision, on answers the test scripts (no sockets).

A small in-process stand-in for the two read endpoints the gate follows (``watch_allocation`` and
``service_checks``, with blocking-query semantics) lets each test hand the gate exactly the
allocation and checks it must judge, including states the simulator does not produce (a running
task Nomad marks failed, an allocation Nomad means to stop). Each test names the decision it pins;
the sim-backed end-to-end tests are in ``tests/integration/test_health.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

import pytest

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.config import HealthSource
from shepard_lib.errors import ConsulError, HealthTimeout, LockLost, NomadError, NotFound, TaskFailed
from shepard_lib.health import MAX_WAIT, NODE_GRACE, HealthGate, HealthReport, close_watches
from shepard_lib.model import Allocation, CheckStatus, HealthCheck, TaskState

SCALE = 50.0  # cluster seconds per real second
PASSES = 60.0  # the deadline of a wait that must pass: 1.2 real seconds, wide on a busy machine
TIMES_OUT = 10.0  # the deadline of a wait that must time out: 0.2 real seconds
ALLOC = "5b8f3c1e-0000-4000-8000-000000000001"
OTHER = "5b8f3c1e-0000-4000-8000-000000000002"
BEFORE = TaskState(state="running", restarts=0, started_at=1000.0)
RESTARTED = TaskState(state="running", restarts=1, last_restart=1010.0, started_at=1011.0)


def _alloc(
    task: TaskState = RESTARTED, *, client_status: str = "running", desired: str = "run"
) -> Allocation:
    return Allocation(
        id=ALLOC,
        name="web.app[0]",
        namespace="default",
        node_id="node-1",
        node_name="n1",
        job_id="web",
        task_group="app",
        client_status=client_status,
        desired_status=desired,
        index=0,
        task_states={"server": task},
    )


def _check(
    alloc_id: str = ALLOC, status: CheckStatus = CheckStatus.PASSING, *, node: str = "n1"
) -> HealthCheck:
    service_id = f"_nomad-task-{alloc_id}-server-web-http"
    return HealthCheck(node, f"check-{alloc_id}", 'service: "web" check', status, service_id, "web")


class Answers:
    """What Nomad and Consul answer, changed by the test; reads block like Consul's and Nomad's queries."""

    def __init__(self, clock: Clock, alloc: Allocation, checks: list[HealthCheck]) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._index = 1
        self._alloc: Allocation | None = alloc
        self._checks = checks
        self._served = 0  # the index of the last checks answer handed out
        self.consul_silent = False  # Consul never answers (its queries block until the gate ends)
        self.nomad_errors = 0  # how many allocation reads fail before Nomad answers again
        self.blocking = 0  # how many blocking allocation queries are waiting now
        self.consul_errors = 0  # how many checks reads fail before Consul answers again
        self.consul_reads = 0  # how many times the checks were asked for
        self.queries: list[
            tuple[str, int, float | None]
        ] = []  # ("nomad", "consul" or "node:<n>", index, wait)
        self.nomad_holds = False  # Nomad's blocking queries return only on a change or cancel, never on wait
        self.consul_holds = False  # the same for Consul's

    def set(self, *, alloc: Allocation | None = None, checks: list[HealthCheck] | None = None) -> int:
        """Change the answers; returns their new index."""
        with self._cond:
            self._alloc = alloc if alloc is not None else self._alloc
            self._checks = checks if checks is not None else self._checks
            self._index += 1
            self._cond.notify_all()
            return self._index

    def wait_blocking(self) -> None:
        """Block until a blocking allocation query (a watch loop's, not a first read) is waiting."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.blocking > 0, 10), "no watch loop queried Nomad"

    def wait_query(self, backend: str) -> None:
        """Block until a blocking query (with an index) was made to ``backend`` ("nomad" or "consul")."""
        with self._cond:
            made = self._cond.wait_for(lambda: any(b == backend and i for b, i, _ in self.queries), 10)
            assert made, f"no blocking query to {backend}"

    def fail_next_watch(self) -> None:
        """Once a watch loop holds a query: end it, fail the loop's next query, and return once the
        loop queries again (after its backoff)."""
        self.wait_blocking()
        with self._cond:
            self.nomad_errors = 1
            self._index += 1
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: not self.nomad_errors and self.blocking > 0, 10), (
                "the watch loop did not query Nomad again after its failed query"
            )

    def fail_next_checks_watch(self) -> None:
        """Once the checks watch queries with an index: end that query, fail the loop's next one, and
        return once the loop queries again (after its backoff)."""
        self.wait_query("consul")
        with self._cond:
            made = len(self.queries)
            self.consul_errors = 1
            self._index += 1
            self._cond.notify_all()
            again = self._cond.wait_for(
                lambda: (
                    not self.consul_errors and any(b == "consul" and i for b, i, _ in self.queries[made:])
                ),
                10,
            )
            assert again, "the checks watch did not query Consul again after its failed query"

    def wait_served(self, index: int) -> None:
        """Block until the gate was handed the checks of ``index`` (or later)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self._served >= index, 10), "the gate never read the checks"

    def forget_allocation(self) -> None:
        with self._cond:
            self._alloc = None
            self._index += 1
            self._cond.notify_all()

    def _hold(self, index: int, cancel: CancelEvent | None) -> None:
        """A held blocking query: until the answers change or ``cancel`` (if any) is set."""
        if cancel is None:
            self._cond.wait_for(lambda: self._index > index)
            return
        forget = cancel.on_set(self._wake)
        try:
            self._cond.wait_for(lambda: self._index > index or cancel.is_set())
        finally:
            forget()
        if cancel.is_set():
            raise NomadError("allocation.watch", "cancelled")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _block(self, index: int, wait: float | None, cancel: object = None) -> None:
        if not index:
            return
        if not isinstance(cancel, CancelEvent):
            self._clock.wait_for(self._cond, lambda: self._index > index, wait)
            return
        forget = cancel.on_set(self._wake)
        try:
            self._clock.wait_for(self._cond, lambda: self._index > index or cancel.is_set(), wait)
        finally:
            forget()

    # --- the NomadAPI and ConsulAPI calls the gate makes ---------------------------------------

    def allocation(self, alloc_id: str) -> Allocation:
        with self._cond:
            if self._alloc is None or alloc_id != ALLOC:
                raise NotFound(f"allocation {alloc_id}", "unknown allocation", 404)
            return self._alloc

    def watch_allocation(
        self, alloc_id: str, index: int, wait: float, *, cancel: object = None
    ) -> tuple[int, Allocation]:
        with self._cond:
            self.queries.append(("nomad", index, wait))
            if alloc_id != ALLOC:
                raise NotFound(f"allocation {alloc_id}", "unknown allocation", 404)
            if self.nomad_errors:
                self.nomad_errors -= 1
                raise NomadError(f"allocation.watch {alloc_id}", "HTTP 500: rpc error", 500, transient=True)
            self.blocking += bool(index)
            self._cond.notify_all()
            try:
                if index and self.nomad_holds:
                    self._hold(index, cancel if isinstance(cancel, CancelEvent) else None)
                else:
                    self._block(index, wait, cancel)
            finally:
                self.blocking -= bool(index)
            if self._alloc is None:
                raise NotFound(f"allocation {alloc_id}", "unknown allocation", 404)
            return self._index, self._alloc

    def service_checks(
        self, service: str, index: int = 0, wait: float | None = None, *, cancel: object = None
    ) -> tuple[int, list[HealthCheck]]:
        with self._cond:
            self.consul_reads += 1
            self.queries.append(("consul", index, wait))
            self._cond.notify_all()
            if self.consul_errors:
                self.consul_errors -= 1
                raise ConsulError(f"health.checks {service}", "HTTP 500: rpc error", 500)
            if self.consul_silent:
                self._clock.wait_for(self._cond, lambda: False, wait if wait is not None else 1.0)
                raise ConsulError(f"health.checks {service}", "timed out")
            if index and self.consul_holds:
                self._hold(index, cancel if isinstance(cancel, CancelEvent) else None)
            else:
                self._block(index, wait, cancel)
            self._served = self._index
            self._cond.notify_all()
            return self._index, [c for c in self._checks if c.service_name == service]

    def node_checks(
        self, node: str, index: int = 0, wait: float | None = None, *, cancel: object = None
    ) -> tuple[int, list[HealthCheck]]:
        with self._cond:
            self.queries.append((f"node:{node}", index, wait))
            self._block(index, wait, cancel)
            self._cond.notify_all()
            return self._index, [c for c in self._checks if c.node == node]


@pytest.fixture
def clock() -> Clock:
    return Clock(scale=SCALE)


def _gate(
    clock: Clock,
    answers: Answers,
    source: HealthSource,
    *,
    min_healthy_time: float = 2,
    deadline: float = PASSES,
) -> HealthGate:
    return HealthGate(
        answers,  # type: ignore[arg-type]
        answers,  # type: ignore[arg-type]
        source=source,
        min_healthy_time=min_healthy_time,
        healthy_deadline=deadline,
        clock=clock,
    )


def _wait(
    clock: Clock,
    source: HealthSource,
    alloc: Allocation,
    checks: list[HealthCheck],
    services: tuple[str, ...] = ("web",),
    before: TaskState = BEFORE,
    deadline: float = PASSES,
) -> HealthReport:
    """Wait for answers that never change; with HealthTimeout expected, the deadline is short."""
    answers = Answers(clock, alloc, checks)
    return _gate(clock, answers, source, deadline=deadline).wait_healthy(
        ALLOC, "server", before=before, services=services
    )


ALL_SOURCES = list(HealthSource)
CHECK_SOURCES = [HealthSource.CONSUL, HealthSource.BOTH]


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_a_restarted_running_task_with_passing_checks_is_healthy(clock: Clock, source: HealthSource) -> None:
    start = clock.time()
    report = _wait(clock, source, _alloc(), [_check()])
    assert (report.alloc_id, report.task, report.running_at) == (ALLOC, "server", RESTARTED.started_at)
    assert report.healthy_at - start >= 2, "passed before min_healthy_time"


@pytest.mark.parametrize("source", CHECK_SOURCES)
@pytest.mark.parametrize("checks", [[], [_check(OTHER)]], ids=["no checks", "another allocation's check"])
def test_no_check_for_this_allocation_is_not_healthy(
    clock: Clock, source: HealthSource, checks: list[HealthCheck]
) -> None:
    # The task runs before Nomad registered its service: nothing says it is healthy yet.
    with pytest.raises(HealthTimeout, match="service web has no checks registered for this allocation"):
        _wait(clock, source, _alloc(), checks, deadline=TIMES_OUT)


@pytest.mark.parametrize(
    ("source", "services"),
    [(HealthSource.NOMAD, ("web",)), (HealthSource.BOTH, ("web",)), (HealthSource.CONSUL, ())],
    ids=["nomad", "both", "consul without services"],
)
def test_a_running_task_nomad_marks_failed_is_not_healthy(
    clock: Clock, source: HealthSource, services: tuple[str, ...]
) -> None:
    failed = dataclasses.replace(RESTARTED, failed=True)
    with pytest.raises(HealthTimeout, match=r"s: Nomad marks the task failed$"):
        _wait(clock, source, _alloc(failed), [_check()], services, deadline=TIMES_OUT)


def test_source_consul_with_services_does_not_read_the_failed_flag(clock: Clock) -> None:
    failed = dataclasses.replace(RESTARTED, failed=True)
    assert _wait(clock, HealthSource.CONSUL, _alloc(failed), [_check()]).alloc_id == ALLOC


@pytest.mark.parametrize("services", [("web",), ()], ids=["with services", "without services"])
def test_source_both_requires_the_allocation_itself_running(clock: Clock, services: tuple[str, ...]) -> None:
    with pytest.raises(HealthTimeout, match="the allocation is pending"):
        _wait(
            clock,
            HealthSource.BOTH,
            _alloc(client_status="pending"),
            [_check()],
            services,
            deadline=TIMES_OUT,
        )


@pytest.mark.parametrize("source", [HealthSource.CONSUL, HealthSource.NOMAD])
def test_sources_other_than_both_do_not_read_the_allocation_status_of_a_running_task(
    clock: Clock, source: HealthSource
) -> None:
    assert _wait(clock, source, _alloc(client_status="pending"), [_check()]).alloc_id == ALLOC


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize("desired", ["stop", "evict"])
def test_an_allocation_nomad_means_to_stop_fails_the_wait(
    clock: Clock, source: HealthSource, desired: str
) -> None:
    with pytest.raises(TaskFailed, match=f"desired status {desired}"):
        _wait(clock, source, _alloc(desired=desired), [_check()])


@pytest.mark.parametrize("source", [HealthSource.CONSUL, HealthSource.NOMAD])
def test_an_empty_desired_status_counts_as_run(clock: Clock, source: HealthSource) -> None:
    assert _wait(clock, source, _alloc(desired=""), [_check()]).alloc_id == ALLOC


@pytest.mark.parametrize("status", ["complete", "failed", "lost"])
def test_a_terminal_allocation_fails_the_wait(clock: Clock, status: str) -> None:
    with pytest.raises(TaskFailed, match=f"the allocation is {status}"):
        _wait(clock, HealthSource.CONSUL, _alloc(client_status=status), [_check()])


@pytest.mark.parametrize("failed", [False, True])
def test_a_dead_task_fails_the_wait(clock: Clock, failed: bool) -> None:
    dead = dataclasses.replace(RESTARTED, state="dead", failed=failed)
    with pytest.raises(TaskFailed, match="the task is dead" + (r" \(failed\)" if failed else "$")):
        _wait(clock, HealthSource.NOMAD, _alloc(dead), [])


def test_an_allocation_nomad_forgot_fails_the_wait(clock: Clock) -> None:
    answers = Answers(clock, _alloc(BEFORE), [_check()])
    gate = _gate(clock, answers, HealthSource.CONSUL)
    threading.Timer(clock.real(1), answers.forget_allocation).start()
    start = clock.monotonic()
    with pytest.raises(TaskFailed, match=r"failed after the restart: Nomad no longer knows the allocation$"):
        gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
    assert clock.monotonic() - start < PASSES / 2, "the failure was noticed only at the deadline"


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_the_old_run_is_not_the_restart(clock: Clock, source: HealthSource) -> None:
    with pytest.raises(HealthTimeout, match="has not restarted yet"):
        _wait(clock, source, _alloc(BEFORE), [_check()], deadline=TIMES_OUT)


@pytest.mark.parametrize(
    "now",
    [
        dataclasses.replace(BEFORE, restarts=1),
        dataclasses.replace(BEFORE, started_at=1001.0),
    ],
    ids=["more restarts", "started later"],
)
def test_more_restarts_or_a_later_start_is_a_restart(clock: Clock, now: TaskState) -> None:
    assert _wait(clock, HealthSource.CONSUL, _alloc(now), [_check()]).alloc_id == ALLOC


def test_a_task_that_never_started_before_counts_as_restarted_once_it_starts(clock: Clock) -> None:
    never = TaskState(state="pending")
    assert _wait(clock, HealthSource.NOMAD, _alloc(), [], before=never).alloc_id == ALLOC


def test_an_earlier_start_is_not_a_restart(clock: Clock) -> None:
    earlier = dataclasses.replace(BEFORE, started_at=999.0)
    with pytest.raises(HealthTimeout, match="has not restarted yet"):
        _wait(clock, HealthSource.NOMAD, _alloc(earlier), [], deadline=TIMES_OUT)


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_a_restarted_task_not_yet_running_is_not_healthy(clock: Clock, source: HealthSource) -> None:
    pending = dataclasses.replace(RESTARTED, state="pending")
    with pytest.raises(HealthTimeout, match="the task is pending"):
        _wait(clock, source, _alloc(pending), [_check()], deadline=TIMES_OUT)


def test_a_task_nomad_has_no_state_for_is_not_healthy(clock: Clock) -> None:
    alloc = dataclasses.replace(_alloc(), task_states={})
    with pytest.raises(HealthTimeout, match=r"s: Nomad reports no state for the task yet$"):
        _wait(clock, HealthSource.NOMAD, alloc, [], deadline=TIMES_OUT)


@pytest.mark.parametrize("source", CHECK_SOURCES)
@pytest.mark.parametrize("status", [CheckStatus.CRITICAL, CheckStatus.WARNING])
def test_a_check_not_passing_is_not_healthy(clock: Clock, source: HealthSource, status: CheckStatus) -> None:
    checks = [_check(), dataclasses.replace(_check(status=status), check_id="second")]
    with pytest.raises(HealthTimeout, match=f"is {status}"):
        _wait(clock, source, _alloc(), checks, deadline=TIMES_OUT)


def test_the_timeout_names_every_check_not_passing_by_name_or_id(clock: Clock) -> None:
    named = dataclasses.replace(_check(status=CheckStatus.CRITICAL), check_id="web-http", name="HTTP probe")
    unnamed = dataclasses.replace(_check(status=CheckStatus.WARNING), check_id="web-tcp", name="")
    with pytest.raises(
        HealthTimeout,
        match=r"s: service web: check HTTP probe is critical; service web: check web-tcp is warning$",
    ):
        _wait(clock, HealthSource.CONSUL, _alloc(), [_check(), named, unnamed], deadline=TIMES_OUT)


def test_no_answer_from_nomad_is_not_healthy(clock: Clock) -> None:
    answers = Answers(clock, _alloc(), [_check()])
    answers.nomad_errors = 1_000_000  # every read of the allocation fails
    gate = _gate(clock, answers, HealthSource.NOMAD, deadline=TIMES_OUT)
    with pytest.raises(HealthTimeout, match=r"within 10s: no answer from Nomad yet$"):
        gate.wait_healthy(ALLOC, "server", before=BEFORE)
    tries = 1_000_000 - answers.nomad_errors
    assert 2 <= tries <= 10, f"{tries} reads in 10 cluster seconds: not one per ERROR_BACKOFF (2 s)"


def test_source_nomad_ignores_the_checks(clock: Clock) -> None:
    report = _wait(clock, HealthSource.NOMAD, _alloc(), [_check(status=CheckStatus.CRITICAL)])
    assert report.alloc_id == ALLOC


def test_every_service_must_have_passing_checks(clock: Clock) -> None:
    api = dataclasses.replace(_check(), check_id="api-check", service_name="api")
    checks = [_check(), dataclasses.replace(api, status=CheckStatus.CRITICAL)]
    with pytest.raises(HealthTimeout, match=r"service api: check .* is critical"):
        _wait(clock, HealthSource.CONSUL, _alloc(), checks, ("web", "api"), deadline=TIMES_OUT)


@pytest.fixture
def flapping(clock: Clock) -> Iterator[tuple[Answers, HealthGate]]:
    answers = Answers(clock, _alloc(), [_check()])
    yield answers, _gate(clock, answers, HealthSource.CONSUL, min_healthy_time=30)


def test_an_unhealthy_answer_restarts_the_stable_timer(
    clock: Clock, flapping: tuple[Answers, HealthGate]
) -> None:
    answers, gate = flapping
    marks: list[float] = []

    def flap() -> None:
        clock.sleep(2)
        answers.wait_served(answers.set(checks=[_check(status=CheckStatus.CRITICAL)]))
        answers.set(checks=[_check()])
        marks.append(clock.time())

    flapper = threading.Thread(target=flap)
    flapper.start()
    report = gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
    flapper.join()
    assert marks and report.healthy_at >= marks[0] + 30 - 0.01, "the stable timer did not restart"


def test_cancel_ends_the_wait_with_lock_lost(clock: Clock) -> None:
    answers = Answers(clock, _alloc(BEFORE), [])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LockLost, match="cancelled"):
        _gate(clock, answers, HealthSource.CONSUL).wait_healthy(
            ALLOC, "server", before=BEFORE, services=["web"], cancel=cancel
        )


def test_the_baseline_of_a_task_without_state_is_pending(clock: Clock) -> None:
    answers = Answers(clock, dataclasses.replace(_alloc(), task_states={}), [])
    assert _gate(clock, answers, HealthSource.NOMAD).baseline(ALLOC, "server") == TaskState(state="pending")


@pytest.mark.parametrize("source", CHECK_SOURCES)
def test_no_answer_from_consul_is_not_healthy(clock: Clock, source: HealthSource) -> None:
    answers = Answers(clock, _alloc(), [_check()])
    answers.consul_silent = True
    gate = _gate(clock, answers, source, deadline=TIMES_OUT)
    with pytest.raises(HealthTimeout, match="no answer from Consul for service web yet"):
        gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])


def test_the_gate_keeps_watching_after_nomad_fails(clock: Clock) -> None:
    answers = Answers(clock, _alloc(), [_check()])
    answers.nomad_errors = 2
    report = _gate(clock, answers, HealthSource.NOMAD).wait_healthy(ALLOC, "server", before=BEFORE)
    assert report.alloc_id == ALLOC and answers.nomad_errors == 0


def test_cancel_is_noticed_while_no_answer_comes(clock: Clock) -> None:
    # Nomad's query holds (nothing changes): only the gate's own look at cancel can end the wait early.
    answers = Answers(clock, _alloc(BEFORE), [])
    answers.nomad_holds = True
    cancel = threading.Event()
    gate = _gate(clock, answers, HealthSource.NOMAD, deadline=10 * PASSES)
    threading.Timer(clock.real(2), cancel.set).start()
    start = clock.monotonic()
    try:
        with pytest.raises(LockLost, match="cancelled"):
            gate.wait_healthy(ALLOC, "server", before=BEFORE, cancel=cancel)
        assert clock.monotonic() - start < 5 * PASSES, "cancel was noticed only at the deadline"
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]  # ends the held query


def test_a_failure_after_the_first_answer_ends_the_wait_at_once(clock: Clock) -> None:
    # One answer judged (not restarted yet), then the next says the task is dead: the gate must wake
    # for it, not find it at the deadline.
    answers = Answers(clock, _alloc(BEFORE), [])
    answers.nomad_holds = True
    gate = _gate(clock, answers, HealthSource.NOMAD, deadline=10 * PASSES)
    dead = dataclasses.replace(RESTARTED, state="dead")
    threading.Timer(clock.real(2), lambda: answers.set(alloc=_alloc(dead))).start()
    start = clock.monotonic()
    try:
        with pytest.raises(TaskFailed, match="the task is dead"):
            gate.wait_healthy(ALLOC, "server", before=BEFORE)
        assert clock.monotonic() - start < 5 * PASSES, "the failure was noticed only at the deadline"
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]


class CountingClock(Clock):
    """A clock that counts how often the gate read it and waited on it: how often it looked again."""

    def __init__(self, scale: float) -> None:
        super().__init__(scale=scale)
        self.waits = 0
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return super().monotonic()

    def wait_for(self, condition: threading.Condition, predicate: object, seconds: float | None) -> bool:
        self.waits += 1
        return super().wait_for(condition, predicate, seconds)


@pytest.mark.parametrize(
    ("source", "task", "services", "with_cancel"),
    [
        (HealthSource.NOMAD, RESTARTED, (), False),
        (HealthSource.NOMAD, RESTARTED, (), True),
        (HealthSource.CONSUL, RESTARTED, ("web",), False),
        (HealthSource.NOMAD, BEFORE, (), False),
        (HealthSource.CONSUL, BEFORE, ("web",), False),
    ],
    ids=[
        "stable",
        "stable, with cancel",
        "stable, with checks",
        "not restarted",
        "not restarted, with checks",
    ],
)
def test_the_gate_sleeps_between_looks(
    clock: Clock, source: HealthSource, task: TaskState, services: tuple[str, ...], with_cancel: bool
) -> None:
    # 30 cluster seconds of stable time, or of waiting for a restart that does not come: a look per
    # CANCEL_CHECK (1 s) and per answer, not a spin.
    counting = CountingClock(SCALE)
    answers = Answers(clock, _alloc(task), [_check()])
    gate = HealthGate(
        answers,  # type: ignore[arg-type]
        answers,  # type: ignore[arg-type]
        source=source,
        min_healthy_time=30,
        healthy_deadline=PASSES if task is RESTARTED else 30,
        clock=counting,
    )
    cancel = threading.Event() if with_cancel else None
    if task is RESTARTED:
        gate.wait_healthy(ALLOC, "server", before=BEFORE, services=services, cancel=cancel)
    else:
        with pytest.raises(HealthTimeout, match="has not restarted yet"):
            gate.wait_healthy(ALLOC, "server", before=BEFORE, services=services, cancel=cancel)
    assert counting.waits < 200, f"the gate waited {counting.waits} times in 30 cluster seconds"
    assert counting.reads < 1000, f"the gate read the clock {counting.reads} times in 30 cluster seconds"


def test_a_failed_consul_subscription_is_tried_again_after_the_backoff(clock: Clock) -> None:
    # The first read of the checks fails and no other answer comes (Nomad's query holds): the gate
    # must wake to try again after ERROR_BACKOFF, not at the deadline.
    answers = Answers(clock, _alloc(), [_check()])
    answers.nomad_holds = True
    answers.consul_errors = 1
    gate = _gate(clock, answers, HealthSource.CONSUL, deadline=PASSES)
    try:
        report = gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]
    assert report.alloc_id == ALLOC and answers.consul_errors == 0


def test_the_gate_keeps_watching_after_a_query_of_its_watch_fails(clock: Clock) -> None:
    answers = Answers(clock, _alloc(BEFORE), [])
    gate = _gate(clock, answers, HealthSource.NOMAD)

    def restart_after_a_failed_query() -> None:
        answers.fail_next_watch()
        answers.set(alloc=_alloc())

    restarter = threading.Thread(target=restart_after_a_failed_query)
    restarter.start()
    try:
        report = gate.wait_healthy(ALLOC, "server", before=BEFORE)
    finally:
        restarter.join(30)
    assert report.running_at == RESTARTED.started_at


def test_the_watches_ask_first_at_once_then_in_blocking_queries_of_max_wait(clock: Clock) -> None:
    answers = Answers(clock, _alloc(), [_check()])
    gate = _gate(clock, answers, HealthSource.CONSUL, min_healthy_time=2 * MAX_WAIT + 5)
    gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
    for backend, first_wait in [("nomad", MAX_WAIT), ("consul", None)]:
        first, *then = [(index, wait) for b, index, wait in answers.queries if b == backend]
        assert first == (0, first_wait), backend
        assert len(then) >= 2 and all(index > 0 and wait == MAX_WAIT for index, wait in then), (backend, then)


def test_the_gate_keeps_watching_after_a_query_of_its_checks_watch_fails(clock: Clock) -> None:
    answers = Answers(clock, _alloc(), [_check(status=CheckStatus.CRITICAL)])
    gate = _gate(clock, answers, HealthSource.CONSUL)

    def pass_after_a_failed_query() -> None:
        answers.fail_next_checks_watch()
        answers.set(checks=[_check()])

    passer = threading.Thread(target=pass_after_a_failed_query)
    passer.start()
    try:
        report = gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
    finally:
        passer.join(30)
    assert report.alloc_id == ALLOC


@pytest.mark.parametrize(
    "task",
    [BEFORE, dataclasses.replace(RESTARTED, state="pending")],
    ids=["not restarted", "restarted, not running yet"],
)
def test_consul_is_not_asked_before_the_restarted_task_runs(clock: Clock, task: TaskState) -> None:
    answers = Answers(clock, _alloc(task), [_check()])
    with pytest.raises(HealthTimeout):
        _gate(clock, answers, HealthSource.CONSUL, deadline=TIMES_OUT).wait_healthy(
            ALLOC, "server", before=BEFORE, services=["web"]
        )
    assert answers.consul_reads == 0


@pytest.mark.parametrize(
    ("source", "services", "logged"),
    [
        (HealthSource.CONSUL, (), True),
        (HealthSource.BOTH, (), True),
        (HealthSource.CONSUL, ("web",), False),
        (HealthSource.BOTH, ("web",), False),
        (HealthSource.NOMAD, (), False),
    ],
    ids=["consul without services", "both without services", "consul", "both", "nomad"],
)
def test_a_check_source_without_services_says_once_that_nomad_judges(
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    source: HealthSource,
    services: tuple[str, ...],
    logged: bool,
) -> None:
    gate = _gate(clock, Answers(clock, _alloc(), [_check()]), source, min_healthy_time=0)
    with caplog.at_level(logging.INFO, logger="shepard_lib.health"):
        for _ in range(2):
            assert gate.wait_healthy(ALLOC, "server", before=BEFORE, services=services).alloc_id == ALLOC
    said = [r.getMessage() for r in caplog.records if "no Consul services" in r.getMessage()]
    expected = "web/app/server has no Consul services: its health is judged by its Nomad task state only"
    assert said == ([expected] if logged else [])


def test_cancel_while_waiting_ends_the_wait_with_lock_lost(clock: Clock) -> None:
    answers = Answers(clock, _alloc(BEFORE), [])
    cancel = threading.Event()
    threading.Timer(clock.real(2), cancel.set).start()
    start = clock.monotonic()
    with pytest.raises(LockLost, match="cancelled"):
        _gate(clock, answers, HealthSource.CONSUL).wait_healthy(
            ALLOC, "server", before=BEFORE, services=["web"], cancel=cancel
        )
    assert clock.monotonic() - start < PASSES / 2, "cancel was noticed only at the deadline"


# --- healthy_now: is a task healthy right now (a failed member's task came back), no restart needed ---


def _now(
    clock: Clock,
    source: HealthSource,
    alloc: Allocation,
    checks: list[HealthCheck],
    services: tuple[str, ...] = ("web",),
) -> bool:
    return _gate(clock, Answers(clock, alloc, checks), source).healthy_now(ALLOC, "server", services)


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_healthy_now_a_running_task_with_passing_checks(clock: Clock, source: HealthSource) -> None:
    # The old run counts: healthy_now does not ask for a restart.
    assert _now(clock, source, _alloc(BEFORE), [_check(), _check(OTHER, CheckStatus.CRITICAL)])


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_healthy_now_an_allocation_nomad_forgot_is_not_healthy(clock: Clock, source: HealthSource) -> None:
    answers = Answers(clock, _alloc(), [_check()])
    answers.forget_allocation()
    assert not _gate(clock, answers, source).healthy_now(ALLOC, "server", ["web"])


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize(
    "alloc",
    [
        dataclasses.replace(_alloc(), task_states={}),
        _alloc(dataclasses.replace(RESTARTED, state="pending")),
        _alloc(dataclasses.replace(RESTARTED, state="dead")),
        _alloc(client_status="pending"),
        _alloc(desired="stop"),
    ],
    ids=["no task state", "task pending", "task dead", "allocation pending", "allocation to stop"],
)
def test_healthy_now_needs_the_task_and_the_allocation_running(
    clock: Clock, source: HealthSource, alloc: Allocation
) -> None:
    assert not _now(clock, source, alloc, [_check()])


@pytest.mark.parametrize(
    ("source", "services", "healthy"),
    [
        (HealthSource.NOMAD, ("web",), False),
        (HealthSource.CONSUL, (), False),
        (HealthSource.BOTH, ("web",), False),
        (HealthSource.BOTH, (), False),
        (HealthSource.CONSUL, ("web",), True),  # the checks decide, not the flag
    ],
    ids=["nomad", "consul without services", "both", "both without services", "consul with services"],
)
def test_healthy_now_reads_nomads_failed_flag_as_wait_healthy_does(
    clock: Clock, source: HealthSource, services: tuple[str, ...], healthy: bool
) -> None:
    failed = dataclasses.replace(RESTARTED, failed=True)
    assert _now(clock, source, _alloc(failed), [_check()], services) is healthy


@pytest.mark.parametrize(
    ("source", "services", "healthy"),
    [
        (HealthSource.NOMAD, ("web",), True),
        (HealthSource.CONSUL, (), True),
        (HealthSource.BOTH, (), True),
        (HealthSource.CONSUL, ("web",), False),
        (HealthSource.BOTH, ("web",), False),
    ],
    ids=["nomad", "consul without services", "both without services", "consul", "both"],
)
def test_healthy_now_reads_the_checks_only_for_a_check_source_with_services(
    clock: Clock, source: HealthSource, services: tuple[str, ...], healthy: bool
) -> None:
    assert _now(clock, source, _alloc(), [_check(status=CheckStatus.CRITICAL)], services) is healthy


@pytest.mark.parametrize("source", CHECK_SOURCES)
@pytest.mark.parametrize(
    ("checks", "services"),
    [
        ([], ("web",)),
        ([_check(OTHER)], ("web",)),
        ([_check(), _check(status=CheckStatus.WARNING)], ("web",)),
        (
            [_check(), dataclasses.replace(_check(status=CheckStatus.CRITICAL), service_name="api")],
            ("web", "api"),
        ),
        ([_check()], ("web", "api")),
    ],
    ids=[
        "no checks",
        "another allocation's check",
        "one check warning",
        "another service critical",
        "another service without checks",
    ],
)
def test_healthy_now_needs_a_passing_check_of_this_allocation_on_every_service(
    clock: Clock, source: HealthSource, checks: list[HealthCheck], services: tuple[str, ...]
) -> None:
    assert not _now(clock, source, _alloc(), checks, services)


# --- close_watches: the owner of the backends ends the gates' watches (an agent that stops) ---


def _watch_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """The allocation watch loops started since ``before`` (earlier tests' loops may still be ending)."""
    name = f"shepard-watch-nomad-allocation[{ALLOC}]"
    return [t for t in threading.enumerate() if t.name == name and t not in before]


def test_close_watches_ends_the_watch_of_a_wait_in_flight_and_a_later_gate_watches_again(
    clock: Clock,
) -> None:
    before = set(threading.enumerate())
    answers = Answers(clock, _alloc(BEFORE), [_check()])
    answers.nomad_holds = True  # the loop's query ends only when close_watches cancels it
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            _gate(clock, answers, HealthSource.NOMAD, deadline=10 * PASSES).wait_healthy(
                ALLOC, "server", before=BEFORE, cancel=cancel
            )
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        answers.wait_blocking()  # the gate's watch loop follows the allocation
        assert _watch_threads(before), "the gate does not watch the allocation"
        close_watches(answers, answers)  # type: ignore[arg-type]
        assert not _watch_threads(before), "the watch loop outlived close_watches"
    finally:
        cancel.set()
        waiter.join(30)
    assert [type(exc) for exc in outcome] == [LockLost]
    answers.set(alloc=_alloc())
    try:
        report = _gate(clock, answers, HealthSource.NOMAD).wait_healthy(ALLOC, "server", before=BEFORE)
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]
    assert report.alloc_id == ALLOC


def test_close_watches_cancels_the_checks_query_in_flight(clock: Clock) -> None:
    before = set(threading.enumerate())
    answers = Answers(clock, _alloc(), [_check()])
    answers.nomad_holds = answers.consul_holds = True
    cancel = threading.Event()
    gate = _gate(clock, answers, HealthSource.CONSUL, min_healthy_time=10 * PASSES, deadline=20 * PASSES)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"], cancel=cancel)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        answers.wait_query("consul")
        close_watches(answers, answers)  # type: ignore[arg-type]
        left = [
            t.name for t in threading.enumerate() if t.name.startswith("shepard-watch-") and t not in before
        ]
        assert left == [], "watch loops outlived close_watches"
    finally:
        cancel.set()
        waiter.join(30)
    assert [type(exc) for exc in outcome] == [LockLost]


def test_gates_on_the_same_backends_share_one_watch_of_an_allocation(clock: Clock) -> None:
    before = set(threading.enumerate())
    answers = Answers(clock, _alloc(BEFORE), [])
    answers.nomad_holds = True
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            _gate(clock, answers, HealthSource.NOMAD).wait_healthy(
                ALLOC, "server", before=BEFORE, cancel=cancel
            )
        except BaseException as exc:
            outcome.append(exc)

    first = threading.Thread(target=wait)
    first.start()
    try:
        answers.wait_blocking()  # the first gate's watch holds its query
        second = _gate(clock, answers, HealthSource.NOMAD, deadline=TIMES_OUT)
        with pytest.raises(HealthTimeout):
            second.wait_healthy(ALLOC, "server", before=BEFORE)
        assert len(_watch_threads(before)) == 1, "the second gate started its own watch of the allocation"
    finally:
        cancel.set()
        first.join(30)
        close_watches(answers, answers)  # type: ignore[arg-type]
    assert [type(exc) for exc in outcome] == [LockLost]


def test_close_watches_of_backends_without_watches_does_nothing(clock: Clock) -> None:
    answers = Answers(clock, _alloc(), [])
    unknown = Answers(clock, _alloc(), [])
    close_watches(unknown, unknown)  # type: ignore[arg-type]  # no gate ever used them
    _gate(clock, answers, HealthSource.NOMAD)
    close_watches(answers, unknown)  # type: ignore[arg-type]  # gates used this Consul, not this Nomad
    close_watches(answers, answers)  # type: ignore[arg-type]
    close_watches(answers, answers)  # type: ignore[arg-type]  # closed already


# --- watch_nodes: a gate follows the allocation's Consul node, learned from Consul's answers ---


def _sources(answers: Answers, since: int = 0) -> set[str]:
    """Which Consul watches the gates queried (``consul`` for a service's, ``node:<n>`` for a node's)."""
    return {backend for backend, _, _ in answers.queries[since:] if backend != "nomad"}


def _node_gate(
    clock: Clock, answers: Answers, deadline: float = PASSES, min_healthy_time: float = 2
) -> HealthGate:
    return HealthGate(
        answers,  # type: ignore[arg-type]
        answers,  # type: ignore[arg-type]
        source=HealthSource.CONSUL,
        min_healthy_time=min_healthy_time,
        healthy_deadline=deadline,
        clock=clock,
        watch_nodes=True,
    )


def test_with_node_watches_a_gate_follows_the_consul_node_named_as_the_nomad_node_and_no_service(
    clock: Clock,
) -> None:
    answers = Answers(clock, _alloc(), [_check(node="n1"), _check(OTHER, node="n2")])
    try:
        _node_gate(clock, answers).wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
        assert _sources(answers) == {"node:n1"}
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]


def test_without_node_watches_a_gate_only_ever_follows_services(clock: Clock) -> None:
    answers = Answers(clock, _alloc(), [_check(node="n1")])
    gate = _gate(clock, answers, HealthSource.CONSUL)
    try:
        gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
        assert _sources(answers) == {"consul"}
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]


def test_where_consul_has_no_node_of_the_nomad_nodes_name_a_gate_follows_the_service_at_once_and_learns() -> (
    None
):
    real_time = Clock(scale=1.0)  # NODE_GRACE is 10 real seconds: a wait that waited for it times out
    answers = Answers(real_time, _alloc(), [_check(node="ip-10-0-0-5")])  # n1's Consul agent has another name
    try:
        _node_gate(real_time, answers, deadline=NODE_GRACE * 0.9, min_healthy_time=0.2).wait_healthy(
            ALLOC, "server", before=BEFORE, services=["web"]
        )
        assert _sources(answers) == {"node:n1", "consul"}
        later = len(answers.queries)
        _node_gate(real_time, answers, min_healthy_time=0.2).wait_healthy(
            ALLOC, "server", before=BEFORE, services=["web"]
        )
        assert _sources(answers, later) == {"node:ip-10-0-0-5"}, "did not learn the node from the service"
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]


def test_a_node_watch_that_shows_none_of_the_allocations_checks_falls_back_to_the_service_after_its_grace(
    clock: Clock,
) -> None:
    answers = Answers(clock, _alloc(), [_check(node="n1"), _check(OTHER, node="n1")])
    gate = _node_gate(clock, answers)
    try:
        answers.set(checks=[_check(node="consul-n1"), _check(OTHER, node="n1")])  # this allocation's moved
        start = clock.monotonic()
        gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])  # not a HealthTimeout
        assert clock.monotonic() - start >= NODE_GRACE, "followed the service before the node's grace ended"
        assert _sources(answers) == {"node:n1", "consul"}
        again = len(answers.queries)
        gate.wait_healthy(ALLOC, "server", before=BEFORE, services=["web"])
        assert _sources(answers, again) == {"node:consul-n1"}, "did not learn the node from the service"
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]


def test_a_node_watch_that_shows_none_of_the_allocations_checks_names_the_node_when_it_times_out(
    clock: Clock,
) -> None:
    answers = Answers(clock, _alloc(), [_check(node="consul-b"), _check(OTHER, node="n1")])
    try:
        with pytest.raises(HealthTimeout, match="no checks registered for this allocation on Consul node n1"):
            _node_gate(clock, answers, NODE_GRACE / 2).wait_healthy(
                ALLOC, "server", before=BEFORE, services=["web"]
            )
    finally:
        close_watches(answers, answers)  # type: ignore[arg-type]
