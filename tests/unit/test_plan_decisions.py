"""The decisions of shepard_lib.plan, one rule per test, each with the values it must produce.

Written against the survivors of ``scripts/mutation plan`` (docs/testing.md, "Mutation testing"):
every test here fails when one line that decides a registration, a claim, a reclaim, a finish, a
skip, a give-back, a recovery, a resume, an abort, the plan's status or what a corrupt value is, is
changed. The store's write loop (its retries, lost answers and the ops sent with the plan) is
pinned by tests/unit/test_plan_store.py.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from shepard_lib.cancel import CancelEvent
from shepard_lib.clock import Clock
from shepard_lib.errors import Cancelled, ConsulError, PlanError
from shepard_lib.model import Job, KVEntry, TaskGroup, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import (
    ConcurrencyFull,
    Member,
    MemberSpec,
    MemberState,
    MemberUnavailable,
    Plan,
    PlanFormatError,
    PlanSettings,
    PlanStatus,
    PlanStore,
    _KnownPlans,
    abort,
    claim,
    finish,
    new_plan,
    reclaim,
    recover,
    register,
    require,
    resolve_settings,
    resume,
    skip,
    unclaim,
)

A, B, C, D = (MemberSpec(f"alloc-{x}", f"node-{i}", i) for i, x in enumerate("abcd"))
KEY = "shepard/locks/web/app/server/task_lock"


def fresh(concurrency: int = 2, max_failures: int = 0, **options: Any) -> Plan:
    return new_plan(
        "web",
        "app",
        "server",
        None,
        instance_count=4,
        settings=PlanSettings(concurrency, max_failures),
        now=100.0,
        **options,
    )


def claimed(plan: Plan, spec: MemberSpec, *, index: int, holder: str = "h1") -> Plan:
    """``spec`` restarting, held by ``holder``, claimed at plan index ``index`` (at time 101)."""
    return claim(
        plan,
        spec.alloc_id,
        holder=holder,
        session=f"session-{holder}",
        holder_name=f"worker {holder}",
        restarts_before=2,
        started_before=50.0,
        now=101.0,
        index=index,
    )


def restarted(plan: Plan, spec: MemberSpec, *, index: int, ok: bool = True, holder: str = "h1") -> Plan:
    """``spec`` claimed at ``index`` and finished at ``index + 1``; failed with "boom" unless ``ok``."""
    plan = claimed(plan, spec, index=index, holder=holder)
    return finish(
        plan, spec.alloc_id, holder=holder, ok=ok, now=102.0, index=index + 1, error=None if ok else "boom"
    )


def bare(
    spec: MemberSpec, state: MemberState, generation: int, at: float, error: str | None = None
) -> Member:
    """A member with no claim: what a member back to pending (or skipped) must look like exactly."""
    return Member(state, spec.node, spec.alloc_index, generation, updated_at=at, error=error)


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    """The ``(alloc_id, reason)`` of the MemberUnavailable that ``call`` raises."""
    with pytest.raises(MemberUnavailable) as refused:
        call()
    return refused.value.alloc_id, refused.value.reason


# --- register ---------------------------------------------------------------------------------


def test_a_member_claimed_at_the_index_the_change_was_seen_at_is_not_restarted_again() -> None:
    plan = restarted(register(fresh(), [A, B], now=100.0, index=1), A, index=5)
    assert register(plan, [A], now=110.0, index=7, seen_index=5) is plan
    assert register(plan, [A], now=110.0, index=7, seen_index=6).members[A.alloc_id].generation == 2


def test_a_halted_plan_reopens_only_for_a_change_seen_after_the_halting_write() -> None:
    plan = restarted(register(fresh(max_failures=0), [A, B], now=100.0, index=1), A, ok=False, index=3)
    assert (plan.status, plan.halt_index) == (PlanStatus.FAILED, 4)
    reason = plan.halt_reason
    late = register(plan, [C], now=110.0, index=6, seen_index=4)
    assert (late.status, late.generation, late.halt_reason, late.halt_index) == (
        PlanStatus.FAILED,
        1,
        reason,
        4,
    )
    assert late.members[C.alloc_id] == bare(C, MemberState.PENDING, 1, 110.0)
    reopened = register(plan, [C], now=111.0, index=6, seen_index=5)
    assert (reopened.status, reopened.generation, reopened.halt_reason, reopened.halt_index) == (
        PlanStatus.PLANNED,
        2,
        None,
        None,
    )


def test_a_late_registration_does_not_undo_an_operators_abort() -> None:
    plan = abort(register(fresh(), [A, B], now=100.0, index=1), reason="stop", now=103.0, index=5)
    late = register(plan, [C], now=104.0, index=6, seen_index=4)
    assert (late.status, late.halt_reason, late.halt_index, late.generation) == (
        PlanStatus.ABORTED,
        "stop",
        5,
        1,
    )
    assert late.members[C.alloc_id].state == MemberState.PENDING


def test_registering_a_member_already_covered_leaves_a_complete_plan_untouched() -> None:
    plan = restarted(register(fresh(), [A], now=100.0, index=1), A, index=2)
    assert plan.status == PlanStatus.COMPLETE
    assert register(plan, [A], now=110.0, index=4, seen_index=2) is plan


def test_a_complete_plan_takes_the_new_settings_size_and_method_with_a_new_member() -> None:
    plan = restarted(register(fresh(), [A], now=100.0, index=1), A, index=2)
    grown = register(
        plan,
        [B],
        now=110.0,
        index=5,
        settings=PlanSettings(3, 2),
        instance_count=5,
        method="consul_key",
        health_source="consul",
    )
    assert (grown.status, grown.generation, grown.updated_at) == (PlanStatus.PLANNED, 1, 110.0)
    assert (grown.concurrent_lock_count, grown.max_failures, grown.instance_count) == (3, 2, 5)
    assert (grown.method, grown.health_source) == ("consul_key", "consul")


def test_a_new_change_with_nothing_restarting_takes_the_new_settings_of_a_planned_plan() -> None:
    plan = restarted(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    assert plan.status == PlanStatus.PLANNED
    changed = register(
        plan, [A], now=110.0, index=5, settings=PlanSettings(3, 2), method="nomad_api", health_source="nomad"
    )
    assert changed.generation == 2
    assert (changed.concurrent_lock_count, changed.max_failures) == (3, 2)
    assert (changed.method, changed.health_source) == ("nomad_api", "nomad")


def test_a_registration_that_names_no_method_keeps_the_plans_method() -> None:
    plan = fresh(method="nomad_api", health_source="nomad")
    plan = restarted(register(plan, [A], now=100.0, index=1), A, index=2)
    grown = register(plan, [B], now=110.0, index=5)
    assert (grown.method, grown.health_source) == ("nomad_api", "nomad")


def test_live_allocations_keep_their_settled_members_and_pending_members_are_never_dropped() -> None:
    plan = register(fresh(), [A, B, C], now=100.0, index=1)
    plan = restarted(restarted(plan, A, index=2), C, index=4)
    plan = register(plan, [D], now=110.0, index=10, live=[A.alloc_id, D.alloc_id])
    assert {a: m.state for a, m in plan.members.items()} == {
        A.alloc_id: MemberState.DONE,
        B.alloc_id: MemberState.PENDING,
        D.alloc_id: MemberState.PENDING,
    }


def test_join_on_a_complete_plan_opens_a_new_generation() -> None:
    plan = restarted(restarted(register(fresh(), [A, B], now=100.0, index=1), A, index=2), B, index=4)
    assert plan.status == PlanStatus.COMPLETE
    joined = register(plan, [A, B], now=110.0, index=10, join=True)
    assert (joined.status, joined.generation) == (PlanStatus.PLANNED, 2)
    assert {m.generation for m in joined.members.values()} == {2}


def test_a_new_change_stamps_and_moves_every_member_it_touches() -> None:
    plan = register(fresh(concurrency=3), [A, B, C], now=100.0, index=1)
    plan = claimed(restarted(plan, A, index=2), B, index=4, holder="h2")
    changed = register(plan, [A, B], now=110.0, index=20)
    assert (changed.generation, changed.updated_at) == (2, 110.0)
    assert changed.members[A.alloc_id] == bare(A, MemberState.PENDING, 2, 110.0)
    rerun = changed.members[B.alloc_id]
    assert (rerun.state, rerun.rerun, rerun.holder, rerun.updated_at) == (
        MemberState.RESTARTING,
        True,
        "h2",
        110.0,
    )
    assert changed.members[C.alloc_id] == bare(C, MemberState.PENDING, 2, 110.0)


def test_a_failed_member_registered_again_is_pending_without_its_error_or_recovery() -> None:
    plan = restarted(register(fresh(max_failures=1), [A, B], now=100.0, index=1), A, ok=False, index=2)
    plan = recover(plan, A.alloc_id, now=105.0)
    assert (plan.members[A.alloc_id].error, plan.members[A.alloc_id].recovered) == ("boom", True)
    again = register(plan, [A], now=110.0, index=10)
    assert again.members[A.alloc_id] == bare(A, MemberState.PENDING, 2, 110.0)


def test_a_pending_member_left_in_an_older_generation_joins_the_current_one() -> None:
    """A value written by hand or by an older Shepard: registering the member moves it on."""
    plan = register(fresh(), [A, B], now=100.0, index=1)
    plan = replace(
        plan, generation=3, members={**plan.members, A.alloc_id: bare(A, MemberState.PENDING, 1, 100.0)}
    )
    moved = register(plan, [A], now=110.0, index=10)
    assert moved.generation == 3
    assert moved.members[A.alloc_id] == bare(A, MemberState.PENDING, 3, 110.0)


def test_a_registration_that_halts_the_plan_records_its_own_index() -> None:
    """Settings from job meta lowered max_failures below the failures the generation already has."""
    plan = register(fresh(max_failures=1), [A, B], now=100.0, index=1)
    plan = restarted(restarted(plan, A, ok=False, index=2), B, index=4)
    assert (plan.status, plan.failures()) == (PlanStatus.COMPLETE, 1)
    halted = register(plan, [C], now=110.0, index=10, settings=PlanSettings(2, 0))
    assert (halted.status, halted.max_failures, halted.halt_index) == (PlanStatus.FAILED, 0, 10)


def test_a_registration_applied_at_an_unknown_index_halts_at_index_zero() -> None:
    plan = register(fresh(max_failures=1), [A, B], now=100.0, index=1)
    plan = restarted(restarted(plan, A, ok=False, index=2), B, index=4)
    assert register(plan, [C], now=110.0, settings=PlanSettings(2, 0)).halt_index == 0


# --- claim and reclaim ------------------------------------------------------------------------


def test_a_claim_records_its_holder_baseline_and_index_and_starts_a_clean_restart() -> None:
    """Whatever a pending member carried (an error from a give-back; ``rerun`` or ``recovered`` in a
    value written by hand or by an older Shepard), the claim starts a plain restart."""
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    plan = unclaim(plan, A.alloc_id, holder="h1", now=102.0, index=3, error="slot lost before the trigger")
    carried = replace(plan.members[A.alloc_id], rerun=True, recovered=True)
    plan = replace(plan, members={**plan.members, A.alloc_id: carried})
    taken = claimed(plan, A, index=7, holder="h2")
    assert taken.members[A.alloc_id] == Member(
        MemberState.RESTARTING,
        A.node,
        A.alloc_index,
        1,
        updated_at=101.0,
        holder="h2",
        session="session-h2",
        holder_name="worker h2",
        restarts_before=2,
        started_before=50.0,
        claim_index=7,
    )
    assert taken.updated_at == 101.0
    assert taken.members[B.alloc_id] == plan.members[B.alloc_id]


def test_a_claim_applied_at_an_unknown_index_records_index_zero() -> None:
    """``PlanStore.update`` passes no index: a claim at 0 covers no change seen (it is restarted again)."""
    plan = register(fresh(), [A], now=100.0, index=1)
    taken = claim(
        plan,
        A.alloc_id,
        holder="h1",
        session="session-h1",
        holder_name="worker h1",
        restarts_before=0,
        started_before=None,
        now=101.0,
    )
    assert taken.members[A.alloc_id].claim_index == 0


def test_a_claim_on_a_halted_plan_is_refused_naming_the_plan_and_why() -> None:
    plan = abort(register(fresh(), [A, B], now=100.0, index=1), reason="operator", now=101.0, index=2)
    assert refusal(lambda: claimed(plan, A, index=3)) == (
        A.alloc_id,
        "plan web/app/server is aborted: operator",
    )


def test_a_claim_retried_by_its_own_holder_after_the_plan_halted_changes_nothing() -> None:
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    plan = abort(plan, reason="operator", now=103.0, index=3)
    assert claimed(plan, A, index=4) is plan


def test_a_claim_of_a_member_not_pending_is_refused_saying_where_it_stands() -> None:
    plan = restarted(register(fresh(concurrency=3), [A, B, C], now=100.0, index=1), A, index=2)
    assert refusal(lambda: claimed(plan, A, index=4, holder="h2")) == (A.alloc_id, "done in generation 1")
    plan = claimed(plan, B, index=5, holder="h2")
    assert refusal(lambda: claimed(plan, B, index=6, holder="h3")) == (
        B.alloc_id,
        "restarting, held by worker h2",
    )


def test_a_claim_is_refused_while_the_concurrency_is_down_and_allowed_one_below() -> None:
    plan = register(fresh(concurrency=2, max_failures=1), [A, B, C], now=100.0, index=1)
    plan = restarted(plan, A, ok=False, index=2)  # failed, its task still down: it counts
    plan = claimed(plan, B, index=4, holder="h2")
    with pytest.raises(ConcurrencyFull) as full:
        claimed(plan, C, index=5, holder="h3")
    assert (full.value.alloc_id, full.value.reason) == (
        C.alloc_id,
        "2 member(s) restarting or failed, the concurrency of plan web/app/server",
    )
    plan = recover(plan, A.alloc_id, now=106.0)
    assert claimed(plan, C, index=6, holder="h3").members[C.alloc_id].holder == "h3"


def taking_over(plan: Plan, spec: MemberSpec, *, dead_holder: str | None, holder: str = "h2") -> Plan:
    """``holder`` reclaims ``spec`` from ``dead_holder`` at time 120."""
    return reclaim(
        plan,
        spec.alloc_id,
        dead_holder=dead_holder,
        holder=holder,
        session=f"session-{holder}",
        holder_name=f"worker {holder}",
        now=120.0,
    )


def test_a_reclaim_takes_over_the_claim_and_keeps_its_baseline_and_index() -> None:
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    taken = taking_over(plan, A, dead_holder="h1")
    assert taken.members[A.alloc_id] == replace(
        plan.members[A.alloc_id],
        holder="h2",
        session="session-h2",
        holder_name="worker h2",
        updated_at=120.0,
    )
    assert taken.updated_at == 120.0
    assert taken.members[B.alloc_id] == plan.members[B.alloc_id]


def test_a_reclaim_retried_after_it_applied_changes_nothing() -> None:
    """The retry of a reclaim whose answer was lost finds its own claim: idempotent."""
    plan = taking_over(claimed(register(fresh(), [A], now=100.0, index=1), A, index=2), A, dead_holder="h1")
    assert taking_over(plan, A, dead_holder="h1") is plan


def test_a_reclaim_applies_only_while_the_member_is_still_the_dead_claim() -> None:
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    assert refusal(lambda: taking_over(plan, A, dead_holder="h0")) == (
        A.alloc_id,
        "restarting, held by worker h1",
    )
    assert refusal(lambda: taking_over(plan, B, dead_holder=None)) == (B.alloc_id, "pending in generation 1")
    finished = finish(taking_over(plan, A, dead_holder="h1"), A.alloc_id, holder="h2", ok=True, now=121.0)
    assert refusal(lambda: taking_over(finished, A, dead_holder="h1")) == (A.alloc_id, "done in generation 1")


# --- finish -----------------------------------------------------------------------------------


def test_finishing_a_member_someone_else_finished_is_refused() -> None:
    plan = restarted(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    assert refusal(lambda: finish(plan, A.alloc_id, holder="h2", ok=True, now=103.0, index=9)) == (
        A.alloc_id,
        "done in generation 1",
    )


def test_a_rerun_member_goes_back_to_pending_with_its_error_only_when_it_failed() -> None:
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    plan = register(plan, [A], now=103.0, index=3)
    failed = finish(plan, A.alloc_id, holder="h1", ok=False, now=106.0, index=4, error="boom")
    assert failed.members[A.alloc_id] == bare(A, MemberState.PENDING, 2, 106.0, error="boom")
    ok = finish(plan, A.alloc_id, holder="h1", ok=True, now=106.0, index=4, error="ignored")
    assert ok.members[A.alloc_id] == bare(A, MemberState.PENDING, 2, 106.0)


def test_finish_stamps_the_member_and_the_plan_and_a_success_carries_no_error() -> None:
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    done = finish(plan, A.alloc_id, holder="h1", ok=True, now=103.0, index=3, error="ignored")
    member = done.members[A.alloc_id]
    assert (member.state, member.error, member.updated_at, done.updated_at) == (
        MemberState.DONE,
        None,
        103.0,
        103.0,
    )


def test_a_finish_applied_at_an_unknown_index_halts_at_index_zero() -> None:
    plan = claimed(register(fresh(max_failures=0), [A, B], now=100.0, index=1), A, index=2)
    halted = finish(plan, A.alloc_id, holder="h1", ok=False, now=103.0, error="boom")
    assert (halted.status, halted.halt_index) == (PlanStatus.FAILED, 0)


# --- skip -------------------------------------------------------------------------------------


def test_a_restarting_member_is_skipped_only_by_its_own_holder() -> None:
    plan = claimed(register(fresh(), [A], now=100.0, index=1), A, index=2)
    expected = (A.alloc_id, "restarting, held by worker h1")
    assert (
        refusal(lambda: skip(plan, A.alloc_id, reason="stopped", now=103.0, index=3, holder="h2")) == expected
    )
    assert refusal(lambda: skip(plan, A.alloc_id, reason="stopped", now=103.0, index=3)) == expected
    skipped = skip(plan, A.alloc_id, reason="stopped", now=104.0, index=3, holder="h1")
    assert skipped.members[A.alloc_id] == bare(A, MemberState.SKIPPED, 1, 104.0, error="stopped")


def test_a_finished_member_cannot_be_skipped() -> None:
    plan = restarted(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    assert refusal(lambda: skip(plan, A.alloc_id, reason="stopped", now=105.0, index=6)) == (
        A.alloc_id,
        "done in generation 1",
    )


def test_skip_records_why_and_when_on_the_member_and_the_plan() -> None:
    plan = register(fresh(), [A, B], now=100.0, index=1)
    skipped = skip(plan, A.alloc_id, reason="replaced by a new allocation", now=105.0, index=2)
    assert skipped.members[A.alloc_id] == bare(
        A, MemberState.SKIPPED, 1, 105.0, error="replaced by a new allocation"
    )
    assert (skipped.updated_at, skipped.status) == (105.0, PlanStatus.PLANNED)


# --- unclaim ----------------------------------------------------------------------------------


def test_a_member_is_given_back_only_by_its_holder() -> None:
    plan = claimed(register(fresh(), [A], now=100.0, index=1), A, index=2)
    assert refusal(lambda: unclaim(plan, A.alloc_id, holder="h2", now=103.0, index=3)) == (
        A.alloc_id,
        "restarting, held by worker h1",
    )


def test_a_finished_member_cannot_be_given_back() -> None:
    plan = restarted(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    assert refusal(lambda: unclaim(plan, A.alloc_id, holder="h1", now=103.0, index=5)) == (
        A.alloc_id,
        "done in generation 1",
    )


def test_a_member_given_back_is_pending_in_the_current_generation_with_the_reason() -> None:
    plan = claimed(register(fresh(), [A, B], now=100.0, index=1), A, index=2)
    plan = register(plan, [A], now=103.0, index=3)  # a new change while A restarts: generation 2
    back = unclaim(plan, A.alloc_id, holder="h1", now=104.0, index=4, error="slot lost before the trigger")
    assert back.members[A.alloc_id] == bare(
        A, MemberState.PENDING, 2, 104.0, error="slot lost before the trigger"
    )
    assert back.updated_at == 104.0


# --- recover ----------------------------------------------------------------------------------


def test_only_a_failed_member_not_yet_recovered_is_recovered() -> None:
    plan = restarted(register(fresh(max_failures=1), [A, B, C], now=100.0, index=1), A, index=2)
    assert recover(plan, A.alloc_id, now=110.0) is plan  # done: nothing to recover
    plan = restarted(plan, B, ok=False, index=4)
    once = recover(plan, B.alloc_id, now=110.0)
    assert recover(once, B.alloc_id, now=111.0) is once


def test_recover_stamps_the_member_and_the_plan() -> None:
    plan = restarted(register(fresh(max_failures=1), [A, B], now=100.0, index=1), A, ok=False, index=2)
    recovered = recover(plan, A.alloc_id, now=120.0)
    member = recovered.members[A.alloc_id]
    assert (member.state, member.recovered, member.updated_at, recovered.updated_at) == (
        MemberState.FAILED,
        True,
        120.0,
        120.0,
    )


# --- resume and abort -------------------------------------------------------------------------


def test_resume_makes_pending_only_the_failures_of_the_current_generation() -> None:
    plan = register(fresh(max_failures=0), [A, B, C], now=100.0, index=1)
    plan = restarted(plan, C, ok=False, index=2)  # generation 1 fails
    plan = register(plan, [A], now=105.0, index=10)  # a change seen after the halt: generation 2
    plan = restarted(restarted(plan, B, index=11), A, ok=False, index=13)  # B done, A fails
    assert (plan.status, plan.generation) == (PlanStatus.FAILED, 2)
    resumed = resume(plan, now=130.0)
    assert (resumed.status, resumed.halt_reason, resumed.halt_index, resumed.updated_at) == (
        PlanStatus.PLANNED,
        None,
        None,
        130.0,
    )
    assert resumed.members[A.alloc_id] == bare(A, MemberState.PENDING, 2, 130.0)
    assert resumed.members[B.alloc_id] == plan.members[B.alloc_id]
    assert resumed.members[C.alloc_id] == plan.members[C.alloc_id]


def test_abort_records_the_index_and_time_it_was_applied_at() -> None:
    plan = register(fresh(), [A], now=100.0, index=1)
    aborted = abort(plan, reason="operator", now=105.0, index=9)
    assert (aborted.status, aborted.halt_reason, aborted.halt_index, aborted.updated_at) == (
        PlanStatus.ABORTED,
        "operator",
        9,
        105.0,
    )


def test_an_abort_applied_at_an_unknown_index_records_index_zero() -> None:
    """``shepard restart --abort`` aborts through PlanStore.update, which passes no index."""
    plan = register(fresh(), [A], now=100.0, index=1)
    assert abort(plan, reason="operator", now=105.0).halt_index == 0


# --- the status after a change ----------------------------------------------------------------


def test_settling_plans_again_a_complete_plan_that_has_a_pending_member() -> None:
    """A value written by hand or by an older Shepard: the status follows the members."""
    plan = replace(register(fresh(), [A, B], now=100.0, index=1), status=PlanStatus.COMPLETE)
    settled = skip(plan, B.alloc_id, reason="stopped", now=101.0, index=2)
    assert settled.status == PlanStatus.PLANNED
    assert settled.members[A.alloc_id].state == MemberState.PENDING


def test_require_refuses_a_plan_that_disappeared_naming_its_key() -> None:
    with pytest.raises(PlanError) as gone:
        require(None, KEY)
    assert str(gone.value) == f"plan {KEY} disappeared (deleted, or replaced after it became unreadable)"
    plan = fresh()
    assert require(plan, KEY) is plan


def test_a_member_not_in_the_plan_is_refused_naming_it() -> None:
    assert refusal(lambda: recover(fresh(), "alloc-z", now=1.0)) == (
        "alloc-z",
        "not a member of plan web/app/server",
    )


# --- settings ---------------------------------------------------------------------------------


def job(job_meta: dict[str, str], group_meta: dict[str, str] | None = None) -> Job:
    group = TaskGroup(name="app", count=3, meta=group_meta or {})
    return Job(id="web", name="web", namespace="default", status="running", meta=job_meta, groups=(group,))


def test_meta_may_set_the_smallest_concurrency_and_max_failures() -> None:
    smallest = job({"shepard_concurrency": "1", "shepard_max_failures": "0"})
    assert resolve_settings(smallest, "app", concurrency=3, max_failures=3) == PlanSettings(1, 0)


def test_settings_of_a_group_the_job_does_not_have_come_from_the_job_meta() -> None:
    assert resolve_settings(
        job({"shepard_concurrency": "4"}), "other", concurrency=1, max_failures=2
    ) == PlanSettings(4, 2)


def test_settings_out_of_range_are_refused_saying_which() -> None:
    with pytest.raises(ValueError, match=r"^concurrency must be >= 1, got 0$"):
        PlanSettings(0, 0)
    with pytest.raises(ValueError, match=r"^max_failures must be >= 0, got -1$"):
        PlanSettings(1, -1)


def test_a_new_plan_is_planned_at_generation_one_with_what_it_was_given() -> None:
    plan = new_plan(
        "web",
        "app",
        "server",
        "node-7",
        instance_count=3,
        settings=PlanSettings(2, 1),
        now=100.0,
        method="consul_key",
        health_source="both",
    )
    assert plan == Plan(
        job="web",
        group="app",
        task="server",
        node="node-7",
        status=PlanStatus.PLANNED,
        generation=1,
        instance_count=3,
        concurrent_lock_count=2,
        max_failures=1,
        created_at=100.0,
        updated_at=100.0,
        method="consul_key",
        health_source="both",
    )


# --- the wire format: a corrupt value is refused --------------------------------------------


def full_plan() -> Plan:
    """A node-scoped plan whose every optional field is set, on a plan and on its members."""
    plan = fresh(max_failures=1, method="consul_key", health_source="consul")
    plan = replace(plan, node="node-7")
    plan = register(plan, [A, B, C], now=100.0, index=1)
    plan = recover(restarted(plan, A, ok=False, index=2), A.alloc_id, now=103.0)
    plan = register(claimed(plan, B, index=4, holder="h2"), [B], now=104.0, index=5)  # B rerun
    return abort(plan, reason="why not", now=105.0, index=6)


def test_every_field_of_a_plan_survives_the_wire() -> None:
    plan = full_plan()
    assert Plan.decode(plan.encode()) == plan
    data = json.loads(plan.encode())
    assert (data["node"], data["method"], data["health_source"]) == ("node-7", "consul_key", "consul")
    assert (data["members"][A.alloc_id]["recovered"], data["members"][A.alloc_id]["error"]) == (True, "boom")
    assert data["members"][B.alloc_id]["rerun"] is True


def test_the_stored_plan_is_compact_json_with_sorted_keys() -> None:
    raw = full_plan().encode()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode("utf-8")
    assert list(json.loads(raw)) == sorted(json.loads(raw))


def test_optional_member_fields_may_be_absent() -> None:
    data = json.loads(register(fresh(), [A], now=100.0, index=1).encode())
    data["members"][A.alloc_id] = {
        "state": "pending",
        "node": "node-0",
        "alloc_index": 0,
        "generation": 1,
        "updated_at": 5,
    }
    member = Plan.decode(json.dumps(data).encode()).members[A.alloc_id]
    assert member == bare(A, MemberState.PENDING, 1, 5.0)
    assert (member.rerun, member.recovered, member.error) == (False, False, None)


def test_a_plan_of_concurrency_one_that_tolerates_no_failure_is_read_back() -> None:
    plan = register(fresh(concurrency=1, max_failures=0), [A], now=100.0, index=1)
    assert Plan.decode(plan.encode()) == plan


def corrupted(**fields: Any) -> bytes:
    data = json.loads(register(fresh(), [A], now=100.0, index=1).encode())
    for name, value in fields.items():
        if name.startswith("member_"):
            data["members"][A.alloc_id][name.removeprefix("member_")] = value
        else:
            data[name] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty value"),
        (b'{"status": "planned"}', 'not a Shepard plan (no "kind": "shepard.plan")'),
        (corrupted(members=[]), "malformed plan (TypeError: members is not an object)"),
        (corrupted(generation=True), "malformed plan (TypeError: expected an integer, got bool)"),
        (corrupted(generation="2"), "malformed plan (TypeError: expected an integer, got str)"),
        (corrupted(updated_at=False), "malformed plan (TypeError: expected a number, got bool)"),
        (corrupted(updated_at="100.0"), "malformed plan (TypeError: expected a number, got str)"),
        (corrupted(job=7), "malformed plan (TypeError: expected a string, got int)"),
        (corrupted(concurrent_lock_count=0), "malformed plan (ValueError: expected an integer >= 1, got 0)"),
        (corrupted(max_failures=-1), "malformed plan (ValueError: expected an integer >= 0, got -1)"),
        (corrupted(member_alloc_index=True), "malformed plan (TypeError: expected an integer, got bool)"),
        (corrupted(member_updated_at="1"), "malformed plan (TypeError: expected a number, got str)"),
    ],
)
def test_a_corrupt_value_is_refused_saying_exactly_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(PlanFormatError) as refused:
        Plan.decode(raw)
    assert str(refused.value) == message


# --- the store: what it reads and what it knows -----------------------------------------------


class RecordingKV:
    """The slice of ConsulAPI that PlanStore uses, recording what it is asked."""

    def __init__(self) -> None:
        self.entries: dict[str, KVEntry] = {}
        self.index = 10
        self.gets: list[bool] = []  # the ``consistent`` flag of each read
        self.txns = 0
        self.watches: list[tuple[str, int, float]] = []

    def write(self, key: str, value: bytes) -> None:
        """Another writer's change."""
        self.index += 1
        self.entries[key] = KVEntry(key, value, self.index, self.index)

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        self.gets.append(consistent)
        return self.entries.get(key)

    def txn(self, ops: list[TxnOp]) -> TxnResult:
        [op] = ops
        assert op.verb == TxnVerb.CAS and op.value is not None and op.index is not None
        self.txns += 1
        current = self.entries.get(op.key)
        if (current.modify_index if current else 0) != op.index:
            return TxnResult(ok=False, errors=((0, f'failed index check for key "{op.key}"'),))
        self.write(op.key, op.value)
        return TxnResult(ok=True, results=(KVEntry(op.key, None, self.index, self.index),))

    def watch(
        self, key: str, index: int, wait: float, *, recurse: bool = False, cancel: CancelEvent | None = None
    ) -> tuple[int, list[KVEntry]]:
        """Answers at once, unless ``cancel`` is set: then the query ends with Cancelled, as Consul's does."""
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"watch of {key} cancelled")
        self.watches.append((key, index, wait))
        entry = self.entries.get(key)
        return self.index, [entry] if entry else []


def store(kv: RecordingKV) -> PlanStore:
    return PlanStore(kv, clock=Clock(scale=10_000))  # type: ignore[arg-type]


def adding(spec: MemberSpec) -> Callable[[Plan | None], Plan]:
    """A registration of ``spec``, creating the plan when there is none (as the coordinator does)."""
    return lambda plan: register(plan or fresh(), [spec], now=100.0)


def test_a_plan_is_read_consistently_with_its_index() -> None:
    kv = RecordingKV()
    plans = store(kv)
    assert (plans.read(KEY), plans.load(KEY)) == ((None, 0), None)
    written = register(fresh(), [A], now=100.0)
    kv.write(KEY, written.encode())
    assert plans.read(KEY) == (written, 11)
    assert plans.load(KEY) == written
    assert kv.gets == [True, True, True, True]


def test_an_update_after_a_read_builds_on_the_plan_read_without_reading_again() -> None:
    kv = RecordingKV()
    kv.write(KEY, register(fresh(), [A], now=100.0).encode())
    plans = store(kv)
    plans.read(KEY)
    updated = plans.update(KEY, adding(B))
    assert set(updated.members) == {A.alloc_id, B.alloc_id}
    assert (len(kv.gets), kv.txns) == (1, 1)


def test_a_read_that_finds_the_plan_deleted_is_what_the_next_update_starts_from() -> None:
    kv = RecordingKV()
    plans = store(kv)
    plans.update(KEY, adding(A))
    del kv.entries[KEY]  # an operator deleted the plan
    assert plans.read(KEY) == (None, 0)
    gets, txns = len(kv.gets), kv.txns
    plan = plans.update(KEY, adding(B))
    assert list(plan.members) == [B.alloc_id]
    assert (len(kv.gets), kv.txns) == (gets, txns + 1), "one write with cas=0, no read, no refused write"


def test_a_watched_change_is_what_the_next_update_builds_on() -> None:
    kv = RecordingKV()
    plans = store(kv)
    plans.update(KEY, adding(A))
    seen = kv.index
    kv.write(KEY, register(Plan.decode(kv.entries[KEY].value), [B], now=101.0).encode())  # another writer
    assert plans.watch(KEY, seen, 5.0) == kv.index
    assert kv.watches == [(KEY, seen, 5.0)]
    gets, txns = len(kv.gets), kv.txns
    plan = plans.update(KEY, adding(C))
    assert set(plan.members) == {A.alloc_id, B.alloc_id, C.alloc_id}
    assert (len(kv.gets), kv.txns) == (gets, txns + 1), "one write, no read, no refused write"


def test_a_watch_that_finds_the_plan_deleted_makes_the_next_update_read_first() -> None:
    kv = RecordingKV()
    plans = store(kv)
    plans.update(KEY, adding(A))
    del kv.entries[KEY]
    assert plans.watch(KEY, kv.index, 5.0) == kv.index
    gets, txns = len(kv.gets), kv.txns
    plan = plans.update(KEY, adding(B))
    assert list(plan.members) == [B.alloc_id]
    assert (len(kv.gets), kv.txns) == (gets + 1, txns + 1), "one read, one write with cas=0"


def test_watching_a_plan_that_never_existed_answers_the_index() -> None:
    kv = RecordingKV()
    assert store(kv).watch(KEY, 3, 1.0) == 10


def test_a_plan_watch_ends_when_its_cancel_is_set() -> None:
    kv = RecordingKV()
    stopping = CancelEvent()
    stopping.set()
    with pytest.raises(Cancelled):
        store(kv).watch(KEY, 10, 300.0, cancel=stopping)
    assert kv.watches == []


def test_the_known_plan_costs_no_request_and_is_read_when_nothing_is_known() -> None:
    kv = RecordingKV()
    kv.write(KEY, register(fresh(), [A], now=100.0).encode())
    plans = store(kv)
    first = plans.known(KEY)
    assert kv.gets == [True], "nothing known: one consistent read"
    assert first == plans.read(KEY)
    written = plans.update(KEY, adding(B))
    assert plans.known(KEY) == (written, 12)
    assert len(kv.gets) == 2, "the plan written is known: no read"


def test_known_plans_keep_the_newest_answer_unless_a_read_replaces_it() -> None:
    known = _KnownPlans()
    old, new = fresh(), register(fresh(), [A], now=100.0)
    known.put(KEY, new, 20)
    known.put(KEY, old, 10)  # a late answer about an older index
    assert known.get(KEY) == (new, 20)
    known.put(KEY, old, 30)
    assert known.get(KEY) == (old, 30)
    sent = PlanStore.mark()
    since = PlanStore.mark()
    known.put(KEY, None, 0, read_mark=sent)  # a read: the key is gone
    assert known.get(KEY) == (None, 0)
    assert not known.read_since(KEY, since), "sent before the mark: it concludes nothing after it"
    assert known.read_since(KEY, sent - 1)
    known.put(KEY, new, 40)
    assert not known.read_since(KEY, sent - 1), "a write replaced what the read showed"
    known.forget(KEY)
    known.forget(KEY)
    assert known.get(KEY) is None


def test_writers_of_one_key_share_a_lock_and_writers_of_another_do_not() -> None:
    known = _KnownPlans()
    assert known.writing(KEY) is known.writing(KEY)
    assert known.writing(KEY) is not known.writing(KEY + "-other")


class SleepLog(Clock):
    """A clock that records the store's waits instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(scale=10_000)
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class DownKV(RecordingKV):
    """Consul answering every write with a 500 (the write may or may not have applied: it did not)."""

    def txn(self, ops: list[TxnOp]) -> TxnResult:
        self.txns += 1
        raise ConsulError("txn", "Internal Server Error", status=500)


def test_a_store_tries_30_times_waiting_at_most_50_ms_doubled_each_attempt_up_to_3_2_s() -> None:
    kv, clock = DownKV(), SleepLog()
    plans = PlanStore(kv, clock=clock, rng=random.Random(0))  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="giving up after 30 attempts"):
        plans.update(KEY, adding(A))
    assert kv.txns == 30
    assert clock.sleeps, "no wait between the attempts"
    assert all(wait <= 0.05 * 2 ** min(n, 6) for n, wait in enumerate(clock.sleeps)), clock.sleeps


class TopOfRange(random.Random):
    """Jitter that always draws the longest wait allowed, recording each range asked for."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


def test_the_longest_wait_before_attempt_n_is_50_ms_doubled_n_times_up_to_3_2_s() -> None:
    kv, clock, rng = DownKV(), SleepLog(), TopOfRange()
    plans = PlanStore(kv, clock=clock, attempts=9, rng=rng)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="giving up after 9 attempts"):
        plans.update(KEY, adding(A))
    longest = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 3.2, 3.2]
    assert clock.sleeps == pytest.approx(longest)
    assert [low for low, _ in rng.ranges] == [0] * 9


def test_a_refused_write_on_a_stale_known_plan_is_read_and_tried_again_at_once() -> None:
    kv, clock = RecordingKV(), SleepLog()
    plans = PlanStore(kv, clock=clock)  # type: ignore[arg-type]
    plans.update(KEY, adding(A))
    kv.write(KEY, register(Plan.decode(kv.entries[KEY].value), [B], now=101.0).encode())  # another writer
    plan = plans.update(KEY, adding(C))
    assert set(plan.members) == {A.alloc_id, B.alloc_id, C.alloc_id}
    assert (kv.txns, len(kv.gets), clock.sleeps) == (3, 2, []), "refused, read, written: no wait"


def test_a_write_refused_after_a_fresh_read_waits_before_trying_again() -> None:
    kv, clock = RecordingKV(), SleepLog()
    kv.write(KEY, register(fresh(), [A], now=100.0).encode())  # nothing known in this process
    plans = PlanStore(kv, clock=clock)  # type: ignore[arg-type]
    raced: list[int] = []

    def add_b_racing_once(plan: Plan | None) -> Plan:
        assert plan is not None
        if not raced:  # another writer gets in between our read and our write, once
            raced.append(kv.index)
            kv.write(KEY, register(plan, [C], now=101.0).encode())
        return register(plan, [B], now=102.0)

    plan = plans.update(KEY, add_b_racing_once)
    assert set(plan.members) == {A.alloc_id, B.alloc_id, C.alloc_id}
    assert (kv.txns, len(kv.gets), len(clock.sleeps)) == (2, 2, 1)


def test_the_stored_members_leave_out_unset_fields_and_decode_to_the_same_plan() -> None:
    """Consul's 512 KiB value limit: a 2,000-member plan of the scale benchmark was refused (HTTP 413)
    when every member carried its nulls and falses."""
    specs = [MemberSpec(f"alloc-{n:04d}-{'x' * 27}", f"node-{n % 200}", n) for n in range(2000)]
    plan = register(fresh(concurrency=50), specs, now=2.0, index=1)
    raw = plan.encode()
    stored = json.loads(raw)["members"][specs[0].alloc_id]
    assert stored == {
        "alloc_index": 0,
        "generation": 1,
        "node": "node-0",
        "state": "pending",
        "updated_at": 2.0,
    }
    assert Plan.decode(raw) == plan
    assert len(raw) < 300 * 1024, f"{len(raw)} bytes for 2,000 pending members"


def test_a_done_member_keeps_its_holder_and_claim_index_and_2000_of_them_fit_in_512_kib() -> None:
    """The scale benchmark (200 nodes, 2,000 allocations) stopped after 1,274 restarts: each done member
    kept its claim's session and baseline, and the plan passed Consul's 512 KiB value limit (HTTP 413).
    A done member keeps what is still read: its holder (a finish whose answer was lost recognises its own
    write) and its claim index (a registration of a change it covers opens no generation)."""
    specs = [MemberSpec(str(uuid.UUID(int=n + 1)), f"node-{n % 200}", n) for n in range(2000)]
    plan = register(fresh(concurrency=2000), specs, now=2.0, index=1)
    for n, spec in enumerate(specs):
        holder = uuid.UUID(int=10**6 + n).hex
        plan = claim(
            plan,
            spec.alloc_id,
            holder=holder,
            session=str(uuid.UUID(int=10**7 + n % 200)),
            holder_name=spec.node,
            restarts_before=3,
            started_before=1796061151.4036636 + n,
            now=1796061200.25 + n,
            index=10_000 + n,
        )
        plan = finish(plan, spec.alloc_id, holder=holder, ok=True, now=1796061300.125 + n)
    raw = plan.encode()
    assert plan.status == PlanStatus.COMPLETE
    assert len(raw) < 512 * 1024, f"{len(raw)} bytes for 2,000 done members"
    done = plan.members[specs[7].alloc_id]
    assert (done.state, done.holder, done.claim_index, done.holder_name) == (
        MemberState.DONE,
        uuid.UUID(int=10**6 + 7).hex,
        10_007,
        specs[7].node,
    )
    assert (done.session, done.restarts_before, done.started_before) == (None, None, None)
    assert finish(plan, specs[7].alloc_id, holder=done.holder, ok=True, now=9e9) is plan, "its own finish"
    again = register(plan, [specs[7]], now=9e9, index=20_000, seen_index=10_007)
    assert again.generation == plan.generation, "a change its claim covers opens no generation"


def test_a_failed_member_keeps_its_claim_and_records_when_it_failed() -> None:
    """Unlike a done member, a failed one keeps its session and baseline (it still counts as down)."""
    plan = claimed(register(fresh(max_failures=1), [A], now=100.0, index=1), A, index=5)
    before = plan.members[A.alloc_id]
    failed = finish(plan, A.alloc_id, holder="h1", ok=False, now=250.0, error="unhealthy").members[A.alloc_id]
    assert (failed.state, failed.error, failed.updated_at) == (MemberState.FAILED, "unhealthy", 250.0)
    assert (failed.session, failed.restarts_before, failed.started_before, failed.claim_index) == (
        before.session,
        before.restarts_before,
        before.started_before,
        5,
    )
