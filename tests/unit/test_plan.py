"""The plan state machine (shepard_lib.plan): pure transitions, no sockets."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shepard_lib import plan as plan_module
from shepard_lib.errors import ConfigError, PlanError
from shepard_lib.model import Job, TaskGroup
from shepard_lib.plan import (
    SCHEMA_VERSION,
    ConcurrencyFull,
    MemberSpec,
    MemberState,
    MemberUnavailable,
    Plan,
    PlanFormatError,
    PlanSettings,
    PlanStatus,
    down,
    new_plan,
    reclaim,
    recover,
    resolve_settings,
    resume,
)

A, B, C, D = (MemberSpec(f"alloc-{x}", f"node-{i}", i) for i, x in enumerate("abcd"))

# Consul's ModifyIndex of the plan key, as the store would pass it: every write is applied at a
# higher index than the one before, and mark() is a plan index read "now".
_INDEX = itertools.count(1)


def mark() -> int:
    return next(_INDEX)


def _applied(fn: Callable[..., Plan]) -> Callable[..., Plan]:
    def call(*args: Any, **kwargs: Any) -> Plan:
        kwargs.setdefault("index", next(_INDEX))
        return fn(*args, **kwargs)

    return call


register = _applied(plan_module.register)
claim = _applied(plan_module.claim)
finish = _applied(plan_module.finish)
unclaim = _applied(plan_module.unclaim)
skip = _applied(plan_module.skip)
abort = _applied(plan_module.abort)


def fresh(concurrency: int = 2, max_failures: int = 0, count: int = 4) -> Plan:
    return new_plan(
        "web",
        "app",
        "server",
        None,
        instance_count=count,
        settings=PlanSettings(concurrency, max_failures),
        now=100.0,
    )


def take(
    plan: Plan,
    spec: MemberSpec,
    holder: str = "h1",
    session: str = "s1",
    restarts: int = 0,
    now: float = 101.0,
) -> Plan:
    return claim(
        plan,
        spec.alloc_id,
        holder=holder,
        session=session,
        holder_name=f"worker {holder}",
        restarts_before=restarts,
        started_before=50.0,
        now=now,
    )


def state(plan: Plan, spec: MemberSpec) -> MemberState:
    return plan.members[spec.alloc_id].state


def restart(plan: Plan, spec: MemberSpec, ok: bool = True, holder: str = "h1") -> Plan:
    return finish(
        take(plan, spec, holder=holder), spec.alloc_id, holder=holder, ok=ok, now=102.0, error="boom"
    )


# --- registration and generations ----------------------------------------------------------


def test_first_registration_creates_pending_member_in_generation_one() -> None:
    plan = register(fresh(), [A], now=100.0)
    assert plan.status == PlanStatus.PLANNED
    assert plan.generation == 1
    member = plan.members[A.alloc_id]
    assert (member.state, member.node, member.alloc_index, member.generation) == (
        MemberState.PENDING,
        "node-0",
        0,
        1,
    )


def test_registering_a_pending_member_again_changes_nothing() -> None:
    plan = register(fresh(), [A], now=100.0)
    assert register(plan, [A], now=200.0) is plan


def test_late_events_of_the_same_change_join_the_current_generation() -> None:
    plan = register(fresh(), [A], now=100.0)
    plan = register(plan, [B], now=101.0)
    plan = restart(plan, A)
    plan = register(plan, [C], now=103.0)
    assert plan.generation == 1
    assert {a: m.generation for a, m in plan.members.items()} == {A.alloc_id: 1, B.alloc_id: 1, C.alloc_id: 1}


def test_new_change_makes_done_member_pending_in_next_generation_and_moves_pending_ones() -> None:
    plan = register(fresh(), [A, B, C], now=100.0)
    plan = restart(plan, A)
    plan = register(plan, [A], now=110.0)
    assert plan.generation == 2
    assert state(plan, A) == MemberState.PENDING
    assert plan.members[A.alloc_id].generation == 2
    assert plan.members[B.alloc_id].generation == 2  # still pending: restarted once, with the newest config


def test_event_of_a_change_older_than_the_members_restart_leaves_it_done() -> None:
    plan = register(fresh(), [A, B], now=100.0)
    seen = mark()  # the change was seen (plan index read) before A was claimed
    plan = restart(plan, A)
    assert register(plan, [A], now=110.0, seen_index=seen) is plan


def test_event_of_a_change_older_than_a_restart_in_flight_does_not_rerun_it() -> None:
    plan = register(fresh(), [A, B], now=100.0)
    seen = mark()
    plan = take(plan, A)
    plan = register(plan, [A], now=105.0, seen_index=seen)
    assert plan.generation == 1
    assert not plan.members[A.alloc_id].rerun


def test_one_change_seen_by_several_done_members_opens_a_single_generation() -> None:
    plan = register(fresh(), [A, B], now=100.0)
    plan = restart(restart(plan, A), B)
    assert plan.status == PlanStatus.COMPLETE
    plan = register(plan, [A], now=110.0)
    plan = register(plan, [B], now=111.0)
    assert plan.generation == 2
    assert plan.status == PlanStatus.PLANNED
    assert [state(plan, A), state(plan, B)] == [MemberState.PENDING, MemberState.PENDING]


def test_member_restarting_when_a_change_arrives_goes_back_to_pending_when_it_finishes() -> None:
    plan = take(register(fresh(), [A, B], now=100.0), A)
    plan = register(plan, [A], now=105.0)
    assert plan.generation == 2
    assert plan.members[A.alloc_id].rerun
    assert state(plan, A) == MemberState.RESTARTING  # the restart in flight is not interrupted
    plan = finish(plan, A.alloc_id, holder="h1", ok=True, now=106.0)
    member = plan.members[A.alloc_id]
    assert (member.state, member.generation, member.holder, member.rerun) == (
        MemberState.PENDING,
        2,
        None,
        False,
    )
    plan = take(plan, A, holder="h2", session="s2")
    assert plan.members[A.alloc_id].holder == "h2"


def test_restarting_member_registered_after_the_generation_moved_is_rerun_too() -> None:
    plan = take(register(fresh(), [A, B], now=100.0), A)
    plan = restart(plan, B, holder="h2")
    plan = register(plan, [B], now=110.0)  # the new change reaches B first
    assert plan.generation == 2
    plan = register(plan, [A], now=111.0)  # then A, still restarting from generation 1
    assert plan.generation == 2
    assert plan.members[A.alloc_id].rerun


def test_registering_many_members_opens_at_most_one_generation() -> None:
    plan = register(fresh(), [A, B, C], now=100.0)
    plan = restart(restart(plan, A), B)
    plan = register(plan, [A, B, C, D], now=110.0)
    assert plan.generation == 2
    assert all(m.state == MemberState.PENDING and m.generation == 2 for m in plan.members.values())


def test_active_plan_keeps_its_concurrency_and_a_reopened_one_takes_the_new_settings() -> None:
    plan = register(fresh(concurrency=2), [A, B], now=100.0)
    joined = register(plan, [C], now=101.0, settings=PlanSettings(5, 3), instance_count=9)
    assert (joined.concurrent_lock_count, joined.max_failures, joined.instance_count) == (2, 0, 4)
    done = restart(restart(restart(joined, A), B), C)
    assert done.status == PlanStatus.COMPLETE
    reopened = register(done, [A], now=120.0, settings=PlanSettings(5, 3), instance_count=9)
    assert (reopened.concurrent_lock_count, reopened.max_failures, reopened.instance_count) == (5, 3, 9)


def test_new_change_while_a_member_restarts_keeps_the_plans_concurrency() -> None:
    plan = take(register(fresh(concurrency=2), [A, B], now=100.0), A)
    plan = restart(plan, B, holder="h2")
    plan = register(plan, [B], now=110.0, settings=PlanSettings(7, 1))
    assert plan.generation == 2
    assert plan.concurrent_lock_count == 2


# --- claims -------------------------------------------------------------------------------


def test_claim_takes_a_pending_member_and_records_the_baseline() -> None:
    plan = take(register(fresh(), [A], now=100.0), A, restarts=3)
    member = plan.members[A.alloc_id]
    assert (member.state, member.holder, member.session) == (MemberState.RESTARTING, "h1", "s1")
    assert (member.restarts_before, member.started_before) == (3, 50.0)


def test_a_member_can_be_claimed_by_one_holder_only() -> None:
    plan = take(register(fresh(), [A], now=100.0), A, holder="h1")
    with pytest.raises(MemberUnavailable, match="restarting, held by worker h1"):
        take(plan, A, holder="h2", session="s1")


def test_claim_is_refused_while_the_concurrency_is_taken_by_restarts_in_flight() -> None:
    plan = register(fresh(concurrency=2), [A, B, C], now=100.0)
    plan = take(take(plan, A, holder="h1", session="dead"), B, holder="h2", session="s2")
    with pytest.raises(ConcurrencyFull, match="2 member\\(s\\) restarting or failed"):
        take(plan, C, holder="h3", session="s3")
    plan = reclaim(plan, A.alloc_id, dead_holder="h1", holder="h3", session="s3", holder_name="x", now=120.0)
    plan = finish(plan, A.alloc_id, holder="h3", ok=True, now=121.0)
    assert take(plan, C, holder="h4", session="s4").members[C.alloc_id].holder == "h4"


def test_claim_by_the_same_holder_is_idempotent() -> None:
    plan = take(register(fresh(), [A], now=100.0), A)
    assert take(plan, A) is plan


def test_done_member_is_not_claimed_again_in_the_same_generation() -> None:
    plan = restart(register(fresh(), [A, B], now=100.0), A)
    with pytest.raises(MemberUnavailable, match="done in generation 1"):
        take(plan, A, holder="h2")


def test_claim_of_unknown_member_names_the_plan() -> None:
    with pytest.raises(MemberUnavailable, match="not a member of plan web/app/server"):
        take(fresh(), A)


def test_unclaim_gives_the_member_back() -> None:
    plan = take(register(fresh(), [A], now=100.0), A)
    plan = unclaim(plan, A.alloc_id, holder="h1", now=103.0, error="slot lost before trigger")
    member = plan.members[A.alloc_id]
    assert (member.state, member.holder, member.restarts_before) == (MemberState.PENDING, None, None)
    assert plan.status == PlanStatus.PLANNED
    assert unclaim(plan, A.alloc_id, holder="h1", now=104.0) is plan


def test_reclaim_moves_a_dead_holders_member_and_keeps_its_baseline() -> None:
    plan = take(register(fresh(), [A], now=100.0), A, holder="h1", session="dead", restarts=4)
    plan = reclaim(
        plan, A.alloc_id, dead_holder="h1", holder="h2", session="s2", holder_name="rescuer", now=130.0
    )
    member = plan.members[A.alloc_id]
    assert (member.holder, member.session, member.holder_name) == ("h2", "s2", "rescuer")
    assert member.restarts_before == 4
    assert member.state == MemberState.RESTARTING


def test_reclaim_refuses_a_member_held_by_another_claim() -> None:
    plan = take(register(fresh(), [A], now=100.0), A, holder="h1", session="shared")
    with pytest.raises(MemberUnavailable):
        reclaim(plan, A.alloc_id, dead_holder="h0", holder="h2", session="shared", holder_name="x", now=130.0)


# --- finishing and the failure policy ---------------------------------------------------------


def test_plan_is_complete_when_no_member_is_pending_or_restarting() -> None:
    plan = register(fresh(), [A, B], now=100.0)
    plan = restart(plan, A)
    assert plan.status == PlanStatus.PLANNED
    plan = restart(plan, B)
    assert plan.status == PlanStatus.COMPLETE


def test_finish_by_someone_else_is_refused_and_own_repeat_is_a_no_op() -> None:
    plan = take(register(fresh(), [A, B], now=100.0), A)
    with pytest.raises(MemberUnavailable):
        finish(plan, A.alloc_id, holder="intruder", ok=True, now=103.0)
    done = finish(plan, A.alloc_id, holder="h1", ok=True, now=103.0)
    assert finish(done, A.alloc_id, holder="h1", ok=True, now=104.0) is done


def test_failures_exceeding_max_failures_halt_the_plan() -> None:
    plan = register(fresh(max_failures=1), [A, B, C, D], now=100.0)
    plan = restart(plan, A, ok=False)
    assert plan.status == PlanStatus.PLANNED
    plan = restart(plan, B, ok=False)
    assert plan.status == PlanStatus.FAILED
    assert plan.halt_reason is not None and "max_failures=1" in plan.halt_reason
    assert plan.members[B.alloc_id].error == "boom"
    with pytest.raises(MemberUnavailable, match="plan web/app/server is failed"):
        take(plan, C)


def test_restart_in_flight_when_the_plan_fails_still_finishes() -> None:
    plan = register(fresh(), [A, B, C], now=100.0)
    plan = take(plan, B, holder="h2")
    plan = restart(plan, A, ok=False)
    assert plan.status == PlanStatus.FAILED
    plan = finish(plan, B.alloc_id, holder="h2", ok=True, now=105.0)
    assert state(plan, B) == MemberState.DONE
    assert plan.status == PlanStatus.FAILED
    assert state(plan, C) == MemberState.PENDING


def test_late_event_of_the_failing_change_does_not_resume_the_plan() -> None:
    plan = register(fresh(), [A], now=100.0)
    seen = mark()
    plan = restart(plan, A, ok=False)
    plan = register(plan, [B], now=110.0, seen_index=seen)
    plan = register(plan, [A], now=111.0, seen_index=seen)
    assert plan.status == PlanStatus.FAILED
    assert plan.generation == 1
    assert (state(plan, A), state(plan, B)) == (MemberState.FAILED, MemberState.PENDING)


def test_new_change_on_a_failed_member_starts_a_new_generation_and_replans() -> None:
    plan = restart(register(fresh(), [A, B], now=100.0), A, ok=False)
    plan = register(plan, [A], now=120.0)
    assert (plan.status, plan.generation, plan.failures()) == (PlanStatus.PLANNED, 2, 0)
    assert plan.members[B.alloc_id].generation == 2


def test_failures_of_an_older_generation_do_not_count() -> None:
    plan = register(fresh(max_failures=1), [A, B], now=100.0)
    plan = restart(plan, A, ok=False)
    plan = restart(plan, B)
    plan = register(plan, [B], now=120.0)
    assert plan.failures() == 0
    plan = restart(plan, B, ok=False)
    assert plan.status == PlanStatus.COMPLETE  # one failure of generation 2 is tolerated


def test_resume_makes_failed_members_pending_and_the_plan_planned() -> None:
    plan = restart(register(fresh(), [A, B], now=100.0), A, ok=False)
    plan = resume(plan, now=130.0)
    assert plan.status == PlanStatus.PLANNED
    assert plan.halt_reason is None
    assert [state(plan, A), state(plan, B)] == [MemberState.PENDING, MemberState.PENDING]
    assert plan.generation == 1
    assert state(restart(restart(plan, A), B), B) == MemberState.DONE


def test_resume_of_a_planned_plan_is_idempotent() -> None:
    """Issue 8 finding 4: a resume whose CAS answer was lost is re-applied to a planned plan."""
    plan = register(fresh(), [A], now=100.0)
    assert resume(plan, now=101.0) is plan


def test_abort_stops_new_claims_and_leaves_pending_members() -> None:
    plan = take(register(fresh(), [A, B], now=100.0), A)
    plan = abort(plan, reason="operator said so", now=103.0)
    assert (plan.status, plan.halt_reason) == (PlanStatus.ABORTED, "operator said so")
    with pytest.raises(MemberUnavailable, match="aborted: operator said so"):
        take(plan, B, holder="h2")
    plan = finish(plan, A.alloc_id, holder="h1", ok=True, now=104.0)
    assert plan.status == PlanStatus.ABORTED
    assert state(plan, B) == MemberState.PENDING
    assert abort(plan, reason="again", now=105.0) is plan


def test_abort_of_a_complete_plan_is_an_error() -> None:
    with pytest.raises(PlanError, match="complete"):
        abort(restart(register(fresh(), [A], now=100.0), A), reason="x", now=110.0)


def test_resume_after_abort_lets_pending_members_restart() -> None:
    plan = abort(register(fresh(), [A], now=100.0), reason="x", now=101.0)
    plan = restart(resume(plan, now=102.0), A)
    assert plan.status == PlanStatus.COMPLETE


# --- settings from config and meta ------------------------------------------------------------


def job(job_meta: dict[str, str] | None = None, group_meta: dict[str, str] | None = None) -> Job:
    group = TaskGroup(name="app", count=3, meta=group_meta or {})
    return Job(
        id="web", name="web", namespace="default", status="running", meta=job_meta or {}, groups=(group,)
    )


def test_settings_come_from_config_without_meta() -> None:
    assert resolve_settings(job(), "app", concurrency=2, max_failures=3) == PlanSettings(2, 3)


def test_job_meta_overrides_config_and_group_meta_wins() -> None:
    both = job({"shepard_concurrency": "4", "shepard_max_failures": "2"}, {"shepard_concurrency": "3"})
    assert resolve_settings(both, "app", concurrency=1, max_failures=1) == PlanSettings(3, 2)


@pytest.mark.parametrize("bad", ["zero", "-1", "", "1.5"])
def test_bad_meta_value_is_a_config_error_naming_job_group_and_key(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_settings(job({}, {"shepard_max_failures": bad}), "app", concurrency=1, max_failures=1)
    assert err.value.problems == [
        f"job 'web' group 'app': meta shepard_max_failures = {bad!r} is not a whole number >= 0"
    ]


def test_every_bad_meta_value_is_reported() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_settings(
            job({"shepard_concurrency": "x"}, {"shepard_max_failures": "y"}),
            "app",
            concurrency=1,
            max_failures=1,
        )
    assert len(err.value.problems) == 2
    assert "job 'web': meta shepard_concurrency" in err.value.problems[0]


# --- wire format ------------------------------------------------------------------------------


def test_plan_round_trips_through_json() -> None:
    plan = register(fresh(), [A, B], now=100.0)
    plan = take(plan, A)
    plan = register(plan, [A], now=104.0)
    plan = abort(plan, reason="why not", now=105.0)
    assert Plan.decode(plan.encode()) == plan
    data = json.loads(plan.encode())
    assert data["schema"] == SCHEMA_VERSION
    assert data["concurrent_lock_count"] == 2
    assert data["members"][A.alloc_id]["state"] == "restarting"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "empty"),
        (b"\xff\xfe", "not JSON"),
        (b"locked-by-node-3", "not JSON"),
        (b'{"status": "planned"}', "not a Shepard plan"),
        (b'{"kind": "shepard.plan", "schema": 99}', "schema 99"),
        (b'{"kind": "shepard.plan", "schema": 2, "job": "web"}', "malformed plan"),
        (b'{"kind": "shepard.plan", "schema": 1, "job": "web"}', "schema 1, this Shepard reads 2"),
    ],
)
def test_corrupt_or_foreign_value_is_a_format_error_saying_why(raw: bytes, why: str) -> None:
    with pytest.raises(PlanFormatError, match=why):
        Plan.decode(raw)


def test_member_with_an_unknown_state_is_malformed() -> None:
    data = json.loads(register(fresh(), [A], now=100.0).encode())
    data["members"][A.alloc_id]["state"] = "sleeping"
    with pytest.raises(PlanFormatError, match="malformed"):
        Plan.decode(json.dumps(data).encode())


# --- a property: however workers interleave, each member restarts once per generation --------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["claim", "finish", "fail", "change"]), st.integers(0, 3)), max_size=60
    )
)
def test_interleaved_workers_restart_each_member_once_per_generation(
    steps: list[tuple[str, int]],
) -> None:
    specs = [A, B, C, D]
    plan = register(fresh(max_failures=3), specs, now=0.0)
    earlier = mark()
    restarts: dict[tuple[str, int], int] = {}
    claims: dict[str, tuple[str, int]] = {}  # alloc -> (holder, generation claimed in)
    for n, (op, i) in enumerate(steps):
        spec = specs[i]
        try:
            if op == "claim":
                holder = f"w{n}"
                plan = take(plan, spec, holder=holder, now=n)
                gen = plan.members[spec.alloc_id].generation
                restarts[(spec.alloc_id, gen)] = restarts.get((spec.alloc_id, gen), 0) + 1
                claims[spec.alloc_id] = (holder, gen)
            elif op in ("finish", "fail") and spec.alloc_id in claims:
                plan = finish(
                    plan, spec.alloc_id, holder=claims.pop(spec.alloc_id)[0], ok=op == "finish", now=n
                )
            elif op == "change":
                now_mark = mark()
                plan = register(plan, [spec], now=n, seen_index=earlier if i % 2 else now_mark)
                earlier = now_mark
        except MemberUnavailable:
            pass
        assert all(count == 1 for count in restarts.values()), restarts
        restarting = plan.in_state(MemberState.RESTARTING)
        assert set(restarting) == set(claims)
        if plan.status == PlanStatus.COMPLETE:
            assert not plan.in_state(MemberState.PENDING)


# --- issue 8: logical generations, halted plans, the concurrency of failures, pruning ---------


def test_a_change_seen_after_the_halt_reopens_the_plan_for_every_pending_member() -> None:
    """Finding 4: the first agent reporting a new change (its member still pending) un-halts the plan."""
    plan = register(fresh(), [A, B, C], now=100.0)
    plan = restart(plan, A, ok=False)
    assert plan.status == PlanStatus.FAILED
    seen = mark()  # the new change is seen after the halt
    plan = register(plan, [B], now=120.0, seen_index=seen)
    assert (plan.status, plan.generation) == (PlanStatus.PLANNED, 2)
    assert {m.generation for a, m in plan.members.items() if a != A.alloc_id} == {2}
    assert take(plan, C, holder="h9").members[C.alloc_id].state == MemberState.RESTARTING


def test_generations_are_ordered_by_index_not_by_any_clock() -> None:
    """Finding 3: a registration's wall time says nothing; only claim_index >= seen_index covers a member."""
    plan = restart(register(fresh(), [A, B], now=100.0), A)
    # A host whose clock is far behind registers a new change seen after A's restart.
    plan = register(plan, [A], now=-1e9, seen_index=mark())
    assert (plan.generation, state(plan, A)) == (2, MemberState.PENDING)


def test_join_adds_no_generation_to_a_planned_plan() -> None:
    """Issue 11: a second rollout joins the plan in progress unless asked to restart again."""
    plan = restart(register(fresh(), [A, B], now=100.0), A)
    joined = register(plan, [A, B, C], now=110.0, join=True)
    assert (joined.generation, state(joined, A), state(joined, C)) == (
        1,
        MemberState.DONE,
        MemberState.PENDING,
    )
    again = register(plan, [A, B, C], now=110.0)
    assert (again.generation, state(again, A)) == (2, MemberState.PENDING)


def test_a_failed_member_keeps_its_concurrency_share_until_it_recovers() -> None:
    """Finding 5: with max_failures > 0 a failed restart still counts as down."""
    plan = register(fresh(concurrency=1, max_failures=2), [A, B], now=100.0)
    plan = restart(plan, A, ok=False)
    assert plan.status == PlanStatus.PLANNED and set(down(plan)) == {A.alloc_id}
    with pytest.raises(ConcurrencyFull):
        take(plan, B, holder="h2")
    plan = recover(plan, A.alloc_id, now=120.0)
    assert not down(plan)
    assert state(take(plan, B, holder="h2"), B) == MemberState.RESTARTING


def test_max_failures_zero_halts_at_the_first_failure() -> None:
    plan = restart(register(fresh(max_failures=0), [A, B], now=100.0), A, ok=False)
    assert plan.status == PlanStatus.FAILED


def test_a_member_of_a_stopped_allocation_is_skipped_never_failed() -> None:
    plan = register(fresh(), [A, B], now=100.0)
    plan = skip(plan, A.alloc_id, reason="stopped", now=101.0)
    plan = skip(take(plan, B, holder="h2"), B.alloc_id, reason="replaced", now=102.0, holder="h2")
    assert (state(plan, A), state(plan, B), plan.failures(), plan.status) == (
        MemberState.SKIPPED,
        MemberState.SKIPPED,
        0,
        PlanStatus.COMPLETE,
    )
    with pytest.raises(MemberUnavailable):
        skip(take(register(plan, [C], now=103.0), C, holder="h3"), C.alloc_id, reason="x", now=104.0)


def test_plan_of_100_deployments_of_a_50_allocation_job_stays_under_64_kib() -> None:
    """Finding 2: settled members of allocations Nomad replaced are pruned; the value stays bounded."""
    plan = fresh(concurrency=5, count=50)
    for deployment in range(100):
        specs = [MemberSpec(f"alloc-{deployment}-{i}", f"node-{i % 7}", i) for i in range(50)]
        plan = register(plan, specs, now=float(deployment), live=[s.alloc_id for s in specs])
        for spec in specs:
            plan = restart(plan, spec, holder=f"h{deployment}-{spec.alloc_index}")
        assert plan.status == PlanStatus.COMPLETE
    assert len(plan.members) == 50
    assert len(plan.encode()) < 64 * 1024, len(plan.encode())


def test_agent_registrations_of_100_deployments_of_a_50_allocation_job_stay_under_64_kib() -> None:
    """The agents register one allocation at a time and do not know the job's live allocations
    (no ``live``): a replacement (same index, new ID) drops the settled member of its index."""
    plan = fresh(concurrency=5, count=50)
    for deployment in range(100):
        specs = [MemberSpec(f"alloc-{deployment}-{i}", f"node-{(i + deployment) % 7}", i) for i in range(50)]
        for spec in specs:
            plan = register(plan, [spec], now=float(deployment))
        for spec in specs:
            holder = f"h{deployment}-{spec.alloc_index}"
            if spec.alloc_index == deployment % 50:  # Nomad stopped this one mid-rollout
                plan = skip(plan, spec.alloc_id, reason="stopped", now=float(deployment))
            else:
                plan = restart(plan, spec, holder=holder)
        assert plan.status == PlanStatus.COMPLETE
    assert set(plan.members) == {f"alloc-99-{i}" for i in range(50)}
    assert len(plan.encode()) < 64 * 1024, len(plan.encode())


def test_a_replacement_drops_the_settled_member_of_its_index_but_never_one_that_counts() -> None:
    """Dropped: done or skipped, or failed in an earlier generation. Kept: pending, restarting, failed
    in the current generation (it counts against max_failures and the concurrency), and a member the
    registration leaves alone (claimed after the change was seen)."""
    plan = register(fresh(concurrency=4, max_failures=3, count=6), [A, B, C, D], now=100.0)
    plan = restart(plan, A, holder="ha")
    plan = take(plan, B, holder="hb")
    plan = restart(plan, C, ok=False, holder="hc")
    seen = mark()
    plan = restart(plan, D, holder="hd")  # claimed after ``seen``
    replacements = [MemberSpec(f"{s.alloc_id}-new", s.node, s.alloc_index) for s in (A, B, C, D)]
    after = register(plan, replacements, now=110.0, seen_index=seen)
    assert set(after.members) == {B.alloc_id, C.alloc_id, D.alloc_id} | {s.alloc_id for s in replacements}
    assert after.members[C.alloc_id] == plan.members[C.alloc_id] and after.failures() == 1
    assert set(down(after)) == {B.alloc_id, C.alloc_id}

    # Once C's generation is over (a new change), its failed member no longer counts and is dropped.
    later = register(after, [D], now=120.0)
    later = register(later, [MemberSpec("alloc-c-newer", C.node, C.alloc_index)], now=121.0)
    assert later.generation > plan.generation and C.alloc_id not in later.members
    assert "alloc-c-new" in later.members, "a pending member is never dropped"
