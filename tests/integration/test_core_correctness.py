"""Issue 8: fencing tokens, logical generations, a plan that follows Nomad's allocations, exits from every
plan state, the concurrency of failures, shared sessions. One regression test per finding, over HTTP
against the simulated cluster.

Sim-only: these tests read the sim's restart record and drive its faults (late-applied writes,
stopped and garbage-collected allocations, skewed clocks).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import requests
from coordination_support import (
    KEYS,
    PLAN_KEY,
    SCALE,
    SCOPE,
    Cluster,
    restarts_by_alloc,
    scenario,
    sets_trigger,
)
from fault_support import ConsulProxy, SkewedClock

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, RestartMethod
from shepard_lib.coordinator import (
    Coordinator,
    EventKind,
    Outcome,
    RolloutEvent,
    SimulatedCrash,
    Step,
    Target,
)
from shepard_lib.errors import ConsulError
from shepard_lib.model import KVEntry, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import MemberState, Plan, PlanStatus
from shepard_lib.rollout import RolloutOptions
from shepard_lib.session import Session
from shepard_lib.sim.consul import Fault
from shepard_lib.sim.pytest_plugin import SimClusterFactory

pytestmark = pytest.mark.usefixtures("no_client_env")


# --- 1. the fence is a token, not a session ----------------------------------------------------


class LateTrigger(ConsulProxy):
    """A Consul whose first trigger txn times out unsent and is applied by Consul later.

    The txn is held back and delivered just before the first trigger txn of *another* task, when
    the same session holds the same slot again (a later acquisition): the interleaving of finding 1.
    (The coordinator's own retry of the lost txn goes through; with the claim in the same txn as the
    trigger, at most one of the two can apply.)
    """

    def __init__(self, inner: ConsulBackend) -> None:
        super().__init__(inner)
        self.held: list[TxnOp] | None = None
        self.late_result: TxnResult | None = None
        self.txns = 0

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        triggers = {op.key for op in ops if op.key.startswith("shepard/keys/")}
        if not triggers:
            return self._inner.txn(ops)
        self.txns += 1
        if self.txns == 1:
            self.held = list(ops)
            raise ConsulError("txn (4 ops)", "ReadTimeout: read timed out", transient=False)
        if self.held is not None and not triggers & {op.key for op in self.held}:
            self.late_result, self.held = self._inner.txn(self.held), None
        return self._inner.txn(ops)


def test_a_trigger_applied_late_never_lands_under_a_later_acquisition_of_the_same_slot(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 1: T1's answer is lost, Consul applies it after the holder re-acquired the slot for B."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    consul = LateTrigger(cluster.consul)
    a, b = cluster.allocs()
    with cluster.session("agent") as session:
        coordinator = cluster.coordinator(session, "agent", consul=consul)
        first = coordinator.handle_change(a, "server")
        second = coordinator.handle_change(b, "server")
    assert consul.late_result is not None, "the late trigger was never delivered"
    assert not consul.late_result.ok, "the late trigger applied under a later acquisition of the slot"
    assert (first.outcome, second.outcome) == (Outcome.RESTARTED, Outcome.RESTARTED)
    assert restarts_by_alloc(sim) == {a.id: 1, b.id: 1}
    assert sim.peak_concurrency("web", "app", "server") == 1


# --- 2. allocations Nomad stops, replaces or forgets ----------------------------------------------


def test_an_allocation_stopped_mid_rollout_is_skipped_and_its_replacement_not_restarted(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 2: the member is skipped (replaced), never failed; the replacement runs the new config."""
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cluster = Cluster(sim)
    first, _, last = cluster.allocs()
    stopped: dict[str, Any] = {}

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTED and event.alloc_id == first.id and not stopped:
            answer = requests.post(f"{sim.nomad_addr}/v1/allocation/{last.id}/stop", timeout=10)
            stopped.update(answer.json())

    sim.set_key("config/web", "v2")
    result = cluster.rollout(observer=observe).run("web", RolloutOptions())

    assert stopped.get("EvalID"), stopped
    old = cluster.nomad.allocation(last.id)
    assert (old.desired_status, old.client_status) == ("stop", "complete")
    replacement = cluster.nomad.allocation(old.next_allocation)
    assert (replacement.name, replacement.previous_allocation) == (last.name, last.id)
    assert not result.failed, result.to_dict()
    skipped = {o.target.alloc_id: o for o in result.skipped}
    assert set(skipped) == {last.id} and skipped[last.id].stopped, result.to_dict()
    assert skipped[last.id].reason.startswith("replaced"), skipped[last.id].reason
    assert result.ok
    assert replacement.id not in restarts_by_alloc(sim), "the replacement restarted outside any plan"
    plan = cluster.plan()
    assert (plan.status, plan.members[last.id].state) == (PlanStatus.COMPLETE, MemberState.SKIPPED)


def test_a_garbage_collected_allocation_is_settled_as_skipped_and_the_plan_completes(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 2: a member whose allocation Nomad no longer knows never stays pending."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    targets = [cluster.target(x) for x in (a, b)]
    with cluster.session("agent") as session:
        coordinator = cluster.coordinator(session, "agent")
        coordinator.register(SCOPE, targets, cluster.nomad.job("web"))
        sim.nomad.stop_allocation(b.id)
        with sim.nomad.state.lock:  # the servers' GC forgets the stopped allocation
            del sim.nomad.state.allocs[b.id]
        outcomes = [coordinator.drive(t) for t in targets]
    assert [o.outcome for o in outcomes] == [Outcome.RESTARTED, Outcome.SKIPPED]
    assert outcomes[1].stopped and "garbage-collected" in outcomes[1].reason
    plan = cluster.plan()
    assert (plan.status, plan.members[b.id].state) == (PlanStatus.COMPLETE, MemberState.SKIPPED)


# --- 3. ordering without wall clocks --------------------------------------------------------------


def test_a_rollout_from_a_host_whose_clock_is_behind_restarts_every_member(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 3: a second change rolled out by a host 30 s behind restarts all, not none."""
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    assert Cluster(sim).rollout().run("web", RolloutOptions()).ok
    sim.set_key("config/web", "v3")
    behind = Cluster(sim, clock=SkewedClock(sim.clock, -30.0))
    result = behind.rollout().run("web", RolloutOptions())
    assert result.ok and len(result.restarted) == 3, result.to_dict()
    assert set(restarts_by_alloc(sim).values()) == {2}, restarts_by_alloc(sim)


def test_scaled_clocks_made_apart_share_one_cluster_time_origin() -> None:
    """Finding 3: with time_scale > 1 every process of one demo reads the same cluster time."""
    first = Clock(10.0)
    threading.Event().wait(0.2)
    second = Clock(10.0)
    assert abs(first.time() - second.time()) < 0.5, (first.time(), second.time())


# --- 4. every plan state can be left ---------------------------------------------------------------


class NoLeaderThenReadFails(ConsulProxy):
    """Consul refuses the first claim-and-trigger txn with "No cluster leader"; the read that follows
    it (the plan, to decide whether the txn applied) fails too."""

    def __init__(self, inner: ConsulBackend) -> None:
        super().__init__(inner)
        self.refused: list[TxnOp] | None = None
        self.failed_read: str | None = None
        self.states_then: dict[str, MemberState] = {}  # the plan's members when the read failed

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        if self.refused is None and sets_trigger(ops):
            self.refused = list(ops)
            raise ConsulError("txn (4 ops)", "No cluster leader", status=500, transient=True)
        return self._inner.txn(ops)

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        if self.refused is not None and self.failed_read is None:
            self.failed_read = key
            entry = self._inner.get(key, consistent=True)
            plan = Plan.decode(entry.value if entry is not None else None)
            self.states_then = {a: m.state for a, m in plan.members.items()}
            raise ConsulError(f"kv.get {key}", "No cluster leader", status=500, transient=True)
        return self._inner.get(key, consistent=consistent)


def test_a_trigger_refused_without_a_leader_goes_back_to_pending_even_if_the_check_fails(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 4: an answer proving nothing applied wins over a failed follow-up read."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    consul = NoLeaderThenReadFails(cluster.consul)
    (alloc,) = cluster.allocs()
    with cluster.session("agent") as session:
        outcome = cluster.coordinator(session, "agent", consul=consul).handle_change(alloc, "server")
    assert consul.refused is not None, "no claim-and-trigger txn was refused: the fault never fired"
    assert consul.failed_read == PLAN_KEY, f"the read after the refused txn was {consul.failed_read}"
    assert consul.states_then == {alloc.id: MemberState.PENDING}, "the refused claim left a trace"
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert restarts_by_alloc(sim) == {alloc.id: 1}
    assert cluster.plan().status == PlanStatus.COMPLETE


def test_an_orphaned_restart_is_reclaimed_even_when_the_concurrency_is_not_reached(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 4: c = 2, a holder dies during the health wait; the next agent finishes its member too."""
    sim = sim_cluster_factory(scenario(2, concurrency=2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    doomed = cluster.session("doomed")
    doomed.create()

    def die(step: Step, target: Target) -> None:
        if step == Step.TRIGGERED:
            doomed.destroy()  # invalidated during the health wait
            raise SimulatedCrash(step)

    with pytest.raises(SimulatedCrash):
        cluster.coordinator(doomed, "doomed", fault_hook=die).handle_change(a, "server")
    with cluster.session("agent b") as session:
        outcome = cluster.coordinator(session, "agent b").handle_change(b, "server")
    assert outcome.outcome == Outcome.RESTARTED
    plan = cluster.plan()
    assert plan.members[a.id].state == MemberState.DONE, plan.members[a.id]
    assert plan.status == PlanStatus.COMPLETE
    assert restarts_by_alloc(sim) == {a.id: 1, b.id: 1}


def test_status_reports_an_orphaned_plan_and_resume_drives_it_with_the_plans_method(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 4: a planned plan nobody drives is shown as such; resume (twice: idempotent) finishes it
    with the restart method the plan was made with, not the configuration's."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    api = replace(cluster.options, method=RestartMethod.NOMAD_API)
    with cluster.session("planner") as session:
        planner = Coordinator(cluster.consul, cluster.nomad, KEYS, session, api, clock=cluster.clock)
        planner.register(SCOPE, [cluster.target(a) for a in cluster.allocs()], cluster.nomad.job("web"))
    (view,) = cluster.rollout().status("web")
    assert view.orphaned and view.to_dict()["orphaned"]
    result = cluster.rollout().resume("web", "app", "server")
    assert result.ok and len(result.restarted) == 2, result.to_dict()
    assert cluster.rollout().resume("web", "app", "server").ok  # a resume re-applied changes nothing
    assert {r.cause for r in sim.restarts()} == {"api"}
    assert not cluster.rollout().status("web")[0].orphaned


# --- 5. the concurrency limit counts what is really down -------------------------------------------


def test_a_failed_restart_keeps_its_share_of_the_concurrency_while_its_task_is_down(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """Finding 5: c = 1 and two failures tolerated: nothing restarts beside the broken instance."""
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cluster = Cluster(sim, healthy_deadline=6.0, slot_timeout=20.0)
    sim.set_key("config/web", "broken")
    result = cluster.rollout().run("web", RolloutOptions(max_failures=2))
    assert len(sim.restarts()) == 1, "a restart started beside a failed one that is still down"
    assert len(result.failed) == 1 and len(result.skipped) == 2, result.to_dict()
    assert all("restarting or failed" in o.reason for o in result.skipped), result.to_dict()
    assert sim.peak_concurrency("web", "app", "server") == 1


# --- 6. one session, many coordinators; a live holder is waited for --------------------------------


def paused_after_claim(claimed: threading.Event, go_on: threading.Event) -> Any:
    def hook(step: Step, target: Target) -> None:
        if step == Step.CLAIMED:
            claimed.set()
            assert go_on.wait(30), "the test never let the paused holder go on"

    return hook


@pytest.mark.parametrize("shared_session", [False, True], ids=["two sessions", "one shared session"])
def test_a_live_holder_paused_between_claim_and_trigger_is_waited_for_not_reclaimed(
    sim_cluster_factory: SimClusterFactory, shared_session: bool
) -> None:
    """Findings 6 and issue 9: the second coordinator must wait for the first, never restart beside it.

    c = 2, so the second coordinator gets a slot of its own and reaches the member held by the first.
    """
    sim = sim_cluster_factory(scenario(1, concurrency=2), time_scale=SCALE)
    cluster = Cluster(sim)
    (alloc,) = cluster.allocs()
    claimed, go_on = threading.Event(), threading.Event()
    results: dict[str, Any] = {}
    with cluster.session("first") as first_session, cluster.session("second") as second_session:
        first = cluster.coordinator(first_session, "first", fault_hook=paused_after_claim(claimed, go_on))
        second = cluster.coordinator(first_session if shared_session else second_session, "second")
        paused = threading.Thread(
            target=lambda: results.setdefault("first", first.handle_change(alloc, "server"))
        )
        paused.start()
        assert claimed.wait(30)
        waiter = threading.Thread(
            target=lambda: results.setdefault("second", second.drive(cluster.target(alloc)))
        )
        waiter.start()
        waiter.join(cluster.clock.real(cluster.cfg.session_ttl * 1.5))
        early = dict(results)
        go_on.set()
        paused.join(30)
        waiter.join(30)
    assert "second" not in early, f"the second coordinator did not wait: {early}"
    assert restarts_by_alloc(sim) == {alloc.id: 1}
    assert results["first"].outcome == Outcome.RESTARTED
    assert (results["second"].outcome, results["second"].by) == (Outcome.RESTARTED, "first")


# --- issue 11: a member whose task restarted is never reported skipped -------------------------------


def test_a_member_whose_task_restarted_is_not_reported_skipped_when_the_session_is_lost(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    # min_healthy_time longer than a renew interval (TTL / 2): the loss is seen first
    cluster = Cluster(sim, min_healthy_time=40.0, healthy_deadline=120.0)
    (alloc,) = cluster.allocs()
    with cluster.session("agent") as session:

        def lose_session(step: Step, target: Target) -> None:
            if step == Step.TRIGGERED:
                cluster.consul.session_destroy(session.id)  # invalidated behind the agent's back

        outcome = cluster.coordinator(session, "agent", fault_hook=lose_session).handle_change(
            alloc, "server"
        )
    assert restarts_by_alloc(sim) == {alloc.id: 1}
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert "its health is judged by whoever takes it over" in outcome.reason


# --- the simulator's late writes and late replies ------------------------------------------------------


@pytest.mark.parametrize("fault", ["late_write_rate", "late_reply_rate"])
def test_the_sim_applies_a_write_whose_client_gave_up_waiting(
    sim_cluster_factory: SimClusterFactory, fault: str
) -> None:
    """``late_write_rate``: applied after the client timed out; ``late_reply_rate``: answered late."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    impatient = ConsulBackend(ConsulConfig(address=sim.consul_addr), sim.clock, timeout=0.3)
    watcher = ConsulBackend(ConsulConfig(address=sim.consul_addr), sim.clock)
    index, _ = watcher.watch("late/key", 0, 1.0)
    sim.consul_faults.late_delay = sim.clock.cluster(3.0)  # far longer than the client's 0.3 s timeout
    setattr(sim.consul_faults, fault, 1.0)
    try:
        with pytest.raises(ConsulError, match="no answer before the timeout"):
            impatient.put("late/key", "v")
    finally:
        setattr(sim.consul_faults, fault, 0.0)
    if fault == "late_write_rate":
        assert sim.get_key("late/key") is None, "a late write must not be applied before its delay"
    else:
        assert sim.get_key("late/key") == "v", "a late reply comes after the write was applied"
    while sim.get_key("late/key") is None:
        index, _ = watcher.watch("late/key", index, 30.0)
    assert sim.get_key("late/key") == "v"


def test_the_sim_injects_a_planned_fault_into_the_chosen_write_and_counts_what_it_injected(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """``Faults.inject``: the second txn from now is applied and its answer lost; reads are not counted."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    consul = ConsulBackend(ConsulConfig(address=sim.consul_addr), sim.clock)
    sim.consul_faults.inject(Fault.LOST_REPLY, "/v1/txn", after=1)
    put = [TxnOp(TxnVerb.SET, "planned/first", value=b"1")]
    assert consul.txn(put).ok
    assert consul.get("planned/first") is not None  # a read is no write: it does not count
    with pytest.raises(ConsulError):
        consul.txn([TxnOp(TxnVerb.SET, "planned/second", value=b"2")])
    assert sim.get_key("planned/second") == "2", "a lost reply comes after the write was applied"
    assert consul.txn([TxnOp(TxnVerb.SET, "planned/third", value=b"3")]).ok
    assert sim.consul_faults.injected() == {(Fault.LOST_REPLY, "/v1/txn"): 1}


# --- issue 11: a second rollout joins the plan in progress unless asked --again ----------------------


def test_a_second_rollout_joins_the_plan_in_progress_and_again_restarts_once_more(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    cluster = Cluster(sim)
    first_done = threading.Event()

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTED:
            first_done.set()

    results: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: results.setdefault(
            "first", cluster.rollout(observer=observe).run("web", RolloutOptions())
        )
    )
    first.start()
    assert first_done.wait(30)
    joined = cluster.rollout().run("web", RolloutOptions())
    first.join(60)
    assert joined.ok and results["first"].ok
    assert set(restarts_by_alloc(sim).values()) == {1}, "joining a rollout in progress restarted twice"
    assert cluster.plan().generation == 1
    again = cluster.rollout().run("web", RolloutOptions(again=True))
    assert again.ok and len(again.restarted) == 3
    assert set(restarts_by_alloc(sim).values()) == {2}
    assert cluster.plan().generation == 2


class FirstCreateAnswerLost(ConsulProxy):
    """Consul creates the first session but its answer is lost (a read timeout)."""

    def __init__(self, inner: ConsulBackend) -> None:
        super().__init__(inner)
        self.creates = 0

    def session_create(self, *args: Any, **kwargs: Any) -> str:
        self.creates += 1
        created = self._inner.session_create(*args, **kwargs)
        if self.creates == 1:
            raise ConsulError("session.create", "ReadTimeout: read timed out")
        return created


def test_a_session_whose_create_answer_was_lost_is_created_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """A lost answer of a create leaves a session that holds nothing and ends at its TTL."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    consul = FirstCreateAnswerLost(cluster.consul)
    with Session(consul, "agent", ttl=10.0, lock_delay=2.0, clock=cluster.clock) as session:
        assert consul.creates == 2
        assert cluster.consul.session_info(session.id) is not None


def test_an_operator_abort_is_not_undone_by_a_late_event_of_a_change_seen_before_it(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The abort records the plan index it was applied at (it used to record 0, so any late agent
    event of an earlier change re-opened a plan an operator had aborted)."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    cluster = Cluster(sim)
    a, b = cluster.allocs()
    job = cluster.nomad.job("web")
    with cluster.session("agent") as session:
        coordinator = cluster.coordinator(session, "agent")
        coordinator.register(SCOPE, [cluster.target(a)], job)
        seen_before_abort = coordinator.change_mark(SCOPE)
        cluster.rollout().abort("web", "app", "server")
        aborted = cluster.plan()
        assert aborted.status is PlanStatus.ABORTED and (aborted.halt_index or 0) >= seen_before_abort

        coordinator.register(SCOPE, [cluster.target(b)], job, seen_index=seen_before_abort)
        assert cluster.plan().status is PlanStatus.ABORTED, "a late event of an earlier change undid it"

        coordinator.register(SCOPE, [cluster.target(b)], job, seen_index=coordinator.change_mark(SCOPE))
        assert cluster.plan().status is PlanStatus.PLANNED, "a change seen after the abort re-opens the plan"


class LateSlotLock(ConsulProxy):
    """The first slot lock times out unsent; Consul applies it right after the same session took the
    slot again, which moves the slot's token under the coordinator (found by the chaos test under load)."""

    def __init__(self, inner: ConsulBackend) -> None:
        super().__init__(inner)
        self.held: list[TxnOp] | None = None
        self.late: TxnResult | None = None

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        locks = any(op.verb == TxnVerb.LOCK and "/restart_lock/" in op.key for op in ops)
        if locks and self.held is None and self.late is None:
            self.held = list(ops)
            raise ConsulError("txn (1 ops)", "ReadTimeout: read timed out")
        result = self._inner.txn(ops)
        if locks and result.ok and self.held is not None:
            self.late, self.held = self._inner.txn(self.held), None
        return result


def test_a_slot_lock_applied_late_under_the_same_session_costs_a_retry_not_the_member(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The fence refuses the claim (the token moved; nothing is written), and the member is tried again
    with a new acquisition instead of being reported not restarted."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    cluster = Cluster(sim)
    consul = LateSlotLock(cluster.consul)
    (alloc,) = cluster.allocs()
    with cluster.session("agent") as session:
        outcome = cluster.coordinator(session, "agent", consul=consul).handle_change(alloc, "server")
    assert consul.late is not None and consul.late.ok, "the late lock never applied: the case did not happen"
    assert outcome.outcome == Outcome.RESTARTED, outcome
    assert restarts_by_alloc(sim) == {alloc.id: 1}
