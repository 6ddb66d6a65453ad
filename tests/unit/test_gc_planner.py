"""The GC planner (pure) and executor (against a scripted Consul): every rule and safety rule."""

from __future__ import annotations

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


def plan_value(status: str, *, updated_at: float = NOW, job: str = "web") -> bytes:
    """An encoded plan: ``planned`` (a member pending), ``restarting`` (one restarting) or ``complete``."""
    plan = new_plan(job, "app", "server", None, instance_count=1, settings=PlanSettings(), now=updated_at)
    plan = register(plan, [MemberSpec("a1", "node-1", 0)], now=updated_at)
    if status in ("restarting", "complete"):
        plan = claim(
            plan,
            "a1",
            holder="h",
            session="s",
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
    deleted, skipped = decide(keys, view(), gone_sessions=frozenset({"s", "other"}))
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
