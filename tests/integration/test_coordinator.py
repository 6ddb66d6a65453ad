"""Coordinators (agents) and rollouts cooperating on one plan, over HTTP against the simulated cluster.

Sim-only: these tests read the sim's restart record and use its fault controls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from coordination_support import PLAN_KEY, SCALE, Cluster, restarts_by_alloc, sets_trigger
from coordination_support import scenario as web_scenario
from fault_support import ConsulProxy

import shepard_lib.coordinator as coordinator_module
from shepard_lib.backends import ConsulAPI
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.coordinator import EventKind, Outcome, RolloutEvent, SimulatedCrash, Step, Target, target_for
from shepard_lib.errors import ConfigError, ConsulError
from shepard_lib.model import Allocation, TxnOp, TxnResult
from shepard_lib.plan import MemberState, Plan, PlanStatus, register
from shepard_lib.rollout import RolloutOptions
from shepard_lib.session import Session
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory


def scenario(
    count: int, concurrency: int | None = None, group_meta: dict[str, str] | None = None
) -> dict[str, Any]:
    """Seed 3; the job meta ``shepard_concurrency`` only when ``concurrency`` is given; always healthy."""
    return web_scenario(count, concurrency, seed=3, group_meta=group_meta, unhealthy_if_broken=False)


pytestmark = pytest.mark.usefixtures("no_client_env")


class Agents(Cluster):
    """A :class:`Cluster` whose coordinators act as agents on the sim's nodes."""

    TIMING = {
        **Cluster.TIMING,
        "session_ttl": 30.0,  # 1.2 real seconds: a renew every 0.6 s survives a busy machine
        "healthy_deadline": 60.0,  # 2.4 real seconds of slack on a busy machine
    }

    def handle(self, alloc: Allocation, seen_index: int | None, results: list[Any]) -> None:
        with self.session(f"agent {alloc.node_name}") as session:
            outcome = self.coordinator(session, f"agent {alloc.node_name}").handle_change(
                alloc, "server", seen_index=seen_index
            )
            results.append(outcome)


def test_agents_and_a_rollout_of_the_same_change_restart_each_allocation_once_within_concurrency(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(8, concurrency=2), time_scale=SCALE)
    # Nine sessions renew while the sim serves them from this same process: a 10 s TTL (0.4 real
    # seconds) starves on a busy machine, and nothing here waits for a TTL, so give it real margin.
    agents = Agents(sim, session_ttl=60.0)
    allocs = agents.allocs()
    seen = agents.plans.read(PLAN_KEY)[1]  # the plan's index when the change was seen (0: none yet)
    sim.set_key("config/web", "v2")

    outcomes: list[Any] = []
    rollout_result: dict[str, Any] = {}
    threads = [threading.Thread(target=agents.handle, args=(a, seen, outcomes)) for a in allocs]
    threads.append(
        threading.Thread(
            target=lambda: rollout_result.setdefault(
                "r", agents.rollout().run("web", RolloutOptions(seen_index=seen))
            )
        )
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert restarts_by_alloc(sim) == {a.id: 1 for a in allocs}
    assert sim.peak_concurrency("web", "app", "server") <= 2
    assert {o.outcome for o in outcomes} == {Outcome.RESTARTED}
    assert rollout_result["r"].ok
    plan = agents.plan()
    assert plan.status.value == "complete"
    assert plan.generation == 1


def test_second_change_mid_rollout_restarts_done_members_again_and_pending_ones_once(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(6), time_scale=SCALE)
    agents = Agents(sim)
    allocs = agents.allocs()
    two_done = threading.Event()
    done: list[str] = []

    def observe(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTED:
            done.append(event.alloc_id)
            if len(done) == 2:
                two_done.set()

    first: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: first.setdefault(
            "r", agents.rollout(observer=observe).run("web", RolloutOptions(concurrency=1))
        )
    )
    runner.start()
    assert two_done.wait(30)

    # The second change reaches every allocation at once; capture the plan it was applied to.
    seen: list[tuple[Plan, int]] = []
    targets = [target_for(a, "server", agents.nomad.job("web")) for a in allocs]

    def second_change(plan: Plan | None, index: int) -> Plan:
        assert plan is not None
        seen.append((plan, index))
        return register(plan, [t.spec() for t in targets], now=sim.clock.time(), index=index)

    after = agents.plans.update_at(PLAN_KEY, second_change)
    before, change_index = seen[-1]
    second = agents.rollout().run("web", RolloutOptions(concurrency=1, seen_index=change_index))
    runner.join(60)

    # Restarted again: members claimed (done, or restarting) before the change; pending ones: once.
    expected = {
        alloc: 2 if m.claim_index is not None and m.claim_index < change_index else 1
        for alloc, m in before.members.items()
    }
    assert after.generation == before.generation + 1
    assert list(expected.values()).count(2) >= 2, before.members
    assert list(expected.values()).count(1) >= 1, before.members
    assert restarts_by_alloc(sim) == expected
    assert first["r"].ok and second.ok
    assert agents.plan().status.value == "complete"
    assert sim.peak_concurrency("web") <= 1


@pytest.mark.parametrize("crash_after", [Step.SLOT, Step.CLAIMED, Step.TRIGGERED, Step.HEALTHY])
def test_killed_holder_is_taken_over_and_its_allocation_restarts_exactly_once(
    sim_cluster_factory: SimClusterFactory, crash_after: Step
) -> None:
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE)
    agents = Agents(sim)
    victim = agents.allocs()[0]
    session = agents.session("doomed agent")
    session.create()

    def crash(step: Step, target: Target) -> None:
        if step == crash_after:
            session.abandon()
            raise SimulatedCrash(step)

    coordinator = agents.coordinator(session, "doomed agent", fault_hook=crash)
    with pytest.raises(SimulatedCrash):
        coordinator.handle_change(victim, "server")
    killed_at = sim.clock.monotonic()

    result = agents.rollout().run("web", RolloutOptions())  # joins the plan in progress: the same change
    took = sim.clock.monotonic() - killed_at

    assert result.ok, result.to_dict()
    assert restarts_by_alloc(sim)[victim.id] == 1
    member = agents.plan().members[victim.id]
    assert member.state == MemberState.DONE
    if crash_after in (Step.CLAIMED, Step.TRIGGERED, Step.HEALTHY):
        assert [o.reclaimed for o in result.restarted if o.target.alloc_id == victim.id] == [True]
        assert took >= agents.cfg.session_ttl  # only after the dead holder's session expired


class FirstTxnFails(ConsulProxy):
    """A ConsulAPI proxy whose first trigger txn (a trigger key write) meets the sim fault ``fault``."""

    def __init__(self, inner: ConsulAPI, sim: SimCluster, fault: str) -> None:
        super().__init__(inner)
        self._sim = sim
        self._fault = fault
        self.failed = 0
        self.trigger_txns = 0

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        trigger = sets_trigger(ops)
        self.trigger_txns += trigger
        if self.failed or not trigger:
            return self._inner.txn(ops)
        self.failed += 1
        setattr(self._sim.consul_faults, self._fault, 1.0)
        try:
            return self._inner.txn(ops)
        finally:
            setattr(self._sim.consul_faults, self._fault, 0.0)


@pytest.mark.parametrize(
    ("fault", "trigger_txns"),
    [
        ("error_rate", 2),  # not applied: the claim and its trigger are sent once more
        ("lost_reply_rate", 1),  # applied: the plan read shows the claim, so it is not sent again
    ],
)
def test_trigger_answered_500_restarts_the_task_exactly_once_whether_or_not_it_applied(
    sim_cluster_factory: SimClusterFactory, fault: str, trigger_txns: int
) -> None:
    """The claim-and-trigger txn answered 500: one that applied is seen in the plan (the claim is in
    the same txn), one that did not is sent again under the same CAS index, so at most one of the two
    can ever apply. Sim-only (fault controls)."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    consul = FirstTxnFails(agents.consul, sim, fault)
    alloc = agents.allocs()[0]
    with agents.session("agent") as session:
        coordinator = agents.coordinator(session, "agent", consul=consul)
        outcome = coordinator.handle_change(alloc, "server")

    assert (consul.failed, consul.trigger_txns) == (1, trigger_txns)
    assert (outcome.outcome, outcome.by) == (Outcome.RESTARTED, "agent"), outcome
    assert restarts_by_alloc(sim) == {alloc.id: 1}
    assert agents.plan().members[alloc.id].state == MemberState.DONE


def test_corrupt_plan_is_reported_with_its_key_and_replaced(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    agents = Agents(sim)
    sim.set_key(PLAN_KEY, "{not json")
    results: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="shepard_lib.plan"):
        agents.handle(agents.allocs()[0], None, results)
    assert [r.outcome for r in results] == [Outcome.RESTARTED]
    assert f"plan key {PLAN_KEY} holds a corrupt or foreign value" in caplog.text
    assert agents.plan().status.value == "complete"


def test_bad_meta_value_is_a_config_error_naming_job_group_and_key(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2, group_meta={"shepard_concurrency": "lots"}), time_scale=SCALE)
    agents = Agents(sim)
    with agents.session("agent") as session, pytest.raises(ConfigError) as err:
        agents.coordinator(session, "agent").handle_change(agents.allocs()[0], "server")
    assert err.value.problems == [
        "job 'web' group 'app': meta shepard_concurrency = 'lots' is not a whole number >= 1"
    ]
    assert sim.get_key(PLAN_KEY) is None


def test_every_log_line_of_a_restart_names_the_task(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    alloc = agents.allocs()[0]
    with caplog.at_level(logging.DEBUG, logger="shepard_lib.coordinator"):
        agents.handle(alloc, None, [])
    lines = [r.getMessage() for r in caplog.records if r.name == "shepard_lib.coordinator"]
    assert lines
    assert all(line.startswith(f"{alloc.node_name}/web/app/server[0] alloc {alloc.id}") for line in lines), (
        lines
    )


def test_tokens_never_appear_in_logs(
    sim_cluster_factory: SimClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    token = "s3cr3t-acl-token-0123456789"
    sim = sim_cluster_factory(scenario(3), time_scale=SCALE, acl_token=token)
    agents = Agents(sim, token=token)
    with caplog.at_level(logging.DEBUG):
        agents.handle(agents.allocs()[0], None, [])
        result = agents.rollout().run("web", RolloutOptions(concurrency=2))
        views = agents.rollout().status("web")
    assert result.ok
    assert len(sim.restarts()) == 4
    assert caplog.records
    assert token not in caplog.text
    assert token not in str(result.to_dict())
    assert token not in str([v.to_dict() for v in views])


class _TriggerAnswerLostAndCheckFails(ConsulProxy):
    """A Consul whose first trigger txn applies but loses its answer; the next trigger-key read fails."""

    def __init__(self, inner: ConsulAPI, sim: SimCluster) -> None:
        super().__init__(inner)
        self._sim = sim
        self.txns = 0
        self._failed_read = False

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        if not sets_trigger(ops):
            return self._inner.txn(ops)  # a plan write
        self.txns += 1
        if self.txns > 1:
            return self._inner.txn(ops)
        self._sim.consul_faults.lost_reply_rate = 1.0
        try:
            return self._inner.txn(ops)
        finally:
            self._sim.consul_faults.lost_reply_rate = 0.0

    def get(self, key: str, *, consistent: bool = False) -> Any:
        if self.txns and not self._failed_read and key.startswith("shepard/keys/"):
            self._failed_read = True
            raise ConsulError(f"kv.get {key}", "rpc error making call: EOF", status=500, transient=True)
        return self._inner.get(key, consistent=consistent)


def test_a_trigger_that_may_have_applied_is_never_handed_back_and_triggered_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The txn applied but answered 500, and the check of the trigger key failed too: no second trigger."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    consul = _TriggerAnswerLostAndCheckFails(agents.consul, sim)
    (alloc,) = agents.allocs()
    with agents.session("agent") as session:
        coordinator = agents.coordinator(session, "agent", consul=consul)
        outcome = coordinator.handle_change(alloc, "server")
    assert consul.txns == 1, f"the trigger was sent {consul.txns} times"
    assert restarts_by_alloc(sim) == {alloc.id: 1}
    assert outcome.outcome == Outcome.RESTARTED, outcome


def test_a_member_left_restarting_under_our_own_session_is_reclaimed_not_waited_for(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finish write Consul refused leaves the member restarting under this session: reclaim it, not hang."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    real_finish = coordinator_module.finish
    calls = []

    def finish_refused_once(*args: Any, **kwargs: Any) -> Plan:
        calls.append(1)
        if len(calls) == 1:
            raise ConsulError("kv.put plan", "proxy said 502", status=502, transient=False)
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(coordinator_module, "finish", finish_refused_once)
    (alloc,) = agents.allocs()
    result: dict[str, Any] = {}
    with agents.session("agent") as session:
        coordinator = agents.coordinator(session, "agent")
        worker = threading.Thread(
            target=lambda: result.setdefault("outcome", coordinator.handle_change(alloc, "server")),
            daemon=True,
        )
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the coordinator waited on a restart held by its own session"
    assert result["outcome"].outcome == Outcome.RESTARTED, result
    assert restarts_by_alloc(sim) == {alloc.id: 1}, (
        "the reclaim must not trigger a task that already restarted"
    )
    plan = agents.plans.load(PLAN_KEY)
    assert plan is not None and plan.members[alloc.id].state == MemberState.DONE


# --- a lane's finish goes with its next claim (docs/design.md section 5, Lanes) -------------------------


def _plan_txns(sim: SimCluster) -> list[str]:
    """The txns that wrote (or tried to write) the plan, by shape, since the last reset."""
    return [
        f"{shape} x{n}"
        for shape, n in sim.consul_server.requests.shapes().items()
        if shape.startswith(f"PUT /v1/txn [cas {PLAN_KEY}")
    ]


def test_a_lanes_finish_goes_with_its_next_claim_and_its_last_with_the_slots_release(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    agents = Agents(sim)
    first, second = agents.allocs()
    with agents.session("lane") as session:
        lane = agents.coordinator(session, "lane")
        job = agents.nomad.job("web")
        targets = [agents.target(first), agents.target(second)]
        lane.register(lane.keyspace.scope(targets[0].ref), targets, job)
        sim.consul_server.requests.reset()
        done = lane.drive(agents.target(first), keep_slot=True, defer_finish=True)
        assert done.outcome == Outcome.RESTARTED and done.by == "lane"
        plan = agents.plans.load(PLAN_KEY)
        assert plan is not None and plan.members[first.id].state == MemberState.RESTARTING, "deferred"
        first_holder = plan.members[first.id].holder
        assert session.holds(first_holder), "a deferred finish's claim is still this process's"
        done = lane.drive(agents.target(second), keep_slot=True, defer_finish=True)
        assert done.outcome == Outcome.RESTARTED
        plan = agents.plans.load(PLAN_KEY)
        assert plan is not None and plan.members[first.id].state == MemberState.DONE, "written with the claim"
        assert not session.holds(first_holder), "a finish written with the next claim forgets its token"
        assert plan.members[second.id].state == MemberState.RESTARTING
        claim_index = plan.members[second.id].claim_index  # the index the claim was written on, as alone
        assert claim_index is not None and 0 < claim_index < agents.plans.read(PLAN_KEY)[1], claim_index
        assert lane.release_slots() == []
    plan = agents.plans.load(PLAN_KEY)
    assert plan is not None and plan.status == PlanStatus.COMPLETE
    assert {m.state for m in plan.members.values()} == {MemberState.DONE}
    assert restarts_by_alloc(sim) == {first.id: 1, second.id: 1}
    shapes = _plan_txns(sim)
    assert not [s for s in shapes if f"[cas {PLAN_KEY}] " in s], f"no finish was written alone: {shapes}"
    released = [s for s in shapes if "unlock" in s and s.endswith(" 200 x1")]
    assert released, f"the last finish goes with the slot's release: {shapes}"


def test_a_deferred_finish_goes_alone_when_the_next_claim_writes_nothing(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The next member was restarted by someone else meanwhile: its claim is refused, the finish not lost."""
    sim = sim_cluster_factory(scenario(2, concurrency=2), time_scale=SCALE)
    agents = Agents(sim)
    first, second = agents.allocs()
    elsewhere = ConsulBackend(agents.cfg.consul, agents.clock)  # another agent: plans seen apart
    with agents.session("lane") as session, agents.session("other") as other_session:
        lane = agents.coordinator(session, "lane")
        job = agents.nomad.job("web")
        targets = [agents.target(first), agents.target(second)]
        lane.register(lane.keyspace.scope(targets[0].ref), targets, job)
        done = lane.drive(agents.target(first), keep_slot=True, defer_finish=True)
        assert done.outcome == Outcome.RESTARTED
        other = agents.coordinator(other_session, "other", consul=elsewhere)
        assert other.drive(agents.target(second)).outcome == Outcome.RESTARTED  # c = 2: its own slot
        # The lane still believes the second member pending: its claim is refused on a fresh read.
        outcome = lane.drive(agents.target(second), keep_slot=True, defer_finish=True)
        assert (outcome.outcome, outcome.by) == (Outcome.RESTARTED, "other")
        plan = agents.plans.load(PLAN_KEY)
        assert plan is not None and plan.members[first.id].state == MemberState.DONE
        assert lane.release_slots() == []
    assert restarts_by_alloc(sim) == {first.id: 1, second.id: 1}


@pytest.mark.parametrize("lane_read_it", [False, True], ids=["stale", "read by the lane"])
def test_a_lanes_claim_after_another_process_was_restarting_reads_the_plan_first_unless_read_for_it(
    sim_cluster_factory: SimClusterFactory, lane_read_it: bool
) -> None:
    """The lane last saw another process's member restarting: that process most likely finished it during
    the lane's health wait, so the lane's next claim reads the plan first instead of sending its CAS on the
    stale plan to be refused, unless the lane read the plan for this drive already (to choose its member;
    the other's member still restarting in that read). A cost, not a decision: the CAS fences either way."""
    sim = sim_cluster_factory(scenario(3, concurrency=2), time_scale=SCALE)
    agents = Agents(sim)
    first, second, third = agents.allocs()
    elsewhere = ConsulBackend(agents.cfg.consul, agents.clock)  # another agent: its plans and sessions apart
    other_session = Session(elsewhere, "other", ttl=agents.cfg.session_ttl, clock=agents.clock)
    with agents.session("lane") as session, other_session:
        lane = agents.coordinator(session, "lane")
        other = agents.coordinator(other_session, "other", consul=elsewhere)
        targets = [agents.target(a) for a in (first, second, third)]
        lane.register(lane.keyspace.scope(targets[0].ref), targets, agents.nomad.job("web"))
        assert other.drive(targets[1], keep_slot=True, defer_finish=True).outcome == Outcome.RESTARTED
        assert lane.drive(targets[0], keep_slot=True, defer_finish=True).outcome == Outcome.RESTARTED
        assert lane.written_elsewhere(PLAN_KEY, first.id), "the lane saw the other's member restarting"
        since = agents.plans.mark()
        if lane_read_it:
            agents.plans.read(PLAN_KEY)
            assert lane.written_elsewhere(PLAN_KEY, first.id), "the read still shows the other restarting"
        else:
            assert other.release_slots() == []  # the other's finish moves the plan past what the lane knows
        sim.consul_server.requests.reset()
        done = lane.drive(targets[2], since=since, keep_slot=True, defer_finish=True)
        assert done.outcome == Outcome.RESTARTED
        shapes = sim.consul_server.requests.shapes()
        writes = _plan_txns(sim)
        assert len(writes) == 1 and writes[0].endswith(" 200 x1"), f"one claim, not refused: {shapes}"
        reads = shapes.get(f"GET /v1/kv/{PLAN_KEY} ?consistent 200", 0)
        assert reads == (0 if lane_read_it else 1), f"the plan read first only when stale: {shapes}"
        assert lane.release_slots() == [] and other.release_slots() == []
    assert restarts_by_alloc(sim) == {first.id: 1, second.id: 1, third.id: 1}


def test_a_member_whose_deferred_finish_finds_a_new_change_is_handed_back_to_be_restarted_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    (alloc,) = agents.allocs()
    target = agents.target(alloc)
    with agents.session("lane") as session:
        lane = agents.coordinator(session, "lane")
        job = agents.nomad.job("web")
        scope = lane.keyspace.scope(target.ref)
        lane.register(scope, [target], job)
        assert lane.drive(target, keep_slot=True, defer_finish=True).outcome == Outcome.RESTARTED
        # A change seen after the claim, registered by another agent: the member is marked rerun.
        agents.coordinator(session, "registrar").register(scope, [target], job)
        assert lane.release_slots() == [target]
    plan = agents.plans.load(PLAN_KEY)
    assert plan is not None and plan.members[alloc.id].state == MemberState.PENDING
    assert plan.members[alloc.id].generation == 2


def test_a_plan_read_sent_before_a_members_registration_does_not_end_its_drive(
    sim_cluster_factory: SimClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found as a flake of the agents-and-a-rollout test: a consistent plan read sent before a
    member's registration and answered after it got a read mark newer than the drive's, so the
    drive concluded on it that the member was not in the plan and skipped it."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    agents = Agents(sim)
    first, second = agents.allocs()
    answered, go_on = threading.Event(), threading.Event()
    real_get = agents.consul.get

    def held_answer(key: str, **kwargs: Any) -> Any:
        entry = real_get(key, **kwargs)
        if threading.current_thread().name == "early reader":
            answered.set()
            assert go_on.wait(60)
        return entry

    with agents.session("lane") as session:
        lane = agents.coordinator(session, "lane")
        job = agents.nomad.job("web")
        scope = lane.keyspace.scope(agents.target(first).ref)
        lane.register(scope, [agents.target(first)], job)
        monkeypatch.setattr(agents.consul, "get", held_answer)
        reader = threading.Thread(target=agents.plans.read, args=(PLAN_KEY,), name="early reader")
        reader.start()
        assert answered.wait(60)  # the read has its answer (no second member) but has not stored it
        lane.register(scope, [agents.target(second)], job)
        since = agents.plans.mark()
        go_on.set()
        reader.join(60)
        outcome = lane.drive(agents.target(second), since=since)
    assert (outcome.outcome, outcome.reason) == (Outcome.RESTARTED, "")
    assert restarts_by_alloc(sim) == {second.id: 1}


def test_a_lanes_member_marked_rerun_before_its_finish_is_finished_at_once_and_restarted_again(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """A new change of the member arrives while the lane waits for it to be healthy (this process's
    registrar marks it rerun): its finish is not deferred but written, sending it back to pending, and
    the same drive restarts it for the new change; only that second restart's finish is deferred."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    agents = Agents(sim)
    first, second = agents.allocs()
    target = agents.target(first)
    changed: list[int] = []
    with agents.session("lane") as session:
        job = agents.nomad.job("web")

        def new_change(step: Step, at: Target) -> None:
            if step == Step.HEALTHY and not changed:
                changed.append(1)
                agents.coordinator(session, "registrar").register(scope, [target], job)

        lane = agents.coordinator(session, "lane", fault_hook=new_change)
        scope = lane.keyspace.scope(target.ref)
        lane.register(scope, [target, agents.target(second)], job)
        done = lane.drive(target, keep_slot=True, defer_finish=True, wait_for_holders=False)
        assert changed, "the hook never ran"
        assert (done.outcome, done.generation, done.by) == (Outcome.RESTARTED, 2, "lane"), done
        assert restarts_by_alloc(sim).get(first.id) == 2
        plan = agents.plans.load(PLAN_KEY)
        assert plan is not None and plan.members[first.id].state == MemberState.RESTARTING, (
            "the second deferred"
        )
        assert lane.release_slots() == []
    plan = agents.plans.load(PLAN_KEY)
    assert plan is not None and (plan.members[first.id].state, plan.members[first.id].generation) == (
        MemberState.DONE,
        2,
    )


def test_a_lanes_member_whose_plan_was_deleted_during_its_health_wait_is_reported_and_nothing_deferred(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    (first,) = agents.allocs()
    target = agents.target(first)

    def delete_plan(step: Step, at: Target) -> None:
        if step == Step.HEALTHY:
            agents.consul.delete(PLAN_KEY)
            assert agents.plans.read(PLAN_KEY) == (None, 0)  # this process knows it now

    with agents.session("lane") as session:
        lane = agents.coordinator(session, "lane", fault_hook=delete_plan)
        lane.register(lane.keyspace.scope(target.ref), [target], agents.nomad.job("web"))
        done = lane.drive(target, keep_slot=True, defer_finish=True, wait_for_holders=False)
        assert done.outcome == Outcome.RESTARTED, done
        assert lane.release_slots() == []
    assert agents.plans.load(PLAN_KEY) is None
    assert restarts_by_alloc(sim) == {first.id: 1}


class RefusePlanWrites(ConsulProxy):
    """Refuses every txn once ``refuse`` is set (HTTP 403: the write did not apply)."""

    refuse = False

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        if self.refuse:
            raise ConsulError("txn", "Permission denied", status=403)
        return self._inner.txn(ops)  # type: ignore[no-any-return]


def test_a_deferred_finish_that_could_not_be_written_leaves_its_member_to_be_taken_over_in_this_process(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The lane gives its claim up with the failed write: another coordinator of the same session (the
    agent's idle worker) sees the member left restarting as driven by nobody, and takes it over."""
    sim = sim_cluster_factory(scenario(1), time_scale=SCALE)
    agents = Agents(sim)
    (first,) = agents.allocs()
    target = agents.target(first)
    consul = RefusePlanWrites(agents.consul)
    with agents.session("lane") as session:
        lane = agents.coordinator(session, "lane", consul=consul)
        lane.register(lane.keyspace.scope(target.ref), [target], agents.nomad.job("web"))
        assert lane.drive(target, keep_slot=True, defer_finish=True).outcome == Outcome.RESTARTED
        consul.refuse = True
        assert lane.release_slots() == []  # the finish failed: logged, the member left restarting
        member = agents.plans.read(PLAN_KEY)[0].members[first.id]  # type: ignore[union-attr]
        assert member.state == MemberState.RESTARTING
        assert not agents.coordinator(session, "worker").driven(member), "a claim given up still looks held"


def test_a_member_whose_own_deferred_finish_finds_a_new_change_is_restarted_again_in_its_drive(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    """The agent's worker drives the new change of a member its lane still holds deferred: the drive
    writes the finish first (the member goes back to pending) and restarts it under the kept slot,
    instead of reporting the old generation's restart as the new change's."""
    sim = sim_cluster_factory(scenario(2), time_scale=SCALE)
    agents = Agents(sim)
    first, second = agents.allocs()
    target = agents.target(first)
    with agents.session("lane") as session:
        lane = agents.coordinator(session, "lane")
        job = agents.nomad.job("web")
        scope = lane.keyspace.scope(target.ref)
        lane.register(scope, [target, agents.target(second)], job)
        done = lane.drive(target, keep_slot=True, defer_finish=True, wait_for_holders=False)
        assert (done.outcome, done.generation) == (Outcome.RESTARTED, 1)
        # The agent's registrar (same process, same session) registers a new change of the member.
        agents.coordinator(session, "registrar").register(scope, [target], job)
        again = lane.drive(
            target, keep_slot=True, since=agents.plans.mark(), defer_finish=True, wait_for_holders=False
        )
        assert (again.outcome, again.generation, again.by) == (Outcome.RESTARTED, 2, "lane")
        assert restarts_by_alloc(sim).get(first.id) == 2
        assert lane.release_slots() == []
    plan = agents.plans.load(PLAN_KEY)
    assert plan is not None and plan.members[first.id].state == MemberState.DONE
    assert plan.members[first.id].generation == 2
