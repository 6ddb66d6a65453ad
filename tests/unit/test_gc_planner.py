"""The GC planner (pure) and executor (against a scripted Consul): every rule and safety rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pytest

from shepard_lib.config import LockScope
from shepard_lib.errors import ConsulError
from shepard_lib.gc import Deletion, Rule, SkipReason
from shepard_lib.gc.executor import MAX_TXN_OPS, delete_all
from shepard_lib.gc.planner import (
    GCSettings,
    KeyKind,
    NodeState,
    NomadView,
    PlanFacts,
    ScannedKey,
    classify,
    holder_sessions_to_check,
    plan_cluster_pass,
    plan_node_pass,
)
from shepard_lib.keyspace import Keyspace, TaskRef, TaskScope
from shepard_lib.model import Allocation, JobStub, KVEntry, NodeInfo, TaskState, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import MemberSpec, PlanSettings, PlanStatus, claim, finish, new_plan, register

KS = Keyspace()
NOW = 1_800_000_000.0
HOUR = 3600.0
SETTINGS = GCSettings(node_cleanup_timeout=24 * HOUR, plan_retention=24 * HOUR)
SCOPE = TaskScope("web", "app", "server")


def plan_value(status: str, *, updated_at: float = NOW, job: str = "web", holder: str = "s") -> bytes:
    """An encoded plan: ``planned`` (a member pending), ``restarting`` (one restarting) or ``complete``."""
    plan = new_plan(job, "app", "server", None, instance_count=1, settings=PlanSettings(), now=updated_at)
    plan = register(plan, [MemberSpec("a1", "node-1", 0)], now=updated_at)
    if status in ("restarting", "complete"):
        plan = claim(
            plan,
            "a1",
            holder="h",
            session=holder,
            holder_name="agent",
            restarts_before=0,
            started_before=None,
            now=updated_at,
        )
    if status == "complete":
        plan = finish(plan, "a1", holder="h", ok=True, now=updated_at)
        assert plan.status is PlanStatus.COMPLETE
    return plan.encode()


def entry(key: str, value: bytes = b"v", index: int = 10, session: str | None = None) -> KVEntry:
    return KVEntry(key=key, value=value, create_index=index, modify_index=index, session=session)


def scanned(key: str, value: bytes = b"v", index: int = 10, session: str | None = None) -> ScannedKey:
    return classify(entry(key, value, index, session), KS)


def alloc(
    node: str, job: str, index: int, status: str = "running", tasks: Sequence[str] = ("server",)
) -> Allocation:
    return Allocation(
        id=f"{job}-{node}-{index}",
        name=f"{job}.app[{index}]",
        namespace="default",
        node_id=f"id-{node}",
        node_name=node,
        job_id=job,
        task_group="app",
        client_status=status,
        desired_status="run",
        index=index,
        task_states={t: TaskState("running") for t in tasks},
    )


def view(
    *,
    nodes: dict[str, tuple[str, float]] | None = None,
    jobs: Sequence[JobStub] = (JobStub("web", "web", "default", "running"),),
    allocs: Sequence[Allocation] = (),
) -> NomadView:
    nodes = {"node-1": ("ready", NOW - 10 * HOUR)} if nodes is None else nodes
    records = [NodeInfo(f"id-{n}", n, status, status_updated_at=at) for n, (status, at) in nodes.items()]
    return NomadView.build(NOW, records, jobs, allocs)


def trigger(node: str = "node-1", job: str = "web", index: int = 0, task: str = "server") -> str:
    return KS.trigger_key(TaskRef(node, job, "app", task, index))


def decide(
    keys: Sequence[ScannedKey], v: NomadView, gone_sessions: frozenset[str] = frozenset()
) -> tuple[dict[str, Rule], dict[str, SkipReason]]:
    deletions, skips = plan_cluster_pass(keys, v, SETTINGS, gone_sessions)
    return {d.key: d.rule for d in deletions}, {s.key: s.reason for s in skips}


# --- classification -----------------------------------------------------------------------------


def test_classify_names_every_kind_of_key_and_calls_the_rest_unknown() -> None:
    kinds = {
        trigger(): KeyKind.TRIGGER,
        KS.task_lock_key(SCOPE): KeyKind.PLAN,
        KS.slot_key(SCOPE, 1): KeyKind.SLOT,
        KS.node_key("node-1"): KeyKind.NODE,
        KS.gc_leader_key(): KeyKind.GC_LEADER,
        "shepard/keys/node-1/web/app/server/x": KeyKind.UNKNOWN,
        "shepard/keys/node-1/web": KeyKind.UNKNOWN,
        "shepard/nodes/a/b": KeyKind.UNKNOWN,
        "shepard/locks/web/app/server/other": KeyKind.UNKNOWN,
        "shepard/locks/web/app/server/restart_lock/01": KeyKind.UNKNOWN,
        "shepard/keys/node%41/web/app/server/0": KeyKind.UNKNOWN,  # not a canonical escape
        "shepard/elsewhere": KeyKind.UNKNOWN,
    }
    got = {key: scanned(key, plan_value("planned")).kind for key in kinds}
    assert got == kinds


def test_classify_reverses_escaped_names_with_the_keyspace() -> None:
    key = KS.trigger_key(TaskRef("n,1", "backup/periodic-1700000000", "app", "server", 3))
    assert key == "shepard/keys/n,2C1/backup,2Fperiodic-1700000000/app/server/3"
    assert scanned(key).ref == TaskRef("n,1", "backup/periodic-1700000000", "app", "server", 3)


def test_classify_keeps_the_plan_facts_not_the_value() -> None:
    restarting = scanned(KS.task_lock_key(SCOPE), plan_value("restarting"))
    assert restarting.plan == PlanFacts(
        PlanStatus.PLANNED, restarting=1, updated_at=NOW, holders=frozenset({"s"})
    )
    assert scanned(KS.task_lock_key(SCOPE), b"{not json").plan == PlanFacts(status=None)


def test_node_scoped_lock_keys_parse_with_lock_scope_node() -> None:
    ks = Keyspace(lock_scope=LockScope.NODE)
    key = ks.slot_key(TaskScope("web", "app", "server", "node-1"), 0)
    assert classify(entry(key), ks).scope == TaskScope("web", "app", "server", "node-1")
    assert classify(entry(key), KS).kind is KeyKind.UNKNOWN


def test_node_state_folds_records_that_share_a_name() -> None:
    def fold(*records: tuple[str, float]) -> NodeState:
        return NodeState.of(
            NodeInfo(f"id{i}", "n", s, status_updated_at=t) for i, (s, t) in enumerate(records)
        )

    assert fold(("down", 5.0), ("ready", 0.0)) == NodeState("ready")
    assert fold(("down", 5.0), ("initializing", 0.0)) == NodeState("initializing")
    assert fold(("down", 5.0), ("down", 9.0)) == NodeState("down", 9.0)
    assert fold(("down", 5.0), ("disconnected", 7.0)) == NodeState("disconnected", 7.0)
    assert fold(("down", 0.0)) == NodeState("down", None)


# --- trigger keys ---------------------------------------------------------------------------------


def test_trigger_of_a_live_allocation_stays_and_one_without_goes() -> None:
    keys = [scanned(trigger(index=0)), scanned(trigger(index=1)), scanned(trigger(index=2))]
    allocs = [alloc("node-1", "web", 0), alloc("node-1", "web", 1, status="complete")]
    deleted, skipped = decide(keys, view(allocs=allocs))
    assert deleted == {trigger(index=1): Rule.ALLOC_GONE, trigger(index=2): Rule.ALLOC_GONE}
    assert skipped == {}


@pytest.mark.parametrize("status", ["pending", "running", "unknown"])
def test_every_status_that_may_still_read_the_key_keeps_it(status: str) -> None:
    deleted, _ = decide([scanned(trigger())], view(allocs=[alloc("node-1", "web", 0, status=status)]))
    assert deleted == {}


def test_an_allocation_elsewhere_or_of_another_task_does_not_keep_a_trigger() -> None:
    keys = [scanned(trigger(index=0)), scanned(trigger(index=1, task="sidecar"))]
    allocs = [alloc("node-2", "web", 0), alloc("node-1", "web", 1)]
    nodes = {"node-1": ("ready", 0.0), "node-2": ("ready", 0.0)}
    deleted, _ = decide(keys, view(nodes=nodes, allocs=allocs))
    assert set(deleted) == {trigger(index=0), trigger(index=1, task="sidecar")}


def test_an_allocation_without_task_states_yet_keeps_every_task_key() -> None:
    deleted, _ = decide(
        [scanned(trigger(task="anything"))], view(allocs=[alloc("node-1", "web", 0, tasks=())])
    )
    assert deleted == {}


def test_a_trigger_written_with_the_job_name_is_live_for_its_job_id() -> None:
    jobs = [JobStub("web-prod", "web", "default", "running")]
    deleted, _ = decide(
        [scanned(trigger(job="web"))], view(jobs=jobs, allocs=[alloc("node-1", "web-prod", 0)])
    )
    assert deleted == {}


def test_triggers_of_gone_or_stopped_or_dead_jobs_go_as_job_gone() -> None:
    jobs = [
        JobStub("stopped", "stopped", "default", "running", stop=True),
        JobStub("dead", "dead", "default", "dead"),
        JobStub("web", "web", "default", "running"),
    ]
    keys = [scanned(trigger(job=j)) for j in ("gone", "stopped", "dead", "web")]
    deleted, _ = decide(keys, view(jobs=jobs))
    assert deleted == {
        trigger(job="gone"): Rule.JOB_GONE,
        trigger(job="stopped"): Rule.JOB_GONE,
        trigger(job="dead"): Rule.JOB_GONE,
        trigger(job="web"): Rule.ALLOC_GONE,
    }


def test_keys_of_a_node_down_less_than_the_timeout_stay_and_longer_go() -> None:
    nodes = {
        "recent": ("down", NOW - 23 * HOUR),
        "old": ("down", NOW - 25 * HOUR),
    }
    keys = [
        scanned(trigger(node="recent")),
        scanned(KS.node_key("recent")),
        scanned(trigger(node="old")),
        scanned(KS.node_key("old")),
        scanned(trigger(node="absent")),
        scanned(KS.node_key("absent")),
    ]
    deleted, skipped = decide(keys, view(nodes=nodes))
    assert deleted == {
        trigger(node="old"): Rule.NODE_DOWN,
        KS.node_key("old"): Rule.NODE_DOWN,
        trigger(node="absent"): Rule.NODE_GONE,
        KS.node_key("absent"): Rule.NODE_GONE,
    }
    assert skipped == {
        trigger(node="recent"): SkipReason.NODE_DOWN_RECENTLY,
        KS.node_key("recent"): SkipReason.NODE_DOWN_RECENTLY,
    }


def test_a_down_node_with_an_unknown_status_time_keeps_its_keys() -> None:
    deleted, skipped = decide([scanned(trigger(node="n"))], view(nodes={"n": ("down", 0.0)}))
    assert deleted == {}
    assert skipped == {trigger(node="n"): SkipReason.NODE_DOWN_RECENTLY}


def test_an_initializing_node_keeps_its_keys_and_a_ready_one_keeps_its_heartbeat() -> None:
    keys = [scanned(trigger(node="init")), scanned(KS.node_key("node-1"))]
    deleted, skipped = decide(keys, view(nodes={"init": ("initializing", 0.0), "node-1": ("ready", 0.0)}))
    assert deleted == {}
    assert skipped == {trigger(node="init"): SkipReason.NODE_NOT_READY}


def test_a_key_held_by_a_session_is_never_deleted() -> None:
    keys = [
        scanned(KS.node_key("absent"), session="sess-1"),
        scanned(trigger(node="absent"), session="sess-2"),
    ]
    deleted, skipped = decide(keys, view())
    assert deleted == {}
    assert skipped == {KS.node_key("absent"): SkipReason.HELD, trigger(node="absent"): SkipReason.HELD}


def test_unknown_keys_are_reported_never_deleted() -> None:
    keys = [scanned("shepard/notes"), scanned("shepard/keys/node-1/web/app")]
    deleted, skipped = decide(keys, view(nodes={}))
    assert deleted == {}
    assert skipped == {
        "shepard/notes": SkipReason.UNKNOWN_KEY,
        "shepard/keys/node-1/web/app": SkipReason.UNKNOWN_KEY,
    }


# --- plans and slots -----------------------------------------------------------------------------------


def test_complete_plan_older_than_the_retention_goes_with_its_free_slots() -> None:
    old = NOW - 25 * HOUR
    keys = [
        scanned(KS.task_lock_key(SCOPE), plan_value("complete", updated_at=old)),
        scanned(KS.slot_key(SCOPE, 0)),
        scanned(KS.slot_key(SCOPE, 1), session="someone"),
    ]
    deleted, skipped = decide(keys, view())
    assert deleted == {KS.task_lock_key(SCOPE): Rule.PLAN_EXPIRED, KS.slot_key(SCOPE, 0): Rule.PLAN_EXPIRED}
    assert skipped == {KS.slot_key(SCOPE, 1): SkipReason.HELD}


def test_young_complete_plans_and_active_plans_stay() -> None:
    for value in (plan_value("complete", updated_at=NOW - 23 * HOUR), plan_value("planned", updated_at=0.0)):
        deleted, skipped = decide(
            [scanned(KS.task_lock_key(SCOPE), value), scanned(KS.slot_key(SCOPE, 0))], view()
        )
        assert (deleted, skipped) == ({}, {})


def test_plan_and_slots_of_a_gone_job_go_unless_a_member_is_restarting() -> None:
    gone = TaskScope("old", "app", "server")
    keys = [scanned(KS.task_lock_key(gone), plan_value("planned", job="old")), scanned(KS.slot_key(gone, 0))]
    deleted, _ = decide(keys, view())
    assert deleted == {KS.task_lock_key(gone): Rule.JOB_GONE, KS.slot_key(gone, 0): Rule.JOB_GONE}

    keys[0] = scanned(KS.task_lock_key(gone), plan_value("restarting", job="old"))
    deleted, skipped = decide(keys, view())
    assert deleted == {}
    assert skipped == {
        KS.task_lock_key(gone): SkipReason.PLAN_RESTARTING,
        KS.slot_key(gone, 0): SkipReason.PLAN_RESTARTING,
    }


def test_a_gone_jobs_plan_whose_restarting_holders_are_all_gone_goes_with_its_slots() -> None:
    gone = TaskScope("old", "app", "server")
    keys = [
        scanned(KS.task_lock_key(gone), plan_value("restarting", job="old")),  # member a1 held by session "s"
        scanned(KS.slot_key(gone, 0)),
        scanned(KS.slot_key(gone, 1), session="someone else"),
    ]
    assert holder_sessions_to_check(keys, view()) == {"s"}
    for gone_sessions in ({"s"}, {"s", "other"}):
        deleted, skipped = decide(keys, view(), gone_sessions=frozenset(gone_sessions))
        assert deleted == {KS.task_lock_key(gone): Rule.JOB_GONE, KS.slot_key(gone, 0): Rule.JOB_GONE}
        assert skipped == {KS.slot_key(gone, 1): SkipReason.HELD}

    deleted, skipped = decide(keys, view(), gone_sessions=frozenset({"other"}))  # "s" still lives
    assert deleted == {}
    assert skipped == {k.key: SkipReason.PLAN_RESTARTING for k in keys}


def test_a_live_jobs_plan_with_a_restarting_member_stays_whatever_its_holder() -> None:
    keys = [scanned(KS.task_lock_key(SCOPE), plan_value("restarting")), scanned(KS.slot_key(SCOPE, 0))]
    assert holder_sessions_to_check(keys, view()) == set(), "a live job's holders are not even looked up"
    assert decide(keys, view(), gone_sessions=frozenset({"s"})) == ({}, {})
    ks = Keyspace(lock_scope=LockScope.NODE)
    on_gone_node = TaskScope("web", "app", "server", "absent")
    keys = [classify(entry(ks.task_lock_key(on_gone_node), plan_value("restarting")), ks)]
    deleted, skipped = decide(keys, view(), gone_sessions=frozenset({"s"}))
    assert (deleted, skipped) == ({}, {ks.task_lock_key(on_gone_node): SkipReason.PLAN_RESTARTING}), (
        "only a gone job's plan goes with its dead holders"
    )


def test_an_unreadable_plan_is_reported_and_kept() -> None:
    gone = TaskScope("old", "app", "server")
    deleted, skipped = decide([scanned(KS.task_lock_key(gone), b"written by something else")], view())
    assert deleted == {}
    assert skipped == {KS.task_lock_key(gone): SkipReason.PLAN_UNREADABLE}


def test_a_free_slot_without_a_plan_goes_a_held_one_stays() -> None:
    keys = [scanned(KS.slot_key(SCOPE, 0)), scanned(KS.slot_key(SCOPE, 1), session="holder")]
    deleted, skipped = decide(keys, view())
    assert deleted == {KS.slot_key(SCOPE, 0): Rule.PLAN_GONE}
    assert skipped == {KS.slot_key(SCOPE, 1): SkipReason.HELD}


def test_node_scoped_plans_go_with_their_node() -> None:
    ks = Keyspace(lock_scope=LockScope.NODE)
    scopes = {n: TaskScope("web", "app", "server", n) for n in ("old", "recent")}
    keys = [classify(entry(ks.task_lock_key(s), plan_value("planned")), ks) for s in scopes.values()]
    nodes = {"old": ("down", NOW - 25 * HOUR), "recent": ("down", NOW - HOUR)}
    deleted, skipped = decide(keys, view(nodes=nodes))
    assert deleted == {ks.task_lock_key(scopes["old"]): Rule.NODE_DOWN}
    assert skipped == {ks.task_lock_key(scopes["recent"]): SkipReason.NODE_DOWN_RECENTLY}


# --- the node pass ------------------------------------------------------------------------------------


def test_node_pass_deletes_only_this_nodes_dead_triggers_and_only_when_it_is_ready() -> None:
    keys = [scanned(trigger(index=0)), scanned(trigger(index=1)), scanned(trigger(job="gone"))]
    v = view(allocs=[alloc("node-1", "web", 0)])
    deletions, skips = plan_node_pass(keys, v, "node-1")
    assert {d.key: d.rule for d in deletions} == {
        trigger(index=1): Rule.ALLOC_GONE,
        trigger(job="gone"): Rule.JOB_GONE,
    }
    assert skips == []

    deletions, skips = plan_node_pass(keys, view(nodes={"node-1": ("down", NOW)}), "node-1")
    assert deletions == []
    assert {s.reason for s in skips} == {SkipReason.NODE_NOT_READY}


# --- the executor --------------------------------------------------------------------------------------


LEADER = KS.gc_leader_key()
FENCE = TxnOp(TxnVerb.CHECK_SESSION, LEADER, session="gc-session")


class ScriptedConsul:
    """A Consul whose txn applies delete-cas to a dict (and check-session on ``holders``), with scripted
    failures; as in Consul, every op runs and every refusal is named, and any refusal applies nothing."""

    def __init__(self, store: dict[str, int], holders: dict[str, str] | None = None) -> None:
        self.store = store
        self.holders = holders if holders is not None else {LEADER: "gc-session"}
        self.txns: list[list[TxnOp]] = []
        self.errors: list[ConsulError] = []  # raised by the next txns, in order
        self.after_txn: list[Callable[[], None]] = []  # run after the next txns, in order

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        assert len(ops) <= MAX_TXN_OPS
        assert all(op.verb in (TxnVerb.DELETE_CAS, TxnVerb.CHECK_SESSION) for op in ops)
        self.txns.append(list(ops))
        if self.errors:
            raise self.errors.pop(0)
        refused = [(i, why) for i, op in enumerate(ops) if (why := self._refusal(op))]
        if not refused:
            for op in ops:
                if op.verb is TxnVerb.DELETE_CAS:
                    self.store.pop(op.key, None)
        if self.after_txn:
            self.after_txn.pop(0)()
        return TxnResult(ok=not refused, errors=tuple(refused))

    def _refusal(self, op: TxnOp) -> str:
        if op.verb is TxnVerb.CHECK_SESSION:
            held = self.holders.get(op.key, "")
            return "" if held == op.session else f'failed session check for key "{op.key}"'
        if op.key in self.store and self.store[op.key] != op.index:
            return f'failed to delete key "{op.key}", index is stale'
        return ""


class NoSleep:
    def sleep(self, seconds: float) -> None:
        pass


def deletions(n: int, index: int = 5) -> list[Deletion]:
    return [Deletion(f"shepard/keys/n/j/g/t/{i}", index, Rule.ALLOC_GONE, "test") for i in range(n)]


def test_deletes_go_in_transactions_of_at_most_64_delete_cas_ops() -> None:
    doomed = deletions(200)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert [len(t) for t in consul.txns] == [64, 64, 64, 8]
    assert all(op.index == 5 for t in consul.txns for op in t)
    assert len(out.deleted) == 200 and not out.failed and not out.skipped
    assert consul.store == {}


def test_a_txn_refused_in_part_is_retried_for_unchanged_keys_and_reports_the_rest() -> None:
    doomed = deletions(10)
    store = {d.key: 5 for d in doomed}
    store[doomed[3].key] = 6  # re-written between the scan and the delete
    store[doomed[7].key] = 9
    consul = ScriptedConsul(store)
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert [len(t) for t in consul.txns] == [10, 8]
    assert {s.key: s.reason for s in out.skipped} == {
        doomed[3].key: SkipReason.CHANGED,
        doomed[7].key: SkipReason.CHANGED,
    }
    assert store == {doomed[3].key: 6, doomed[7].key: 9}
    assert len(out.deleted) == 8


def test_a_refusal_other_than_a_change_is_a_failure() -> None:
    class Refusing(ScriptedConsul):
        def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
            self.txns.append(list(ops))
            if len(ops) == 3:
                return TxnResult(ok=False, errors=((1, "Permission denied"),))
            return super().txn(ops)

    doomed = deletions(3)
    consul = Refusing({d.key: 5 for d in doomed})
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert [(f.key, f.error) for f in out.failed] == [(doomed[1].key, "Permission denied")]
    assert len(out.deleted) == 2


def test_a_txn_without_an_answer_is_sent_again_then_counted_failed() -> None:
    doomed = deletions(3)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    consul.errors = [ConsulError("txn", "read timed out")]
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert len(consul.txns) == 2 and len(out.deleted) == 3

    consul = ScriptedConsul({d.key: 5 for d in doomed})
    consul.errors = [ConsulError("txn", "boom", status=500)] * 5
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert len(consul.txns) == 3 and len(out.failed) == 3 and not out.deleted

    consul = ScriptedConsul({d.key: 5 for d in doomed})
    consul.errors = [ConsulError("txn", "Permission denied", status=403)]
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert len(consul.txns) == 1 and len(out.failed) == 3


def test_a_lost_leader_lock_stops_before_the_next_transaction() -> None:
    doomed = deletions(130)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    calls = iter([None, "lock lost"])
    out = delete_all(consul, doomed, stop=lambda: next(calls), clock=NoSleep())  # type: ignore[arg-type]
    assert len(out.deleted) == 64
    assert len(out.skipped) == 66 and {s.reason for s in out.skipped} == {SkipReason.LOCK_LOST}


# --- the leader fence --------------------------------------------------------------------------------


def test_a_fenced_txn_opens_with_the_check_session_and_carries_at_most_63_deletes() -> None:
    doomed = deletions(200)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    out = delete_all(consul, doomed, fence=FENCE, clock=NoSleep())  # type: ignore[arg-type]
    assert [len(t) for t in consul.txns] == [64, 64, 64, 12]  # 63 + 63 + 63 + 11 deletes, each + the fence
    assert all(t[0] == FENCE and FENCE not in t[1:] for t in consul.txns)
    assert len(out.deleted) == 200 and not out.failed and not out.skipped
    with pytest.raises(ValueError, match=r"1\.\.63"):
        delete_all(consul, doomed, fence=FENCE, batch=64)  # type: ignore[arg-type]


def test_a_refused_fence_stops_the_pass_and_deletes_nothing_more() -> None:
    doomed = deletions(200)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    consul.after_txn = [lambda: consul.holders.pop(LEADER)]  # the session is destroyed after txn 1
    out = delete_all(consul, doomed, fence=FENCE, clock=NoSleep())  # type: ignore[arg-type]
    assert len(consul.txns) == 2, "the refused txn is not sent again, and no other follows"
    assert out.deleted == doomed[:63]
    assert [s.key for s in out.skipped] == [d.key for d in doomed[63:]]
    assert {s.reason for s in out.skipped} == {SkipReason.LOCK_LOST}
    assert "failed session check" in out.skipped[0].why
    assert set(consul.store) == {d.key for d in doomed[63:]}
    assert not out.failed


def test_a_refused_fence_wins_over_stale_deletes_in_the_same_txn() -> None:
    doomed = deletions(10)
    store = {d.key: 5 for d in doomed}
    store[doomed[4].key] = 6  # refused too, in the same txn as the fence
    consul = ScriptedConsul(store, holders={LEADER: "another session"})
    out = delete_all(consul, doomed, fence=FENCE, clock=NoSleep())  # type: ignore[arg-type]
    assert len(consul.txns) == 1 and not out.deleted and not out.failed
    assert [(s.key, s.reason) for s in out.skipped] == [(d.key, SkipReason.LOCK_LOST) for d in doomed]
    assert len(store) == 10


def test_a_fenced_txn_refused_in_part_retries_the_unchanged_keys_then_stops_when_the_lock_goes() -> None:
    doomed = deletions(10)
    store = {d.key: 5 for d in doomed}
    store[doomed[3].key] = 6  # op index 4: the fence is op 0
    consul = ScriptedConsul(store)
    consul.after_txn = [lambda: consul.holders.pop(LEADER)]  # lost before the retry
    out = delete_all(consul, doomed, fence=FENCE, clock=NoSleep())  # type: ignore[arg-type]
    assert [len(t) for t in consul.txns] == [11, 10]
    assert [(s.key, s.reason) for s in out.skipped] == [(doomed[3].key, SkipReason.CHANGED)] + [
        (d.key, SkipReason.LOCK_LOST) for d in doomed if d is not doomed[3]
    ]
    assert not out.deleted and len(store) == 10


# --- what each decision carries: the scanned index and the words the report prints ------------------


def test_every_decision_carries_the_scanned_index_and_says_why() -> None:
    old, restarting, dead, done = (
        TaskScope(job, "app", task)
        for job, task in (("old", "server"), ("old2", "server"), ("old3", "server"), ("web", "done"))
    )
    keys = [
        scanned(trigger(node="ghost"), index=11),
        scanned(trigger(job="old"), index=12),
        scanned(trigger(index=3), index=13),
        scanned(trigger(node="down1"), index=14),
        scanned(KS.node_key("down2"), index=15),
        scanned(trigger(node="init1"), index=16),
        scanned(KS.node_key("ghost2"), index=17, session="sess-9"),
        scanned("shepard/notes", index=18),
        scanned(KS.task_lock_key(old), b"not a plan", index=19),
        scanned(KS.task_lock_key(restarting), plan_value("restarting", job="old2"), index=20),
        scanned(KS.slot_key(restarting, 0), index=21),
        scanned(KS.task_lock_key(dead), plan_value("restarting", job="old3", holder="dead"), index=22),
        scanned(KS.slot_key(dead, 0), index=23),
        scanned(KS.slot_key(SCOPE, 0), index=24),
        scanned(KS.task_lock_key(done), plan_value("complete", updated_at=NOW - 25 * HOUR), index=25),
        scanned(KS.slot_key(done, 0), index=26),
        scanned(KS.node_key("down3"), index=27),
    ]
    nodes = {
        "node-1": ("ready", NOW - HOUR),
        "down1": ("down", NOW - HOUR),
        "down2": ("down", NOW - 25 * HOUR),
        "init1": ("initializing", NOW),
        "down3": ("disconnected", NOW + 5),  # Nomad's clock behind the node's update: "for 0s"
    }
    v = view(nodes=nodes)
    assert holder_sessions_to_check(keys, v) == {"s", "dead"}
    deletions, skips = plan_cluster_pass(keys, v, SETTINGS, frozenset({"dead"}))
    assert sorted((d.key, d.modify_index, d.rule, d.why) for d in deletions) == sorted(
        [
            (
                KS.task_lock_key(dead),
                22,
                Rule.JOB_GONE,
                "job old3 no longer exists or is stopped; the holders of its 1 restarting member(s) are gone",
            ),
            (KS.task_lock_key(done), 25, Rule.PLAN_EXPIRED, "complete for 25h (gc_plan_retention 24h)"),
            (trigger(node="ghost"), 11, Rule.NODE_GONE, "node ghost is not in Nomad"),
            (trigger(job="old"), 12, Rule.JOB_GONE, "job old no longer exists or is stopped"),
            (
                trigger(index=3),
                13,
                Rule.ALLOC_GONE,
                "no live allocation web.app[3] with task server on node node-1",
            ),
            (KS.node_key("down2"), 15, Rule.NODE_DOWN, "node down2 down for 25h (node_cleanup_timeout 24h)"),
            (KS.slot_key(dead, 0), 23, Rule.JOB_GONE, "job old3 no longer exists or is stopped"),
            (KS.slot_key(SCOPE, 0), 24, Rule.PLAN_GONE, "task web/app/server has no plan"),
            (
                KS.slot_key(done, 0),
                26,
                Rule.PLAN_EXPIRED,
                "its plan goes: complete for 25h (gc_plan_retention 24h)",
            ),
        ]
    )
    assert sorted((s.key, s.reason, s.why) for s in skips) == sorted(
        [
            (
                KS.task_lock_key(old),
                SkipReason.PLAN_UNREADABLE,
                "job old no longer exists or is stopped, but the value is not a plan this code reads",
            ),
            (
                KS.task_lock_key(restarting),
                SkipReason.PLAN_RESTARTING,
                "job old2 no longer exists or is stopped, but 1 member(s) restarting",
            ),
            (
                trigger(node="down1"),
                SkipReason.NODE_DOWN_RECENTLY,
                "node down1 down for 1h, less than node_cleanup_timeout 24h",
            ),
            (trigger(node="init1"), SkipReason.NODE_NOT_READY, "node init1 is initializing"),
            (
                KS.node_key("ghost2"),
                SkipReason.HELD,
                "node ghost2 is not in Nomad, but held by session sess-9",
            ),
            ("shepard/notes", SkipReason.UNKNOWN_KEY, "not a key Shepard writes under its prefix"),
            (
                KS.slot_key(restarting, 0),
                SkipReason.PLAN_RESTARTING,
                "job old2 no longer exists or is stopped, but its plan has a member restarting",
            ),
            (
                KS.node_key("down3"),
                SkipReason.NODE_DOWN_RECENTLY,
                "node down3 disconnected for 0s, less than node_cleanup_timeout 24h",
            ),
        ]
    )


def test_the_node_pass_says_why_and_reports_keys_it_does_not_own() -> None:
    keys = [
        scanned("shepard/keys/node-1/web/app", index=3),  # not a trigger key: reported, and the pass goes on
        scanned(trigger(node="node-2"), index=4),  # another node's key (a scan of node-1 never holds one)
        scanned(trigger(index=1), index=5),
        scanned(trigger(job="gone"), index=6),
    ]
    deletions, skips = plan_node_pass(keys, view(), "node-1")
    assert [(d.key, d.modify_index, d.rule, d.why) for d in deletions] == [
        (
            trigger(index=1),
            5,
            Rule.ALLOC_GONE,
            "no live allocation web.app[1] with task server on node node-1",
        ),
        (trigger(job="gone"), 6, Rule.JOB_GONE, "job gone no longer exists or is stopped"),
    ]
    assert [(s.key, s.reason, s.why) for s in skips] == [
        ("shepard/keys/node-1/web/app", SkipReason.UNKNOWN_KEY, "not a trigger key of this node"),
        (trigger(node="node-2"), SkipReason.UNKNOWN_KEY, "not a trigger key of this node"),
    ]
    for nodes, shown in (({}, "not in Nomad"), ({"node-1": ("down", NOW)}, "down")):
        _, skips = plan_node_pass(keys[2:], view(nodes=nodes), "node-1")
        assert [(s.key, s.reason, s.why) for s in skips] == [
            (k.key, SkipReason.NODE_NOT_READY, f"node node-1 is {shown}: left to the cluster pass")
            for k in keys[2:]
        ]


def test_ages_at_exactly_the_limit_go() -> None:
    keys = [
        scanned(KS.node_key("down"), index=3),
        scanned(KS.task_lock_key(SCOPE), plan_value("complete", updated_at=NOW - 24 * HOUR), index=4),
    ]
    deleted, skipped = decide(keys, view(nodes={"node-1": ("ready", NOW), "down": ("down", NOW - 24 * HOUR)}))
    assert deleted == {KS.node_key("down"): Rule.NODE_DOWN, KS.task_lock_key(SCOPE): Rule.PLAN_EXPIRED}
    assert skipped == {}


def test_node_state_of_other_statuses_and_status_times_below_one_second() -> None:
    def fold(*records: tuple[str, float]) -> NodeState:
        return NodeState.of(
            NodeInfo(f"id{i}", "n", s, status_updated_at=t) for i, (s, t) in enumerate(records)
        )

    assert fold(("initializing", 0.0)) == NodeState("initializing")
    assert fold(("alpha", 0.0), ("initializing", 0.0)) == NodeState("initializing")
    assert fold(("down", 5.0), ("zeta", 0.0), ("alpha", 0.0)) == NodeState("alpha")
    assert fold(("down", 0.5)) == NodeState("down", 0.5)


def test_the_view_keeps_every_live_allocation_and_merges_the_tasks_of_one_slot() -> None:
    allocs = [
        alloc("node-1", "web", 0, status="complete"),
        alloc("node-1", "web", 1),
        alloc("node-1", "web", 2, tasks=("a",)),
        alloc("node-1", "web", 2, tasks=("b",)),
        alloc("node-1", "unlisted", 0),  # its job is not in the job list: live under its ID
    ]
    v = view(allocs=allocs)
    ref = TaskRef("node-1", "web", "app", "server", 1)
    assert v.is_live(ref)
    assert not v.is_live(dataclasses.replace(ref, alloc_index=0))
    assert v.is_live(dataclasses.replace(ref, alloc_index=2, task="a"))
    assert v.is_live(dataclasses.replace(ref, alloc_index=2, task="b"))
    assert v.is_live(TaskRef("node-1", "unlisted", "app", "server", 0))


def test_node_scoped_plans_and_slots_by_their_node_and_job() -> None:
    ks = Keyspace(lock_scope=LockScope.NODE)
    on = {n: TaskScope("web", "app", "server", n) for n in ("node-1", "recent")}
    keys = [
        classify(
            entry(ks.task_lock_key(on["node-1"]), plan_value("complete", updated_at=NOW - 25 * HOUR)), ks
        ),
        classify(entry(ks.task_lock_key(on["recent"]), plan_value("planned")), ks),
        classify(entry(ks.slot_key(on["recent"], 0)), ks),
        classify(entry(ks.slot_key(TaskScope("web", "app", "other", "node-1"), 0)), ks),
    ]
    deletions, skips = plan_cluster_pass(
        keys, view(nodes={"node-1": ("ready", NOW), "recent": ("down", NOW - HOUR)}), SETTINGS
    )
    assert [(d.key, d.rule, d.why) for d in deletions] == [
        (ks.task_lock_key(on["node-1"]), Rule.PLAN_EXPIRED, "complete for 25h (gc_plan_retention 24h)"),
        (
            ks.slot_key(TaskScope("web", "app", "other", "node-1"), 0),
            Rule.PLAN_GONE,
            "task web/app/other@node-1 has no plan",
        ),
    ]
    assert [(s.key, s.reason, s.why) for s in skips] == [
        (
            ks.task_lock_key(on["recent"]),
            SkipReason.NODE_DOWN_RECENTLY,
            "node recent down for 1h, less than node_cleanup_timeout 24h",
        ),
        (
            ks.slot_key(on["recent"], 0),
            SkipReason.NODE_DOWN_RECENTLY,
            "node recent down for 1h, less than node_cleanup_timeout 24h",
        ),
    ]


def test_a_held_plan_stays_and_keeps_its_free_slots() -> None:
    keys = [
        scanned(KS.task_lock_key(SCOPE), plan_value("complete", updated_at=NOW - 25 * HOUR), session="x"),
        scanned(KS.slot_key(SCOPE, 0)),
    ]
    deleted, skipped = decide(keys, view())
    assert (deleted, skipped) == ({}, {KS.task_lock_key(SCOPE): SkipReason.HELD})


def test_a_restarting_member_without_a_session_keeps_its_plan() -> None:
    gone = TaskScope("old", "app", "server")
    keys = [scanned(KS.task_lock_key(gone), plan_value("restarting", job="old", holder=""))]
    assert holder_sessions_to_check(keys, view()) == set()
    deleted, skipped = decide(keys, view(), gone_sessions=frozenset({"s"}))
    assert (deleted, skipped) == ({}, {KS.task_lock_key(gone): SkipReason.PLAN_RESTARTING})


# --- the executor's refusals, failures and retries, exactly -------------------------------------------


@pytest.mark.parametrize("fence", [None, FENCE])
@pytest.mark.parametrize("changed", [0, 9])
def test_a_refusal_of_the_first_or_last_delete_skips_that_key_only(fence: TxnOp | None, changed: int) -> None:
    doomed = deletions(10)
    store = {d.key: 5 for d in doomed}
    store[doomed[changed].key] = 6
    consul = ScriptedConsul(store)
    out = delete_all(consul, doomed, fence=fence, clock=NoSleep())  # type: ignore[arg-type]
    assert [(s.key, s.reason, s.why) for s in out.skipped] == [
        (doomed[changed].key, SkipReason.CHANGED, "written since the scan (test)")
    ]
    assert out.deleted == [d for d in doomed if d is not doomed[changed]] and not out.failed


def test_a_rollback_that_names_none_of_the_deletes_fails_them_all_with_consuls_words() -> None:
    class RollingBack(ScriptedConsul):
        def __init__(self, errors: tuple[tuple[int, str], ...]) -> None:
            super().__init__({})
            self.rollback = errors

        def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
            self.txns.append(list(ops))
            return TxnResult(ok=False, errors=self.rollback)

    doomed = deletions(70)  # two batches: the failures of both are reported
    for errors, what in (
        (
            ((64, "op 64 is not ours"), (99, "nor 99")),
            "op 64 is not ours; nor 99",
        ),  # 64: just past the last op
        ((), "transaction rolled back"),
    ):
        consul = RollingBack(errors)
        out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
        assert len(consul.txns) == 2 and not out.deleted and not out.skipped
        assert [(f.key, f.error) for f in out.failed] == [(d.key, what) for d in doomed]


def test_failures_name_each_key_with_the_error_and_add_up_across_batches() -> None:
    doomed = deletions(70)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    consul.errors = [ConsulError("txn", "Permission denied", status=403)] * 2
    out = delete_all(consul, doomed, clock=NoSleep())  # type: ignore[arg-type]
    assert [len(t) for t in consul.txns] == [64, 6]
    error = str(ConsulError("txn", "Permission denied", status=403))
    assert [(f.key, f.error) for f in out.failed] == [(d.key, error) for d in doomed]


class RecordingSleep:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_a_5xx_is_retried_after_1s_then_2s_and_a_4xx_not_at_all() -> None:
    doomed = deletions(2)
    clock = RecordingSleep()
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    consul.errors = [ConsulError("txn", "boom", status=500)] * 3
    out = delete_all(consul, doomed, clock=clock)  # type: ignore[arg-type]
    assert clock.slept == [1.0, 2.0] and len(consul.txns) == 3 and len(out.failed) == 2

    for status in (400, 499):
        clock = RecordingSleep()
        consul = ScriptedConsul({d.key: 5 for d in doomed})
        consul.errors = [ConsulError("txn", "bad request", status=status)]
        out = delete_all(consul, doomed, clock=clock)  # type: ignore[arg-type]
        assert clock.slept == [] and len(consul.txns) == 1 and len(out.failed) == 2


def test_a_batch_of_one_is_allowed_and_of_none_refused() -> None:
    doomed = deletions(3)
    consul = ScriptedConsul({d.key: 5 for d in doomed})
    out = delete_all(consul, doomed, batch=1, clock=NoSleep())  # type: ignore[arg-type]
    assert [len(t) for t in consul.txns] == [1, 1, 1] and len(out.deleted) == 3
    with pytest.raises(ValueError, match=r"1\.\.64, got 0"):
        delete_all(consul, doomed, batch=0)  # type: ignore[arg-type]
