"""The coordinator's decisions, one rule per test, each with the values it must produce.

Written against the survivors of ``scripts/mutation coordinator`` (docs/testing.md, "Mutation
testing"): every test here fails when one line of ``shepard_lib/coordinator.py`` that decides
whether a waiter needs a slot, a reclaim and whether it fires again, a give-back, a skip, the
concurrency wait, a finish and its slot release, or when a drive gives up, is changed. Each states
the outcome it expects in full (``MemberOutcome`` equality, the events emitted, the plan written),
so that what a result reports is pinned as well as what is decided.

Sim-only: these tests read the sim's restart record and disturb its Consul and Nomad through
proxies and the fault hook.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from coordination_support import KEYS, PLAN_KEY, SCALE, SCOPE, Cluster, restarts_by_alloc, scenario
from fault_support import ConsulProxy, NomadProxy

from shepard_lib.backends import NomadAPI
from shepard_lib.config import HealthSource, LockScope, RestartMethod
from shepard_lib.coordinator import (
    INTERRUPTED,
    PLAN_WAIT,
    SESSION_ATTEMPTS,
    Coordinator,
    EventKind,
    MemberOutcome,
    Outcome,
    RolloutEvent,
    SimulatedCrash,
    Step,
    Target,
    target_for,
)
from shepard_lib.errors import ConsulError, LockLost, NomadError
from shepard_lib.health import HealthGate
from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.locks import RestartSlots
from shepard_lib.model import Allocation, KVEntry, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import Member, MemberState, Plan, PlanSettings, PlanStatus, abort, require
from shepard_lib.session import Session
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.trigger import describe

pytestmark = pytest.mark.usefixtures("no_client_env")

NO_SUCH_SERVICE = "no-such-service"
"""A service Consul has no check for: healthy by source ``nomad``, never by source ``consul``."""


class Events(list[RolloutEvent]):
    """An observer that keeps every event."""

    def __call__(self, event: RolloutEvent) -> None:
        self.append(event)

    def of(self, alloc_id: str) -> list[tuple[Any, ...]]:
        """(kind, scope, ref, detail) of each event about ``alloc_id``, in order."""
        return [(e.kind, e.scope, e.ref, e.detail) for e in self if e.alloc_id == alloc_id]


def assert_skipped_and_left_pending(
    sim: Any, cluster: Cluster, events: Events, target: Target, outcome: MemberOutcome
) -> None:
    """The drive reported ``target`` skipped (with an event), left it pending and restarted nothing."""
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, outcome.reason)
    assert events.of(target.alloc_id)[-1] == (EventKind.SKIPPED, SCOPE, target.ref, outcome.reason)
    assert cluster.plan().members[target.alloc_id].state == MemberState.PENDING
    assert restarts_by_alloc(sim) == {}


class RecordingConsul(ConsulProxy):
    """Records the txns sent and the lock releases asked for."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.txns: list[list[TxnOp]] = []
        self.releases: list[str] = []

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        self.txns.append(list(ops))
        return self._inner.txn(ops)

    def release(self, key: str, session_id: str) -> bool:
        self.releases.append(key)
        return bool(self._inner.release(key, session_id))


class SlotRecorder(ConsulProxy):
    """Records the slots taken (applied txn ``lock`` ops) and the blocking waits on the slots."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.locks: list[str] = []
        self.waits: list[float] = []
        self.waiting = threading.Event()  # a blocking wait on the slots was sent

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        result: TxnResult = self._inner.txn(ops)
        prefix = KEYS.slot_prefix(SCOPE)
        if result.ok:
            self.locks += [op.key for op in ops if op.verb == TxnVerb.LOCK and op.key.startswith(prefix)]
        return result

    def watch(self, key: str, index: int, wait: float, **kwargs: Any) -> tuple[int, list[KVEntry]]:
        if key.startswith(KEYS.slot_prefix(SCOPE)):
            self.waits.append(wait)
            self.waiting.set()
        return self._inner.watch(key, index, wait, **kwargs)  # type: ignore[no-any-return]


def slot_holders(cluster: Cluster) -> dict[str, str]:
    """Slot number -> the session holding it."""
    prefix = KEYS.slot_prefix(SCOPE).rstrip("/") + "/"
    entries = cluster.consul.get_tree(prefix, consistent=True)
    return {e.key[len(prefix) :]: e.session for e in entries if e.session}


def coordinator(
    cluster: Cluster,
    session: Session,
    name: str,
    *,
    consul: Any = None,
    nomad: Any = None,
    **options: Any,
) -> Coordinator:
    """A coordinator on ``session`` whose options are the cluster's with ``options`` changed; the
    keyword arguments Coordinator takes (observer, fault_hook, session_factory, stop) pass through."""
    keywords = ("observer", "fault_hook", "session_factory", "stop")
    passed = {k: options.pop(k) for k in keywords if k in options}
    return Coordinator(
        consul or cluster.consul,
        nomad or cluster.nomad,
        KEYS,
        session,
        replace(cluster.options, **options),
        clock=cluster.clock,
        name=name,
        **passed,
    )


def register(cluster: Cluster, allocs: Sequence[Allocation], **options: Any) -> Plan:
    """Register ``allocs`` in a new plan, by a coordinator with the cluster's options and ``options``."""
    with cluster.session("planner") as session:
        return coordinator(cluster, session, "planner", **options).register(
            SCOPE, [cluster.target(a) for a in allocs], cluster.nomad.job("web")
        )


def rewrite(cluster: Cluster, alloc_id: str, **fields: Any) -> Plan:
    """Write ``fields`` into one member of the plan (a state another participant left)."""

    def change(p: Plan | None, _index: int) -> Plan:
        plan = require(p, PLAN_KEY)
        return replace(plan, members={**plan.members, alloc_id: replace(plan.members[alloc_id], **fields)})

    return cluster.plans.update_at(PLAN_KEY, change)


def lost_session(cluster: Cluster, name: str) -> Session:
    """A session Consul no longer knows, and that knows it is lost."""
    session = cluster.session(name)
    session.create()
    cluster.consul.session_destroy(session.id)
    with pytest.raises(LockLost):
        session.verify()
    assert session.lost.is_set()
    return session


def wait_restarted(cluster: Cluster, alloc: Allocation) -> None:
    """Wait (blocking queries, no sleep) until Nomad shows ``alloc``'s task running again after a restart."""
    gate = HealthGate(
        cluster.consul,
        cluster.nomad,
        source=HealthSource.NOMAD,
        min_healthy_time=0.0,
        healthy_deadline=60.0,
        clock=cluster.clock,
    )
    gate.wait_healthy(alloc.id, "server", before=alloc.task_states["server"])


# --- MemberOutcome.to_dict: what a result reports -----------------------------------------------------


def test_an_outcome_reports_every_field_under_its_own_name() -> None:
    ref = TaskRef("node-2", "web", "app", "server", 4)
    outcome = MemberOutcome(
        Target(ref, "alloc-1", ("web",)),
        Outcome.FAILED,
        "unhealthy",
        7,
        by="agent node-2",
        duration=12.5,
        reclaimed=True,
        stopped=True,
    )
    assert outcome.to_dict() == {
        "alloc_id": "alloc-1",
        "node": "node-2",
        "job": "web",
        "group": "app",
        "task": "server",
        "alloc_index": 4,
        "outcome": "failed",
        "reason": "unhealthy",
        "generation": 7,
        "by": "agent node-2",
        "duration": 12.5,
        "reclaimed": True,
        "stopped": True,
    }


# --- _needs_slot and driven: whether a waiter still needs a slot ----------------------------------------


def test_a_waiter_needs_a_slot_only_for_its_pending_member_of_a_plan_that_goes_on_or_one_nobody_drives(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b, c = cluster.allocs()
    register(cluster, [a, b, c])
    with cluster.session("waiter") as session, cluster.session("holder") as holder:
        waiter = coordinator(cluster, session, "waiter")
        dead = lost_session(cluster, "dead")
        rewrite(
            cluster, b.id, state=MemberState.RESTARTING, holder="h", session=holder.id, holder_name="holder"
        )
        rewrite(cluster, c.id, state=MemberState.RESTARTING, holder="d", session=dead.id, holder_name="dead")
        plan = cluster.plan()
        assert waiter._needs_slot(PLAN_KEY, a.id), "a pending member of a planned plan needs its slot"
        assert not waiter._needs_slot(PLAN_KEY, b.id), "a live holder drives it: no slot needed"
        assert waiter.driven(plan.members[b.id])
        assert waiter._needs_slot(PLAN_KEY, c.id), "nobody drives it: a slot to reclaim it"
        assert not waiter.driven(plan.members[c.id])
        assert not waiter._needs_slot(PLAN_KEY, "no-such-alloc"), "not in the plan"
        assert not waiter._needs_slot(KEYS.task_lock_key(replace(SCOPE, task="other")), a.id), "no plan"
        rewrite(cluster, c.id, state=MemberState.DONE, holder=None, session=None)
        assert not waiter._needs_slot(PLAN_KEY, c.id), "a settled member needs nothing"
        cluster.plans.update_at(
            PLAN_KEY, lambda p, i: abort(require(p, PLAN_KEY), reason="operator", now=0.0, index=i)
        )
        assert not waiter._needs_slot(PLAN_KEY, a.id), "a halted plan starts no restart"


# --- _finished_by_other and _skip: what a drive reports for a member settled by others -------------------


@pytest.mark.parametrize(
    ("state", "error", "holder_name", "expected"),
    [
        (MemberState.DONE, None, "other", (Outcome.RESTARTED, "restarted by other", "by other", "other")),
        (MemberState.DONE, None, None, (Outcome.RESTARTED, "restarted by ", "by ", "")),
        (MemberState.FAILED, "unhealthy", "other", (Outcome.FAILED, "unhealthy", "unhealthy", "other")),
        (MemberState.FAILED, None, None, (Outcome.FAILED, "failed", "", "")),
    ],
    ids=["done", "done by nobody named", "failed", "failed without an error"],
)
def test_a_member_another_participant_settled_is_reported_as_it_settled_it(
    sim_cluster_factory: SimClusterFactory,
    state: MemberState,
    error: str | None,
    holder_name: str | None,
    expected: tuple[Outcome, str, str, str],
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    rewrite(cluster, a.id, state=state, generation=3, holder_name=holder_name, error=error)
    events = Events()
    target = cluster.target(a)
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent", observer=events).drive(target)
    kind, reason, detail, by = expected
    assert outcome == MemberOutcome(target, kind, reason, 3, by=by)
    event = EventKind.RESTARTED if kind is Outcome.RESTARTED else EventKind.FAILED
    assert events.of(a.id) == [(event, SCOPE, target.ref, detail)]
    assert restarts_by_alloc(sim) == {}


@pytest.mark.parametrize(("error", "reason"), [("replaced: by b", "replaced: by b"), (None, "skipped")])
def test_a_member_skipped_in_the_plan_is_reported_skipped_and_stopped_with_its_reason(
    sim_cluster_factory: SimClusterFactory, error: str | None, reason: str
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    rewrite(cluster, a.id, state=MemberState.SKIPPED, error=error)
    events = Events()
    target = cluster.target(a)
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent", observer=events).drive(target)
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, reason, stopped=True)
    assert events.of(a.id) == [(EventKind.SKIPPED, SCOPE, target.ref, reason)]


def test_a_member_this_process_last_saw_done_is_read_again_and_restarted_for_a_new_change(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """What this process knows (a done) is not what ends a drive: another process registered a new
    change, so a is pending in generation 2, and the drive restarts it."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster, elsewhere = Cluster(sim), Cluster(sim)  # two processes: each knows the plans it saw
    (a,) = cluster.allocs()
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent")
        assert agent.handle_change(a, "server").outcome == Outcome.RESTARTED
        assert cluster.plans.known(PLAN_KEY)[0].members[a.id].state == MemberState.DONE  # type: ignore[union-attr]
        register(elsewhere, [a])
        outcome = agent.drive(cluster.target(a))
    assert (outcome.outcome, outcome.generation, outcome.by) == (Outcome.RESTARTED, 2, "agent"), outcome
    assert restarts_by_alloc(sim) == {a.id: 2}


def test_a_member_of_a_halted_plan_is_skipped_with_the_plans_reason_and_not_as_stopped(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    cluster.plans.update_at(
        PLAN_KEY, lambda p, i: abort(require(p, PLAN_KEY), reason="operator", now=0.0, index=i)
    )
    events = Events()
    target = cluster.target(a)
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent", observer=events).drive(target)
    reason = "plan web/app/server is aborted: operator"
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, reason)
    assert events.of(a.id) == [(EventKind.SKIPPED, SCOPE, target.ref, reason)]
    assert cluster.plan().members[a.id].state == MemberState.PENDING
    assert restarts_by_alloc(sim) == {}


def test_a_member_whose_restart_this_coordinator_triggered_is_reported_restarted_when_its_session_is_lost(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    # min_healthy_time longer than a renew interval (TTL / 2): the loss is seen first
    cluster = Cluster(sim, min_healthy_time=40.0, healthy_deadline=120.0)
    (a,) = cluster.allocs()
    events = Events()
    with cluster.session("agent") as session:

        def lose_session(step: Step, target: Target) -> None:
            if step == Step.TRIGGERED:
                cluster.consul.session_destroy(session.id)

        agent = coordinator(cluster, session, "agent", observer=events, fault_hook=lose_session)
        outcome = agent.handle_change(a, "server")
    target = cluster.target(a)
    assert outcome.reason.startswith("restarted, but "), outcome
    why = outcome.reason
    assert why.endswith(": its health is judged by whoever takes it over")
    assert outcome == MemberOutcome(target, Outcome.RESTARTED, why, by="agent")
    assert events.of(a.id)[-1] == (EventKind.RESTARTED, SCOPE, target.ref, why)
    assert restarts_by_alloc(sim) == {a.id: 1}


# --- _when_full: the concurrency is taken by failed or restarting members --------------------------------


def test_a_failed_member_healthy_again_by_the_plans_health_source_gives_back_its_share(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """c = 1, a failed (its task runs healthy again), b pending: b's drive marks a recovered and restarts b.

    The plan judges health by Nomad; the driving coordinator's own source (Consul, with a service
    that has no check) would never find a healthy: the plan's source decides.
    """
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=30.0)
    a, b = cluster.allocs()
    register(cluster, [a, b], health_source=HealthSource.NOMAD, max_failures=2)
    rewrite(cluster, a.id, state=MemberState.FAILED, error="unhealthy")
    target = replace(cluster.target(b), services=(NO_SUCH_SERVICE,))
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", health_source=HealthSource.CONSUL)
        started = cluster.clock.time()
        outcome = agent.drive(target)
    assert outcome.outcome == Outcome.RESTARTED, outcome
    plan = cluster.plan()
    recovered = plan.members[a.id]
    assert (recovered.state, recovered.recovered, recovered.error) == (MemberState.FAILED, True, "unhealthy")
    assert started <= recovered.updated_at <= cluster.clock.time()
    assert plan.members[b.id].state == MemberState.DONE
    assert restarts_by_alloc(sim) == {b.id: 1}


class WatchSeen(SlotRecorder):
    """A SlotRecorder that also sets ``watched`` when a blocking query on the plan key is made (a waiter
    waits for the plan)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.watched = threading.Event()

    def watch(self, key: str, index: int, wait: float, **kwargs: Any) -> tuple[int, list[KVEntry]]:
        if key == PLAN_KEY:
            self.watched.set()
        return super().watch(key, index, wait, **kwargs)


def test_a_waiter_at_full_concurrency_waits_on_the_plan_for_a_live_holder_then_claims(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """c = 2: a held by a live paused holder, c failed and still down: b waits on the plan, not in a loop,
    and claims once a finished."""
    sim = sim_cluster_factory(scenario(3, concurrency=2), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=120.0, healthy_deadline=4.0)
    a, b, c = cluster.allocs()
    register(cluster, [a, b, c], max_failures=5)
    rewrite(cluster, c.id, state=MemberState.FAILED, error="unhealthy")
    claimed, go_on = threading.Event(), threading.Event()

    def pause(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            claimed.set()
            assert go_on.wait(60), "the test never let the paused holder go on"

    results: dict[str, MemberOutcome] = {}
    consul = WatchSeen(cluster.consul)
    with cluster.session("first") as first_session, cluster.session("second") as second_session:
        first = coordinator(cluster, first_session, "first", fault_hook=pause)
        holder = threading.Thread(target=lambda: results.setdefault("a", first.handle_change(a, "server")))
        holder.start()
        assert claimed.wait(30)
        # c counts as down while its task is not healthy by the waiter's services (none has a check)
        second = coordinator(cluster, second_session, "second", consul=consul)
        target = replace(cluster.target(b), services=(NO_SUCH_SERVICE,))
        waiter = threading.Thread(target=lambda: results.setdefault("b", second.drive(target)), daemon=True)
        waiter.start()
        watched = consul.watched.wait(20)
        go_on.set()
        holder.join(30)
        waiter.join(60)
    assert watched, "the waiter never waited on the plan"
    assert not waiter.is_alive()
    assert results["a"].outcome == Outcome.RESTARTED
    assert results["b"].outcome == Outcome.FAILED, results["b"]  # its own service has no check
    assert restarts_by_alloc(sim) == {a.id: 1, b.id: 1}


def paused_holder(cluster: Cluster, alloc: Allocation, session: Session) -> tuple[threading.Thread, Any]:
    """``first`` claims ``alloc`` and pauses after its claim until ``go_on`` is set; returns its
    thread (started, the claim made) and ``go_on``."""
    claimed, go_on = threading.Event(), threading.Event()

    def pause(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            claimed.set()
            assert go_on.wait(60), "the test never let the paused holder go on"

    first = coordinator(cluster, session, "first", fault_hook=pause)
    holder = threading.Thread(target=lambda: first.drive(cluster.target(alloc)), daemon=True)
    holder.start()
    assert claimed.wait(30)
    return holder, go_on


def test_a_member_its_live_holder_restarts_is_waited_for_on_the_plan_without_taking_a_slot(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """c = 2, so a slot is free: the second driver of a still waits for a's live holder on the plan."""
    sim = sim_cluster_factory(scenario(2, concurrency=2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    register(cluster, [a, b])
    consul = WatchSeen(cluster.consul)
    result: dict[str, MemberOutcome] = {}
    with cluster.session("first") as first_session, cluster.session("second") as second_session:
        holder, go_on = paused_holder(cluster, a, first_session)
        second = coordinator(cluster, second_session, "second", consul=consul)
        waiter = threading.Thread(target=lambda: result.setdefault("a", second.drive(cluster.target(a))))
        waiter.start()
        watched = consul.watched.wait(30)
        go_on.set()
        holder.join(60)
        waiter.join(60)
    assert watched, "the second driver never waited on the plan"
    assert consul.locks == [], "the second driver took a slot for a member a live holder drives"
    assert (result["a"].outcome, result["a"].by) == (Outcome.RESTARTED, "first"), result
    assert restarts_by_alloc(sim) == {a.id: 1}


def test_a_member_whose_live_holder_outlasts_slot_timeout_is_skipped_naming_the_holder(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=20.0)
    (a,) = cluster.allocs()
    register(cluster, [a])
    with cluster.session("first") as first_session, cluster.session("second") as second_session:
        holder, go_on = paused_holder(cluster, a, first_session)
        try:
            outcome = coordinator(cluster, second_session, "second").drive(cluster.target(a))
        finally:
            go_on.set()
            holder.join(60)
    reason = "still waiting for its restart by first after slot_timeout 20s"
    assert outcome == MemberOutcome(cluster.target(a), Outcome.SKIPPED, reason)
    assert restarts_by_alloc(sim) == {a.id: 1}


# --- _reclaim: taking over a restart nobody drives ------------------------------------------------------


def crash_after(step_wanted: Step, session: Session, before: Callable[[], None] = lambda: None) -> Any:
    def hook(step: Step, target: Target) -> None:
        if step == step_wanted:
            before()
            session.abandon()
            raise SimulatedCrash(step)

    return hook


class StaleFirstRead(NomadProxy):
    """Answers the first read of ``alloc_id`` with ``stale`` (a server not yet told of the restart)."""

    def __init__(self, inner: NomadAPI, alloc_id: str, stale: Allocation) -> None:
        super().__init__(inner)
        self._alloc_id = alloc_id
        self._stale: Allocation | None = stale

    def allocation(self, alloc_id: str) -> Allocation:
        if alloc_id == self._alloc_id and self._stale is not None:
            stale, self._stale = self._stale, None
            return stale
        return self._inner.allocation(alloc_id)


def test_a_nomad_api_restart_its_dead_holder_already_fired_is_reclaimed_and_not_fired_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    dead = cluster.session("dead")
    dead.create()
    hook = crash_after(Step.TRIGGERED, dead, before=lambda: wait_restarted(cluster, a))
    first = coordinator(cluster, dead, "dead", method=RestartMethod.NOMAD_API, fault_hook=hook)
    with pytest.raises(SimulatedCrash):
        first.handle_change(a, "server")
    cluster.consul.session_destroy(dead.id)
    target = cluster.target(a)
    with cluster.session("reclaimer") as session:
        outcome = coordinator(cluster, session, "reclaimer", method=RestartMethod.NOMAD_API).drive(target)
    assert restarts_by_alloc(sim) == {a.id: 1}, "the reclaimer fired a restart that had already happened"
    assert (outcome.outcome, outcome.by, outcome.reclaimed) == (Outcome.RESTARTED, "reclaimer", True)
    member = cluster.plan().members[a.id]
    assert (member.state, member.holder_name) == (MemberState.DONE, "reclaimer")


def test_a_nomad_api_claim_whose_holder_died_unfired_is_fired_by_the_reclaimer_judged_by_the_plans_source(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The plan judges health by Nomad; the reclaimer's own source (no check for its service) would not."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim, healthy_deadline=6.0)
    (a,) = cluster.allocs()
    dead = cluster.session("dead")
    dead.create()
    first = coordinator(
        cluster,
        dead,
        "dead",
        method=RestartMethod.NOMAD_API,
        health_source=HealthSource.NOMAD,
        fault_hook=crash_after(Step.CLAIMED, dead),
    )
    with pytest.raises(SimulatedCrash):
        first.handle_change(a, "server")
    cluster.consul.session_destroy(dead.id)
    assert restarts_by_alloc(sim) == {}
    target = replace(cluster.target(a), services=(NO_SUCH_SERVICE,))
    # the reclaimer's first read shows no state for the task yet: it cannot have restarted
    nomad = StaleFirstRead(cluster.nomad, a.id, replace(a, task_states={}))
    with cluster.session("reclaimer") as session:
        reclaimer = coordinator(cluster, session, "reclaimer", nomad=nomad, health_source=HealthSource.CONSUL)
        outcome = reclaimer.drive(target)
    assert restarts_by_alloc(sim) == {a.id: 1}
    assert (outcome.outcome, outcome.by, outcome.reclaimed) == (Outcome.RESTARTED, "reclaimer", True), outcome


def test_a_consul_key_claim_is_never_fired_again_by_a_reclaimer_that_has_not_seen_its_restart_yet(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """With consul_key the claim carried its trigger: the plan's method, not the reclaimer's, decides."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    dead = cluster.session("dead")
    dead.create()
    first = coordinator(cluster, dead, "dead", fault_hook=crash_after(Step.CLAIMED, dead))
    with pytest.raises(SimulatedCrash):
        first.handle_change(a, "server")
    cluster.consul.session_destroy(dead.id)
    nomad = StaleFirstRead(cluster.nomad, a.id, a)  # the allocation as read before the claim
    with cluster.session("reclaimer") as session:
        reclaimer = coordinator(cluster, session, "reclaimer", nomad=nomad, method=RestartMethod.NOMAD_API)
        outcome = reclaimer.drive(cluster.target(a))
    assert restarts_by_alloc(sim) == {a.id: 1}, "the reclaimer fired a consul_key claim again"
    assert (outcome.outcome, outcome.reclaimed) == (Outcome.RESTARTED, True), outcome


def test_a_reclaimed_member_is_held_by_the_reclaimers_claim_under_its_session(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    dead = cluster.session("dead")
    dead.create()
    with pytest.raises(SimulatedCrash):
        coordinator(cluster, dead, "dead", fault_hook=crash_after(Step.CLAIMED, dead)).handle_change(
            a, "server"
        )
    cluster.consul.session_destroy(dead.id)
    seen: dict[str, Any] = {}
    with cluster.session("reclaimer") as session:

        def look(step: Step, target: Target) -> None:
            if step == Step.CLAIMED:
                member = cluster.plan().members[a.id]
                sibling = coordinator(cluster, session, "sibling")  # shares the session
                seen.update(member=member, driven=sibling.driven(member), at=cluster.clock.time())

        before = cluster.clock.time()
        outcome = coordinator(cluster, session, "reclaimer", fault_hook=look).drive(cluster.target(a))
    member: Member = seen["member"]
    assert (member.state, member.session, member.holder_name) == (
        MemberState.RESTARTING,
        session.id,
        "reclaimer",
    )
    assert before <= member.updated_at <= seen["at"]
    assert seen["driven"], "a coordinator sharing the session took the reclaimer's claim as abandoned"
    assert (outcome.outcome, outcome.reclaimed) == (Outcome.RESTARTED, True)
    assert restarts_by_alloc(sim) == {a.id: 1}


def test_a_nomad_api_claim_whose_allocation_nomad_forgot_is_reclaimed_and_settled_skipped(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, _ = cluster.allocs()
    dead = cluster.session("dead")
    dead.create()
    first = coordinator(
        cluster, dead, "dead", method=RestartMethod.NOMAD_API, fault_hook=crash_after(Step.CLAIMED, dead)
    )
    with pytest.raises(SimulatedCrash):
        first.handle_change(a, "server")
    cluster.consul.session_destroy(dead.id)
    sim.nomad.stop_allocation(a.id)
    with sim.nomad.state.lock:  # the servers' GC forgets the stopped allocation
        del sim.nomad.state.allocs[a.id]
    target = cluster.target(a)
    with cluster.session("reclaimer") as session:
        outcome = coordinator(cluster, session, "reclaimer").drive(target)
    assert "garbage-collected" in outcome.reason, outcome
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, outcome.reason, stopped=True)
    member = cluster.plan().members[a.id]
    assert (member.state, member.error) == (MemberState.SKIPPED, outcome.reason)
    assert restarts_by_alloc(sim) == {}


def test_an_orphan_taken_over_is_reported_under_its_own_task_and_judged_by_its_services(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """c = 2: a's holder dies during a restart into a config whose check stays critical (Nomad says
    running); b's agent takes a over first, judges it by a's service checks: failed, not healthy."""
    sim = sim_cluster_factory(scenario(2, concurrency=2), time_scale=SCALE)
    cluster = Cluster(sim, healthy_deadline=6.0)
    a, b = cluster.allocs()
    sim.set_key("config/web", "broken")
    dead = cluster.session("dead")
    dead.create()
    hook = crash_after(Step.TRIGGERED, dead, before=lambda: cluster.consul.session_destroy(dead.id))
    with pytest.raises(SimulatedCrash):
        coordinator(cluster, dead, "dead", fault_hook=hook, max_failures=0).handle_change(a, "server")
    register(cluster, [b])
    events = Events()
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent", observer=events).drive(cluster.target(b))
    orphan = cluster.target(a)
    assert events.of(a.id)[:2] == [
        (EventKind.WAITING, SCOPE, orphan.ref, ""),
        (EventKind.RESTARTING, SCOPE, orphan.ref, "reclaimed"),
    ]
    assert events.of(a.id)[-1][:3] == (EventKind.FAILED, SCOPE, orphan.ref)
    plan = cluster.plan()
    assert plan.members[a.id].state == MemberState.FAILED, plan.members[a.id]
    assert plan.status == PlanStatus.FAILED
    assert outcome.outcome == Outcome.SKIPPED, outcome
    assert restarts_by_alloc(sim) == {a.id: 1}


class AppliedThenUnreadable(ConsulProxy):
    """The first plan write applies but its answer is lost, and the read that follows is refused (403):
    the write raises although it applied."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.state = "armed"

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        if self.state == "armed" and any(op.key == PLAN_KEY and op.verb == TxnVerb.CAS for op in ops):
            self.state = "applied"
            assert self._inner.txn(ops).ok
            raise ConsulError("txn", "ReadTimeout: read timed out", transient=False)
        return self._inner.txn(ops)  # type: ignore[no-any-return]

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        if self.state == "applied" and key == PLAN_KEY:
            self.state = "refused"
            raise ConsulError(f"kv.get {key}", "Permission denied", status=403)
        return self._inner.get(key, consistent=consistent)  # type: ignore[no-any-return]


@pytest.mark.parametrize("write", ["claim", "reclaim"])
def test_a_claim_whose_write_raised_but_applied_is_not_taken_as_driven_by_its_own_session(
    sim_cluster_factory: SimClusterFactory, write: str
) -> None:
    """The claim token of a write that raised is dropped: the member it may hold is reclaimed by the
    same drive, not waited for as if a coordinator of this session still drove it."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=60.0)
    (a,) = cluster.allocs()
    if write == "reclaim":
        dead = cluster.session("dead")
        dead.create()
        with pytest.raises(SimulatedCrash):
            coordinator(cluster, dead, "dead", fault_hook=crash_after(Step.CLAIMED, dead)).handle_change(
                a, "server"
            )
        cluster.consul.session_destroy(dead.id)
    else:
        register(cluster, [a])
    consul = AppliedThenUnreadable(cluster.consul)
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent", consul=consul).drive(cluster.target(a))
    assert consul.state == "refused"
    assert (outcome.outcome, outcome.by, outcome.reclaimed) == (Outcome.RESTARTED, "agent", True), outcome
    assert restarts_by_alloc(sim) == {a.id: 1}


# --- _fire: a nomad_api restart call that failed --------------------------------------------------------


class RestartRefused(NomadProxy):
    """Nomad refuses every restart call with an answer proving nothing applied (transient)."""

    def __init__(self, inner: NomadAPI) -> None:
        super().__init__(inner)
        self.calls = 0
        self.error = NomadError("restart alloc", "No cluster leader", status=500, transient=True)

    def restart_task(self, alloc_id: str, task: str) -> None:
        self.calls += 1
        if self.calls > 5:
            raise SimulatedCrash("the drive never gave up")
        raise self.error


def test_a_restart_call_proven_not_applied_gives_the_member_back_and_counts_as_an_error_until_giving_up(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    nomad = RestartRefused(cluster.nomad)
    events = Events()
    with cluster.session("agent") as session:
        agent = coordinator(
            cluster,
            session,
            "agent",
            nomad=nomad,
            observer=events,
            method=RestartMethod.NOMAD_API,
            error_attempts=2,
        )
        before = cluster.clock.time()
        outcome = agent.handle_change(a, "server")
    target = cluster.target(a)
    reason = f"giving up after 2 errors: {nomad.error}"
    assert nomad.calls == 2
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, reason)
    assert events.of(a.id)[-1] == (EventKind.SKIPPED, SCOPE, target.ref, reason)
    member = cluster.plan().members[a.id]
    assert (member.state, member.holder, member.session, member.error) == (
        MemberState.PENDING,
        None,
        None,
        f"not triggered: {nomad.error}",
    )
    assert before <= member.updated_at <= cluster.clock.time()
    assert restarts_by_alloc(sim) == {}


class RestartAnswerLost(NomadProxy):
    """Nomad restarts the task, and the answer is lost (an error that proves nothing)."""

    def __init__(self, inner: NomadAPI) -> None:
        super().__init__(inner)
        self.calls = 0

    def restart_task(self, alloc_id: str, task: str) -> None:
        self.calls += 1
        self._inner.restart_task(alloc_id, task)
        raise NomadError("restart alloc", "ReadTimeout: read timed out", transient=False)


def test_a_restart_call_that_may_have_applied_is_judged_by_health_and_never_given_back(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    nomad = RestartAnswerLost(cluster.nomad)
    with cluster.session("agent") as session:
        outcome = coordinator(
            cluster, session, "agent", nomad=nomad, method=RestartMethod.NOMAD_API
        ).handle_change(a, "server")
    assert nomad.calls == 1
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert restarts_by_alloc(sim) == {a.id: 1}
    assert cluster.plan().members[a.id].state == MemberState.DONE


def test_a_restart_passes_each_step_to_the_fault_hook_and_reports_its_events_and_duration(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    steps: list[tuple[Step, str]] = []
    events = Events()
    # the coordinator's name, not its session's, is who holds and restarts (the session is shared)
    with cluster.session("shared session") as session:
        agent = coordinator(
            cluster,
            session,
            "agent",
            observer=events,
            fault_hook=lambda step, target: steps.append((step, target.alloc_id)),
        )
        started, since = cluster.clock.monotonic(), cluster.clock.time()
        outcome = agent.handle_change(a, "server")
        elapsed, until = cluster.clock.monotonic() - started, cluster.clock.time()
    target = cluster.target(a)
    assert steps == [(step, a.id) for step in Step]
    assert events.of(a.id) == [
        (EventKind.WAITING, SCOPE, target.ref, ""),
        (EventKind.RESTARTING, SCOPE, target.ref, ""),
        (EventKind.RESTARTED, SCOPE, target.ref, ""),
    ]
    # the registration's event counts the members registered; the members' events count none
    assert [(e.kind, e.scope, e.alloc_id, e.count) for e in events] == [
        (EventKind.PLANNED, SCOPE, "", 1),
        *((kind, SCOPE, a.id, 0) for kind in (EventKind.WAITING, EventKind.RESTARTING, EventKind.RESTARTED)),
    ]
    assert events[0].detail == PlanStatus.PLANNED.value
    assert all(since <= e.at <= until for e in events), [e.at for e in events]  # cluster time
    assert outcome.duration is not None and 0 < outcome.duration <= elapsed, (outcome.duration, elapsed)
    assert outcome == MemberOutcome(target, Outcome.RESTARTED, "", 1, by="agent", duration=outcome.duration)
    assert cluster.plan().members[a.id].holder_name == "agent"


@pytest.mark.parametrize("change", ["plan deleted", "member dropped"])
def test_a_member_gone_from_the_plan_while_its_drive_took_a_slot_is_skipped_not_claimed(
    sim_cluster_factory: SimClusterFactory, change: str
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    register(cluster, [a, b])

    def drop(p: Plan | None, _index: int) -> Plan:
        plan = require(p, PLAN_KEY)
        return replace(plan, members={k: m for k, m in plan.members.items() if k != a.id})

    def remove(step: Step, target: Target) -> None:
        if step == Step.SLOT:
            if change == "plan deleted":
                cluster.consul.delete(PLAN_KEY)
                assert cluster.plans.read(PLAN_KEY) == (None, 0)  # this process knows it now
            else:
                cluster.plans.update_at(PLAN_KEY, drop)

    events = Events()
    target = cluster.target(a)
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", observer=events, fault_hook=remove)
        outcome = agent.drive(target)
        held = [e.key for e in cluster.consul.get_tree(KEYS.slot_prefix(SCOPE), consistent=True) if e.session]
        assert (held, agent.keeps_slot) == ([], False), "the slot it took for nothing was kept"
    reason = "not in the plan (it was deleted or replaced)"
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, reason)
    assert events.of(a.id)[-1] == (EventKind.SKIPPED, SCOPE, target.ref, reason)
    assert restarts_by_alloc(sim) == {}


def test_a_claim_records_the_tasks_baseline_and_restarts_by_the_plans_method(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The plan was made with consul_key: a coordinator configured for nomad_api claims and triggers
    in one txn all the same (the sim records a template restart, not an API one)."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    seen: dict[str, Member] = {}

    def look(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            seen["member"] = cluster.plan().members[target.alloc_id]

    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", fault_hook=look, method=RestartMethod.NOMAD_API)
        outcome = agent.drive(cluster.target(a))
    baseline = a.task_states["server"]
    member = seen["member"]
    assert (member.restarts_before, member.started_before) == (baseline.restarts, baseline.started_at)
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert [r.cause for r in sim.restarts()] == ["template"]


def test_a_plan_that_recorded_no_method_or_health_source_is_restarted_and_judged_by_the_coordinators(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """A plan written without them (a library caller's ``plan.register``, an older Shepard) falls back
    to the coordinator's own: nomad_api, and Nomad's view of health (its service has no check)."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    cluster.plans.update_at(
        PLAN_KEY, lambda p, _i: replace(require(p, PLAN_KEY), method=None, health_source=None)
    )
    target = replace(cluster.target(a), services=(NO_SUCH_SERVICE,))
    with cluster.session("agent") as session:
        outcome = coordinator(
            cluster, session, "agent", method=RestartMethod.NOMAD_API, health_source=HealthSource.NOMAD
        ).drive(target)
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert [r.cause for r in sim.restarts()] == ["api"]
    assert cluster.plan().members[a.id].state == MemberState.DONE


@pytest.mark.timeout(60)
def test_the_health_wait_counts_min_healthy_time_in_the_coordinators_clock(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """125 cluster seconds are 5 real ones at SCALE; on real time the wait would pass the timeout."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim, min_healthy_time=125.0, healthy_deadline=300.0)
    (a,) = cluster.allocs()
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent").handle_change(a, "server")
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert outcome.duration is not None and outcome.duration >= 125.0, outcome


def test_a_claim_of_an_allocation_whose_task_has_no_state_yet_counts_from_no_restart(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    seen: dict[str, Member] = {}

    def look(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            seen["member"] = cluster.plan().members[target.alloc_id]

    nomad = StaleFirstRead(cluster.nomad, a.id, replace(a, task_states={}))
    with cluster.session("agent") as session:
        outcome = coordinator(cluster, session, "agent", nomad=nomad, fault_hook=look).drive(
            cluster.target(a)
        )
    assert (seen["member"].restarts_before, seen["member"].started_before) == (0, None)
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert restarts_by_alloc(sim) == {a.id: 1}


# --- _finish: the outcome and the slot's release in one txn ---------------------------------------------


def slot_unlocks(ops: Sequence[TxnOp]) -> list[str]:
    return [op.key for op in ops if op.verb == TxnVerb.UNLOCK and op.key.startswith(KEYS.slot_prefix(SCOPE))]


def test_the_outcome_is_written_with_the_slot_release_in_one_txn_unless_the_slot_is_kept(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b, c = cluster.allocs()
    consul = RecordingConsul(cluster.consul)
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", consul=consul)
        assert agent.handle_change(a, "server").outcome == Outcome.RESTARTED
        finish = consul.txns[-1]
        assert finish[0].verb == TxnVerb.CAS and finish[0].key == PLAN_KEY
        assert len(slot_unlocks(finish)) == 1, finish
        assert consul.releases == [], "the slot was released apart from the finish"
        assert not agent.keeps_slot

        assert agent.handle_change(b, "server", keep_slot=True).outcome == Outcome.RESTARTED
        assert slot_unlocks(consul.txns[-1]) == [], "a kept slot was released by the finish"
        assert agent.keeps_slot
        txns = len(consul.txns)
        assert agent.drive(cluster.target(c), keep_slot=True).outcome == Outcome.SKIPPED  # not registered
        assert agent.keeps_slot, "a drive of the same task gave the kept slot up"
        assert len(consul.txns) == txns
        other = Target(TaskRef(c.node_name, "web", "app", "other", c.index), c.id)
        assert agent.drive(other).outcome == Outcome.SKIPPED  # another task: the kept slot goes back
        assert not agent.keeps_slot
        assert len(consul.releases) == 1
    assert restarts_by_alloc(sim) == {a.id: 1, b.id: 1}


def test_a_failed_restart_records_its_error_and_halts_the_plan_at_the_index_it_was_written_on(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim, healthy_deadline=6.0)
    a, _ = cluster.allocs()
    sim.set_key("config/web", "broken")
    consul = RecordingConsul(cluster.consul)
    events = Events()
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", consul=consul, observer=events, max_failures=0)
        outcome = agent.handle_change(a, "server")
    assert outcome.outcome == Outcome.FAILED and outcome.reason, outcome
    assert events.of(a.id)[-1] == (EventKind.FAILED, SCOPE, cluster.target(a).ref, outcome.reason)
    plan = cluster.plan()
    assert plan.status == PlanStatus.FAILED
    assert (plan.members[a.id].state, plan.members[a.id].error) == (MemberState.FAILED, outcome.reason)
    finish = consul.txns[-1]
    assert finish[0].verb == TxnVerb.CAS and finish[0].key == PLAN_KEY
    assert plan.halt_index == finish[0].index


# --- _settle_gone: Nomad took the allocation away after the claim --------------------------------------


def test_an_allocation_stopped_after_its_claim_is_skipped_by_its_holder_as_stopped(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=30.0)
    a, _ = cluster.allocs()

    def stop(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            sim.nomad.stop_allocation(target.alloc_id)

    events = Events()
    with cluster.session("agent") as session:
        agent = coordinator(
            cluster, session, "agent", observer=events, fault_hook=stop, method=RestartMethod.NOMAD_API
        )
        outcome = agent.handle_change(a, "server")
    target = cluster.target(a)
    assert outcome.reason.startswith("replaced: "), outcome
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, outcome.reason, stopped=True)
    assert events.of(a.id)[-1] == (EventKind.SKIPPED, SCOPE, target.ref, outcome.reason)
    member = cluster.plan().members[a.id]
    assert (member.state, member.error) == (MemberState.SKIPPED, outcome.reason)
    assert restarts_by_alloc(sim) == {}


class StopInsteadOfRestart(NomadProxy):
    """Nomad accepts the restart call, but the allocation is stopped at that moment: nothing restarts."""

    def __init__(self, inner: NomadAPI, stop: Callable[[str], Any]) -> None:
        super().__init__(inner)
        self._stop = stop

    def restart_task(self, alloc_id: str, task: str) -> None:
        self._stop(alloc_id)


def test_an_allocation_stopped_during_the_health_wait_after_its_restart_counts_as_restarted(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim, min_healthy_time=30.0)  # the stop lands during the health wait
    a, _ = cluster.allocs()

    def stop_once_restarted(step: Step, target: Target) -> None:
        if step == Step.TRIGGERED:
            wait_restarted(cluster, a)
            sim.nomad.stop_allocation(target.alloc_id)

    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", fault_hook=stop_once_restarted)
        outcome = agent.handle_change(a, "server")
    assert (outcome.outcome, outcome.reason, outcome.stopped) == (Outcome.RESTARTED, "", False), outcome
    assert cluster.plan().members[a.id].state == MemberState.DONE
    assert restarts_by_alloc(sim) == {a.id: 1}


def test_an_allocation_nomad_forgot_during_the_health_wait_is_settled_skipped_and_reported_restarted(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Nothing tells any more whether it restarted: the holder settles it as skipped, and reports it
    restarted (it sent the restart), never skipped."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim, min_healthy_time=30.0)
    a, _ = cluster.allocs()

    def forget_once_restarted(step: Step, target: Target) -> None:
        if step == Step.TRIGGERED:
            wait_restarted(cluster, a)
            sim.nomad.stop_allocation(target.alloc_id)
            with sim.nomad.state.lock:  # the servers' GC forgets the stopped allocation
                del sim.nomad.state.allocs[target.alloc_id]

    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", fault_hook=forget_once_restarted)
        outcome = agent.handle_change(a, "server")
    member = cluster.plan().members[a.id]
    assert member.state == MemberState.SKIPPED and member.error and "garbage-collected" in member.error
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert outcome.reason.startswith(f"restarted, but {member.error}"), outcome
    assert restarts_by_alloc(sim) == {a.id: 1}


def test_an_allocation_stopped_instead_of_restarted_is_settled_skipped_by_its_holder(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, _ = cluster.allocs()
    nomad = StopInsteadOfRestart(cluster.nomad, sim.nomad.stop_allocation)
    consul = RecordingConsul(cluster.consul)
    with cluster.session("agent") as session:
        agent = coordinator(
            cluster, session, "agent", consul=consul, nomad=nomad, method=RestartMethod.NOMAD_API
        )
        outcome = agent.handle_change(a, "server")
    plan_writes = [ops for ops in consul.txns if ops[0].verb == TxnVerb.CAS and ops[0].key == PLAN_KEY]
    assert len(plan_writes) == 3, "the holder did not settle its own claim (register, claim, skip)"
    member = cluster.plan().members[a.id]
    assert member.state == MemberState.SKIPPED and member.error and member.error.startswith("replaced: ")
    # this coordinator sent the restart: it never reports the member as skipped
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert outcome.reason.startswith(f"restarted, but {member.error}"), outcome
    assert restarts_by_alloc(sim) == {}


# --- drive: sessions lost, errors, interruptions ---------------------------------------------------------


class Factory:
    """A session factory that counts the sessions it made; beyond ``limit`` the drive never ends."""

    def __init__(self, cluster: Cluster, limit: int = 5) -> None:
        self._cluster = cluster
        self._limit = limit
        self.made: list[Session] = []

    def __call__(self) -> Session:
        if len(self.made) >= self._limit:
            raise SimulatedCrash("the drive kept replacing its session")
        self.made.append(self._cluster.session(f"worker {len(self.made) + 1}"))
        return self.made[-1]


def destroy_at_slot(cluster: Cluster, agent: list[Coordinator], times: int) -> Any:
    """Destroy the coordinator's session after it took a slot, ``times`` times."""
    done = []

    def hook(step: Step, target: Target) -> None:
        if step == Step.SLOT and len(done) < times:
            done.append(1)
            cluster.consul.session_destroy(agent[0].session.id)

    return hook


def test_a_worker_that_loses_its_session_goes_on_under_a_new_one_without_counting_an_error(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    factory = Factory(cluster)
    holder: list[Coordinator] = []
    first = cluster.session("worker")
    first.create()
    worker = coordinator(
        cluster,
        first,
        "worker",
        session_factory=factory,
        fault_hook=destroy_at_slot(cluster, holder, 1),
        error_attempts=1,
    )
    holder.append(worker)
    try:
        outcome = worker.handle_change(a, "server")
    finally:
        for session in factory.made:
            session.destroy()
    assert len(factory.made) == 1
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert restarts_by_alloc(sim) == {a.id: 1}


def test_a_worker_gives_its_member_up_when_it_lost_as_many_sessions_as_allowed(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    factory = Factory(cluster)
    holder: list[Coordinator] = []
    events = Events()
    worker = coordinator(
        cluster,
        lost_session(cluster, "worker"),
        "worker",
        session_factory=factory,
        observer=events,
        fault_hook=destroy_at_slot(cluster, holder, 10),
    )
    holder.append(worker)
    target = cluster.target(a)
    try:
        outcome = worker.drive(target)
    finally:
        for session in factory.made:
            session.destroy()
    assert len(factory.made) == SESSION_ATTEMPTS - 1
    assert outcome.reason.startswith("session lost (") and outcome.reason.endswith(")"), outcome
    assert_skipped_and_left_pending(sim, cluster, events, target, outcome)


def test_an_agent_without_a_session_factory_skips_its_member_once_its_session_is_lost(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    session = lost_session(cluster, "agent")
    target = cluster.target(a)
    outcome = coordinator(cluster, session, "agent").drive(target)
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, f"session lost ({session.lost_reason})")
    assert restarts_by_alloc(sim) == {}


class NoSessions(ConsulProxy):
    """Consul refuses to create sessions."""

    error = ConsulError("session.create", "Permission denied", status=403)

    def session_create(self, *args: Any, **kwargs: Any) -> str:
        raise self.error


def test_a_worker_that_cannot_make_a_new_session_skips_its_member_saying_why(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    session = lost_session(cluster, "worker")
    refusing = NoSessions(cluster.consul)

    def factory() -> Session:
        return Session(refusing, "worker 2", ttl=cluster.cfg.session_ttl, lock_delay=1.0, clock=cluster.clock)

    target = cluster.target(a)
    events = Events()
    outcome = coordinator(cluster, session, "worker", session_factory=factory, observer=events).drive(target)
    reason = f"session lost ({session.lost_reason}), and no new session: {NoSessions.error}"
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, reason)
    assert events.of(a.id) == [(EventKind.SKIPPED, SCOPE, target.ref, reason)]


class PlanReadsFail(ConsulProxy):
    """Every consistent read of the plan fails with an error that is not retried; bounded."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.failures = 0
        self.error = ConsulError(f"kv.get {PLAN_KEY}", "Permission denied", status=403)

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        if key == PLAN_KEY and consistent:
            self.failures += 1
            if self.failures > 10:
                raise SimulatedCrash("the drive never gave up")
            raise self.error
        return self._inner.get(key, consistent=consistent)  # type: ignore[no-any-return]


def test_a_drive_gives_up_after_error_attempts_consecutive_errors_naming_the_last(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    rewrite(cluster, a.id, state=MemberState.DONE)  # a settled member is read, not taken as known
    consul = PlanReadsFail(cluster.consul)
    target = cluster.target(a)
    events = Events()
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", consul=consul, observer=events, error_attempts=3)
        outcome = agent.drive(target)
    reason = f"giving up after 3 errors: {consul.error}"
    assert consul.failures == 3
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, reason)
    assert events.of(a.id) == [(EventKind.SKIPPED, SCOPE, target.ref, reason)]


def test_an_interrupted_drive_skips_a_member_it_has_not_claimed(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    stop = threading.Event()
    stop.set()
    target = cluster.target(a)
    events = Events()
    with cluster.session("worker") as session:
        outcome = coordinator(cluster, session, "worker", stop=stop, observer=events).drive(target)
    assert outcome == MemberOutcome(target, Outcome.SKIPPED, INTERRUPTED)
    assert events.of(a.id) == [(EventKind.SKIPPED, SCOPE, target.ref, INTERRUPTED)]
    assert cluster.plan().members[a.id].state == MemberState.PENDING
    assert restarts_by_alloc(sim) == {}


def test_a_drive_waiting_for_a_slot_is_skipped_as_interrupted_when_stopped(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=600.0)
    (a,) = cluster.allocs()
    plan = register(cluster, [a])
    stop = threading.Event()
    waiting = threading.Event()

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.WAITING:
            waiting.set()

    result: dict[str, MemberOutcome] = {}
    with cluster.session("other") as other, cluster.session("worker") as session:
        slots = RestartSlots(
            cluster.consul, KEYS.slot_prefix(SCOPE), plan.concurrent_lock_count, clock=cluster.clock
        )
        taken = slots.acquire(other, holder="other", timeout=30)  # the only slot
        worker = coordinator(cluster, session, "worker", stop=stop, observer=observe)
        thread = threading.Thread(
            target=lambda: result.setdefault("a", worker.drive(cluster.target(a))), daemon=True
        )
        thread.start()
        assert waiting.wait(30)
        stop.set()
        thread.join(30)
        slots.release(taken)
    assert not thread.is_alive()
    assert result == {"a": MemberOutcome(cluster.target(a), Outcome.SKIPPED, INTERRUPTED)}
    assert restarts_by_alloc(sim) == {}


def release_slots_of(cluster: Cluster, agent: list[Coordinator], times: int) -> Any:
    """After the coordinator took a slot, release it behind its back (its session lives), ``times`` times."""
    done = []

    def hook(step: Step, target: Target) -> None:
        if step == Step.SLOT and len(done) < times:
            done.append(1)
            session_id = agent[0].session.id
            for entry in cluster.consul.get_tree(KEYS.slot_prefix(SCOPE), consistent=True):
                if entry.session == session_id:
                    cluster.consul.release(entry.key, session_id)

    hook.done = done  # type: ignore[attr-defined]
    return hook


def test_a_slot_lost_under_a_live_session_is_retried_as_an_error_until_giving_up(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Also with a session factory: a new session is for a lost session, not for a lost slot."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    factory = Factory(cluster)
    holder: list[Coordinator] = []
    hook = release_slots_of(cluster, holder, 10)
    target = cluster.target(a)
    events = Events()
    with cluster.session("worker") as session:
        worker = coordinator(
            cluster,
            session,
            "worker",
            session_factory=factory,
            fault_hook=hook,
            observer=events,
            error_attempts=2,
        )
        holder.append(worker)
        outcome = worker.drive(target)
    assert len(hook.done) == 2
    assert factory.made == []
    assert outcome.reason.startswith(f"plan {PLAN_KEY} not written: failed session check"), outcome
    assert_skipped_and_left_pending(sim, cluster, events, target, outcome)


def test_a_member_restarted_in_an_earlier_drive_is_not_in_flight_in_the_next(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """A stop ends the next drive of the same allocation (a new change) before its restart starts."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    stop = threading.Event()
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", stop=stop)
        assert agent.handle_change(a, "server").outcome == Outcome.RESTARTED
        register(cluster, [a])  # a new change
        stop.set()
        outcome = agent.drive(cluster.target(a))
    assert outcome == MemberOutcome(cluster.target(a), Outcome.SKIPPED, INTERRUPTED)
    assert restarts_by_alloc(sim) == {a.id: 1}


def test_a_drive_that_waited_slot_timeout_for_a_slot_is_skipped_naming_the_timeout(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=5.0)
    (a,) = cluster.allocs()
    plan = register(cluster, [a])
    events = Events()
    target = cluster.target(a)
    with cluster.session("other") as other, cluster.session("worker") as session:
        slots = RestartSlots(
            cluster.consul, KEYS.slot_prefix(SCOPE), plan.concurrent_lock_count, clock=cluster.clock
        )
        taken = slots.acquire(other, holder="other", timeout=30)  # the only slot
        outcome = coordinator(cluster, session, "worker", observer=events).drive(target)
        slots.release(taken)
    assert "not acquired within" in outcome.reason, outcome
    assert_skipped_and_left_pending(sim, cluster, events, target, outcome)


# --- handle_change: the change's mark and the slot --------------------------------------------------------


def test_an_agents_change_seen_before_an_operators_abort_does_not_reopen_the_plan(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    register(cluster, [a])
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent")
        mark = agent.change_mark(SCOPE)
        cluster.plans.update_at(
            PLAN_KEY, lambda p, i: abort(require(p, PLAN_KEY), reason="operator", now=0.0, index=i)
        )
        outcome = agent.handle_change(a, "server", seen_index=mark)
    assert outcome.outcome == Outcome.SKIPPED, outcome
    assert cluster.plan().status == PlanStatus.ABORTED
    assert restarts_by_alloc(sim) == {}


def test_an_agent_keeps_its_slot_after_a_change_only_when_asked(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent")
        assert agent.handle_change(a, "server").outcome == Outcome.RESTARTED
        assert not agent.keeps_slot
        assert agent.handle_change(b, "server", keep_slot=True).outcome == Outcome.RESTARTED
        assert agent.keeps_slot
        agent.release_slots()
        assert not agent.keeps_slot
        register(cluster, [a])  # a new change
        assert agent.drive(cluster.target(a)).outcome == Outcome.RESTARTED
        assert not agent.keeps_slot, "a drive kept its slot without being asked to"


# --- _attempt and _kept_for: the slot an attempt takes, keeps or gives back --------------------------------


def test_a_kept_slot_goes_on_to_the_next_member_of_the_task_without_being_taken_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    consul = SlotRecorder(cluster.consul)
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent", consul=consul)
        assert agent.handle_change(a, "server", keep_slot=True).outcome == Outcome.RESTARTED
        (slot,) = consul.locks
        value = json.loads(require(cluster.consul.get(slot, consistent=True), slot).value)
        # acquired_at is cluster time (the coordinator's clock), not this host's real time
        assert abs(value["acquired_at"] - cluster.clock.time()) < 600, value
        assert agent.handle_change(b, "server", keep_slot=True).outcome == Outcome.RESTARTED
        assert consul.locks == [slot], "the kept slot was given up and a slot taken again"
        assert slot_holders(cluster) == {slot.rsplit("/", 1)[1]: session.id}
        agent.release_slots()
        assert slot_holders(cluster) == {}
    assert restarts_by_alloc(sim) == {a.id: 1, b.id: 1}


def test_a_kept_slot_numbered_past_a_lowered_concurrency_is_given_back_for_one_within_it(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Slot 1 kept from a change at concurrency 2; the next change runs at concurrency 1."""
    sim = sim_cluster_factory(scenario(2, concurrency=None), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    register(cluster, [a], concurrency=2)
    slot_0 = KEYS.slot_prefix(SCOPE).rstrip("/") + "/0"
    with cluster.session("other") as other, cluster.session("agent") as session:
        assert cluster.consul.acquire(slot_0, "other", other.id)
        agent = coordinator(cluster, session, "agent")
        assert agent.drive(cluster.target(a), keep_slot=True).outcome == Outcome.RESTARTED
        assert slot_holders(cluster) == {"0": other.id, "1": session.id}
        assert cluster.consul.release(slot_0, other.id)
        register(cluster, [b], concurrency=1)
        assert cluster.plan().concurrent_lock_count == 1
        assert agent.drive(cluster.target(b), keep_slot=True).outcome == Outcome.RESTARTED
        assert slot_holders(cluster) == {"0": session.id}, "a slot past the plan's concurrency was kept"
        agent.release_slots()
    assert restarts_by_alloc(sim) == {a.id: 1, b.id: 1}


def test_a_waiter_whose_member_another_finished_while_it_waited_takes_no_slot(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The only slot is held elsewhere; while b waits for it, another participant restarts b. When the
    slot frees, b's drive asks the plan first, takes nothing, and reports b restarted by the other."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim, slot_timeout=600.0)
    _, b = cluster.allocs()
    plan = register(cluster, [b])
    waiting = threading.Event()

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.WAITING:
            waiting.set()

    consul = SlotRecorder(cluster.consul)
    result: dict[str, MemberOutcome] = {}
    with cluster.session("other") as other, cluster.session("waiter") as session:
        slots = RestartSlots(
            cluster.consul, KEYS.slot_prefix(SCOPE), plan.concurrent_lock_count, clock=cluster.clock
        )
        taken = slots.acquire(other, holder="other", timeout=30)
        waiter = coordinator(cluster, session, "waiter", consul=consul, observer=observe)
        thread = threading.Thread(
            target=lambda: result.setdefault("b", waiter.drive(cluster.target(b))), daemon=True
        )
        thread.start()
        assert waiting.wait(30)
        # WAITING comes before the first try for a slot: a slot freed before that try is taken at once.
        assert consul.waiting.wait(30)
        rewrite(cluster, b.id, state=MemberState.DONE, holder_name="other", generation=plan.generation)
        slots.release(taken)
        thread.join(60)
        assert not thread.is_alive()
        assert consul.locks == [], "the waiter took a slot for a member already restarted"
        assert consul.waits and set(consul.waits) == {max(PLAN_WAIT, cluster.cfg.session_ttl)}, consul.waits
    target = cluster.target(b)
    assert result == {
        "b": MemberOutcome(target, Outcome.RESTARTED, "restarted by other", plan.generation, by="other")
    }
    assert restarts_by_alloc(sim) == {}


def test_a_restart_this_coordinator_triggered_is_seen_through_under_a_new_session_after_a_stop(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The operator stops the rollout and the session is lost after the trigger: the new session waits
    out the old slot's lock-delay (the stop does not cancel that wait) and sees the restart to its end."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    # min_healthy_time longer than a renew interval (TTL / 2): the loss is seen during the health wait
    cluster = Cluster(sim, min_healthy_time=40.0, healthy_deadline=120.0)
    (a,) = cluster.allocs()
    stop = threading.Event()
    factory = Factory(cluster)
    first = cluster.session("worker")
    first.create()

    def stop_and_lose(step: Step, target: Target) -> None:
        if step == Step.TRIGGERED:
            stop.set()
            cluster.consul.session_destroy(first.id)

    worker = coordinator(
        cluster,
        first,
        "worker",
        session_factory=factory,
        stop=stop,
        fault_hook=stop_and_lose,
        error_attempts=1,
    )
    try:
        outcome = worker.handle_change(a, "server")
    finally:
        for session in factory.made:
            session.destroy()
    assert len(factory.made) == 1
    assert outcome.outcome == Outcome.RESTARTED and outcome.reclaimed, outcome
    assert cluster.plan().members[a.id].state == MemberState.DONE
    assert restarts_by_alloc(sim) == {a.id: 1}


# --- _log: what a member's log lines carry ------------------------------------------------------------------


def test_a_members_lines_name_its_task_and_allocation_and_its_decision_lines_carry_them_as_fields(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    ref = describe(cluster.target(a).ref)
    with (
        caplog.at_level(logging.DEBUG, logger="shepard_lib.coordinator"),
        cluster.session("agent") as session,
    ):
        assert coordinator(cluster, session, "agent").handle_change(a, "server").outcome == Outcome.RESTARTED
    lines = [r for r in caplog.records if r.name == "shepard_lib.coordinator"]
    assert lines and all(r.getMessage().startswith(f"{ref} alloc {a.id}: ") for r in lines), lines
    decisions = {r.event: r for r in lines if hasattr(r, "event")}
    healthy = decisions["healthy"]
    assert (healthy.ref, healthy.alloc_id) == (ref, a.id)
    assert healthy.getMessage().startswith(f"{ref} alloc {a.id}: restarted and healthy in ")
    assert not any(hasattr(r, "ref") for r in lines if not hasattr(r, "event")), "a plain line got fields"


# --- register: the index a change was seen at ---------------------------------------------------------------


class AnswerLostAfter(ConsulProxy):
    """Applies the first plan write, lets ``meanwhile`` run, then loses the write's answer (no reply)."""

    def __init__(self, inner: Any, meanwhile: Callable[[], None]) -> None:
        super().__init__(inner)
        self._meanwhile: Callable[[], None] | None = meanwhile

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        result: TxnResult = self._inner.txn(ops)
        if self._meanwhile is not None and ops[0].verb == TxnVerb.CAS and ops[0].key == PLAN_KEY:
            meanwhile, self._meanwhile = self._meanwhile, None
            assert result.ok
            meanwhile()
            raise ConsulError("txn", "ReadTimeout: read timed out")
        return result


def test_a_registration_whose_answer_was_lost_keeps_the_index_it_saw_the_change_at(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The write applied; before its retry reads the plan, another participant restarts the member for
    this change. The retry counts that restart as covering the change: one restart, not two."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    with cluster.session("other") as other_session, cluster.session("agent") as session:
        other = coordinator(cluster, other_session, "other")
        restarted: list[MemberOutcome] = []
        consul = AnswerLostAfter(cluster.consul, lambda: restarted.append(other.drive(cluster.target(a))))
        outcome = coordinator(cluster, session, "agent", consul=consul).handle_change(a, "server")
    assert [o.outcome for o in restarted] == [Outcome.RESTARTED]
    assert (outcome.outcome, outcome.by) == (Outcome.RESTARTED, "other"), outcome
    assert restarts_by_alloc(sim) == {a.id: 1}
    assert cluster.plan().members[a.id].state == MemberState.DONE


def test_a_change_seen_after_a_claim_that_this_process_has_not_read_yet_restarts_the_member_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """This process knows the plan from before another process claimed a; the change comes after that
    claim, so a's restart in flight may render the old config: the registration reads the plan first
    (the index it saw the change at is Consul's now, not the one known here) and a restarts again."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster, elsewhere = Cluster(sim), Cluster(sim)  # two processes: each knows the plans it saw
    (a,) = cluster.allocs()
    register(cluster, [a])
    claimed, go_on, registered = threading.Event(), threading.Event(), threading.Event()

    def pause(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            claimed.set()
            assert go_on.wait(60), "the test never let the paused holder go on"

    def seen(step: Step, target: Target) -> None:
        if step == Step.REGISTERED:
            registered.set()

    results: dict[str, MemberOutcome] = {}
    with elsewhere.session("other") as other_session, cluster.session("agent") as session:
        other = coordinator(elsewhere, other_session, "other", fault_hook=pause)
        holder = threading.Thread(
            target=lambda: results.setdefault("other", other.drive(elsewhere.target(a)))
        )
        holder.start()
        assert claimed.wait(30)
        agent = coordinator(cluster, session, "agent", fault_hook=seen)
        thread = threading.Thread(
            target=lambda: results.setdefault("agent", agent.handle_change(a, "server"))
        )
        thread.start()
        assert registered.wait(30)
        go_on.set()
        holder.join(60)
        thread.join(60)
    assert not holder.is_alive() and not thread.is_alive()
    assert [results[n].outcome for n in ("other", "agent")] == [Outcome.RESTARTED] * 2, results
    assert results["agent"].generation == results["other"].generation == 2, results
    assert restarts_by_alloc(sim) == {a.id: 2}


def test_a_registration_reopening_a_complete_plan_records_its_settings_count_method_and_health_source(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(3, concurrency=None), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b, _ = cluster.allocs()
    first = register(cluster, [a], concurrency=1, max_failures=1)
    assert first.instance_count == 3, "the group's count, not the number of members registered"
    with cluster.session("agent") as session:
        assert coordinator(cluster, session, "agent").drive(cluster.target(a)).outcome == Outcome.RESTARTED
    assert cluster.plan().status == PlanStatus.COMPLETE
    job = cluster.nomad.job("web")
    scaled = replace(job, groups=tuple(replace(g, count=5) for g in job.groups))  # scaled up since
    options = {"method": RestartMethod.NOMAD_API, "health_source": HealthSource.NOMAD}
    with cluster.session("planner") as session:
        planner = coordinator(cluster, session, "planner", concurrency=2, max_failures=3, **options)
        plan = planner.register(SCOPE, [cluster.target(b)], scaled)
    assert (plan.concurrent_lock_count, plan.max_failures, plan.instance_count) == (2, 3, 5)
    assert (plan.method, plan.health_source) == ("nomad_api", "nomad")


def test_a_registration_given_the_live_allocations_drops_the_settled_members_of_the_others(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    plan = register(cluster, [a])
    gone = Member(MemberState.DONE, "node-9", 7, plan.generation, updated_at=0.0)
    cluster.plans.update_at(
        PLAN_KEY, lambda p, _i: replace(require(p, PLAN_KEY), members={**plan.members, "gone": gone})
    )
    with cluster.session("planner") as session:
        planner = coordinator(cluster, session, "planner")
        job = cluster.nomad.job("web")
        kept = planner.register(SCOPE, [cluster.target(b)], job)
        assert "gone" in kept.members, "without the live allocations nothing else is dropped"
        dropped = planner.register(SCOPE, [cluster.target(b)], job, live=[a.id, b.id])
    assert sorted(dropped.members) == sorted([a.id, b.id])


def test_a_node_scoped_registration_records_its_node_and_one_whose_group_is_gone_counts_its_members(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cluster = Cluster(sim)
    a, _, _ = cluster.allocs()
    keys = Keyspace(KEYS.prefix, LockScope.NODE)
    target = cluster.target(a)
    scope = keys.scope(target.ref)
    job = cluster.nomad.job("web")
    with cluster.session("agent") as session:
        agent = Coordinator(
            cluster.consul, cluster.nomad, keys, session, cluster.options, clock=cluster.clock
        )
        plan = agent.register(scope, [target], job)
        assert (plan.node, plan.instance_count) == (a.node_name, 3)
        # the job no longer has the group (renamed in a new version): the members registered are counted
        other = replace(scope, group="renamed")
        plan = agent.register(other, [target], replace(job, groups=()), PlanSettings())
    assert plan.instance_count == 1


def test_an_agents_change_of_a_member_restarted_earlier_in_a_planned_plan_opens_a_new_generation(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Mid-rollout (b still pending), a is done in generation 1 by a claim before the change was seen:
    the change does not join the rollout, it restarts a again in generation 2."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    register(cluster, [a, b])
    with cluster.session("agent") as session:
        agent = coordinator(cluster, session, "agent")
        assert agent.drive(cluster.target(a)).outcome == Outcome.RESTARTED
        assert cluster.plan().status == PlanStatus.PLANNED
        plan = agent.register(SCOPE, [cluster.target(a)], cluster.nomad.job("web"))
    assert plan.generation == 2
    assert (plan.members[a.id].state, plan.members[a.id].generation) == (MemberState.PENDING, 2)


# --- target_for: what a member is judged by --------------------------------------------------------------


def test_a_target_takes_its_tasks_and_groups_services_and_only_the_groups_when_the_job_lost_the_task(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    (a,) = cluster.allocs()
    job = cluster.nomad.job("web")
    (group,) = job.groups
    (task,) = group.tasks
    both = replace(
        job, groups=(replace(group, services=("web-group",), tasks=(replace(task, services=("web",)),)),)
    )
    assert target_for(a, task.name, both).services == ("web", "web-group")
    assert target_for(a, "renamed", both).services == ("web-group",)  # a newer job version renamed it
    assert target_for(a, task.name, replace(job, groups=())).services == ()  # nor the group
    assert target_for(a, task.name, both).ref == cluster.target(a).ref
