"""What the chaos runs share, imported as ``chaos_support``: their scenario and configuration, the proxy
that records every trigger write, and the checks of the invariants of docs/design.md section 4.

The time scale keeps the session TTL at 2 real seconds, well above scheduling noise on a loaded machine.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from fault_support import ConsulProxy

from shepard_lib.backends import ConsulAPI
from shepard_lib.config import ConsulConfig, NomadConfig, ShepardConfig, default_config
from shepard_lib.coordinator import Step
from shepard_lib.errors import ConsulError
from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.model import TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import MemberState, PlanStore
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.consul import Fault
from shepard_lib.sim.scenario import web_scenario

SCALE = 10.0
TTL = 20.0
LOCK_DELAY = 3.0
KEYS = Keyspace()
SCOPE = TaskScope("web", "app", "server")
KILL_STEPS = (Step.SLOT, Step.CLAIMED, Step.TRIGGERED, Step.HEALTHY)
FENCES = (TxnVerb.CHECK_SESSION, TxnVerb.CHECK_INDEX)
TIMED_OUT = "no answer before the timeout"
"""What a ConsulError says when the client gave up waiting for the answer."""
TXN = "/v1/txn"
"""The simulated Consul's endpoint name of transactions, as its fault counts name it."""


def scenario(seed: int, *, count: int, nodes: int | list[str], concurrency: int) -> dict[str, Any]:
    """Job ``web`` (``web_scenario``) with log-normal restart times and no health condition."""
    return web_scenario(
        count=count,
        nodes=nodes,
        concurrency=concurrency,
        seed=seed,
        restart={"lognormal": {"median": "1s", "sigma": 0.4}},
        unhealthy_if_broken=False,
    )


def chaos_config(sim: SimCluster) -> ShepardConfig:
    """The configuration of every participant: :data:`TTL`, :data:`LOCK_DELAY`, a wide health deadline."""
    return replace(
        default_config(),
        consul=ConsulConfig(address=sim.consul_addr),
        nomad=NomadConfig(address=sim.nomad_addr),
        session_ttl=TTL,
        lock_delay=LOCK_DELAY,
        min_healthy_time=1.0,
        healthy_deadline=120.0,  # 12 real seconds: a loaded machine must not fail a healthy restart
    )


class FencedWrites(ConsulProxy):
    """A ConsulAPI proxy recording every attempt to write a trigger key, and whether a slot fenced it;
    and how many transactions its client gave up on (no answer before the client's timeout)."""

    def __init__(self, inner: ConsulAPI) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.attempts: list[tuple[str, bool]] = []
        """(trigger key, fenced by ``check-session`` and ``check-index`` on a restart slot), in order."""
        self.txn_timeouts = 0
        """Transactions the client gave up waiting for: a late write or a late reply that hit."""

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        slots = KEYS.slot_prefix(SCOPE)
        fenced = {op.verb for op in ops if op.key.startswith(slots)} >= set(FENCES)
        with self._lock:
            self.attempts += [(op.key, fenced) for op in ops if op.key.startswith(KEYS.keys_prefix())]
        try:
            return self._inner.txn(ops)
        except ConsulError as exc:
            if TIMED_OUT in str(exc):
                with self._lock:
                    self.txn_timeouts += 1
            raise

    def put(self, key: str, value: bytes | str, **kwargs: Any) -> bool:
        if key.startswith(KEYS.keys_prefix()):
            with self._lock:
                self.attempts.append((key, False))
        return self._inner.put(key, value, **kwargs)


def check_every_trigger_fenced_and_written_once(sim: SimCluster, writes: FencedWrites, where: str) -> None:
    """No trigger without a held slot: every attempt to write a trigger key was fenced by the slot's
    session and token, and none landed twice (a late write applied after its answer was lost would show
    here)."""
    unfenced = [key for key, fenced in writes.attempts if not fenced]
    assert writes.attempts and not unfenced, f"{where}: unfenced trigger writes {unfenced}"
    for key in {key for key, _ in writes.attempts}:
        entry = sim.consul_state.kv_get(key)
        assert entry is None or entry.create_index == entry.modify_index, f"{where}: {key} written twice"


def check_faults_hit_transactions(sim: SimCluster, writes: FencedWrites, where: str) -> None:
    """The faults asked for happened: late writes, late replies and lost replies hit transactions, and
    a client gave up on at least one of them (its write applied, or was answered, after its timeout)."""
    injected = sim.consul_faults.injected()
    wanted = (Fault.LATE_WRITE, Fault.LATE_REPLY, Fault.LOST_REPLY)
    missing = [f.value for f in wanted if not injected.get((f, TXN))]
    assert not missing, f"{where}: no {', '.join(missing)} hit a transaction: {injected}"
    assert writes.txn_timeouts, f"{where}: no client gave up on a late transaction: {injected}"


def check_plan_complete(consul: ConsulAPI, where: str, stopped: Collection[str] = ()) -> None:
    """The plan is complete: every member done, but those of the ``stopped`` allocations skipped."""
    plan = PlanStore(consul).load(KEYS.task_lock_key(SCOPE))
    assert plan is not None, where
    unfinished = {
        m.alloc_index: (m.state.value, m.holder_name)
        for a, m in plan.members.items()
        if m.state != MemberState.DONE and not (a in stopped and m.state == MemberState.SKIPPED)
    }
    assert plan.status.value == "complete" and not unfinished, (where, unfinished)
