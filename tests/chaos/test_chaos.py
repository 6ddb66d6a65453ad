"""Seeded chaos runs of the rollout protocol, checking the invariants of docs/design.md section 4.

Sim-only (fault controls and the restart record). Each seed: one config change of a 14-allocation
task, handled by one coordinator per allocation (each with its own session, as agents on the
nodes) and by a rolling restart of the same change. Meanwhile, chosen by the seed:

- some coordinators are killed at a random protocol step (the session is abandoned and the thread
  stops without any cleanup: the coordinator's fault hook raises SimulatedCrash);
- one coordinator is partitioned (its session renewals fail until the TTL runs out);
- Consul answers a fraction of requests with HTTP 500.

Invariants checked on every seed:

- never more than ``c`` restarts of the task at once (the sim's restart record);
- every allocation restarted exactly once (one change, one generation);
- no trigger without a held slot: every restart was caused by a trigger-key write, and every
  write of each trigger key was a transaction fenced by ``check-session`` on a slot (the last
  ModifyIndex of every trigger key is the one our single fenced write returned);
- a killed holder's slot is free again within 2 x TTL + lock-delay of the kill.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from shepard_lib.backends import ConsulAPI
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, default_config
from shepard_lib.coordinator import Coordinator, CoordinatorOptions, Outcome, SimulatedCrash, Step, Target
from shepard_lib.keyspace import Keyspace, TaskRef, TaskScope
from shepard_lib.model import Allocation, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import MemberState, PlanStore
from shepard_lib.rollout import RollingRestart, RolloutOptions, RolloutResult
from shepard_lib.session import Session
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SEEDS = range(20)
SCALE = 40.0
ALLOCS = 14
CONCURRENCY = 3
TTL = 20.0
LOCK_DELAY = 3.0
KEYS = Keyspace()
SCOPE = TaskScope("web", "app", "server")
KILL_STEPS = (Step.SLOT, Step.CLAIMED, Step.TRIGGERED, Step.HEALTHY)


def scenario(seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "nodes": ["node-1", "node-2", "node-3", "node-4"],
        "jobs": [
            {
                "name": "web",
                "meta": {"shepard_concurrency": str(CONCURRENCY)},
                "groups": [
                    {
                        "name": "app",
                        "count": ALLOCS,
                        "tasks": [
                            {
                                "name": "server",
                                "shepard": True,
                                "templates": [
                                    {
                                        "key": "config/web",
                                        "destination": "local/app.conf",
                                        "change_mode": "noop",
                                    }
                                ],
                                "service": "web",
                            }
                        ],
                    }
                ],
            }
        ],
        # register_after 0s: with the default 100 ms between a task running and its service in Consul,
        # seeds 5 and 15 end with no victim reaching its kill step (the invariants still hold); kept
        # as before until that is understood (see docs/testing.md).
        "timing": {
            "restart": {"lognormal": {"median": "1s", "sigma": 0.4}},
            "healthy_after": "500ms",
            "register_after": "0s",
        },
        "keys": {"config/web": "v1"},
    }


class FencedWrites:
    """A ConsulAPI proxy recording every trigger-key write that went through a fenced txn."""

    def __init__(self, inner: ConsulAPI, record: list[tuple[str, int]], lock: threading.Lock) -> None:
        self._inner = inner
        self._record = record
        self._lock = lock

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        result = self._inner.txn(ops)
        fenced = any(op.verb == TxnVerb.CHECK_SESSION for op in ops)
        if result.ok and fenced:
            with self._lock:
                self._record += [
                    (e.key, e.modify_index) for e in result.results if e.key.startswith("shepard/keys/")
                ]
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class Kill:
    number: int
    step: Step
    session: Session
    slot_key: str | None = None
    killed_at: float = 0.0
    freed_after: float | None = None


pytestmark = pytest.mark.usefixtures("no_client_env")


@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_hold_under_kills_partitions_and_consul_errors(
    sim_cluster_factory: SimClusterFactory, seed: int
) -> None:
    rng = random.Random(seed)
    sim = sim_cluster_factory(scenario(seed), time_scale=SCALE)
    clock = sim.clock
    cfg = replace(
        default_config(),
        consul=ConsulConfig(address=sim.consul_addr),
        nomad=NomadConfig(address=sim.nomad_addr),
        session_ttl=TTL,
        lock_delay=LOCK_DELAY,
        min_healthy_time=1.0,
        healthy_deadline=30.0,
    )
    fenced: list[tuple[str, int]] = []
    fenced_lock = threading.Lock()
    consul = FencedWrites(ConsulBackend(cfg.consul, clock), fenced, fenced_lock)
    nomad = NomadBackend(cfg.nomad, clock)
    options = CoordinatorOptions.from_config(cfg)
    allocs: list[Allocation] = sorted(nomad.job_allocations("web"), key=lambda a: a.index)
    victims = dict(zip(rng.sample(range(ALLOCS), 3), (rng.choice(KILL_STEPS) for _ in range(3)), strict=True))
    partitioned = rng.choice([i for i in range(ALLOCS) if i not in victims])
    kills: list[Kill] = []
    outcomes: dict[int, Any] = {}
    errors: list[BaseException] = []

    def slot_held_by(session_id: str) -> str | None:
        entries = [sim.consul_state.kv_get(KEYS.slot_key(SCOPE, n)) for n in range(CONCURRENCY)]
        return next((e.key for e in entries if e is not None and e.session == session_id), None)

    def agent(number: int, alloc: Allocation, changed_at: float) -> None:
        session = Session(
            consul, f"agent {alloc.node_name} #{number}", ttl=TTL, lock_delay=LOCK_DELAY, clock=clock
        )
        session.create()

        def fault(step: Step, target: Target) -> None:
            if number == partitioned and step == Step.SLOT:
                sim.consul_faults.pause_session_renewals(session.id)
            if victims.get(number) == step:
                kill = Kill(number, step, session, slot_held_by(session.id), clock.monotonic())
                session.abandon()
                kills.append(kill)
                raise SimulatedCrash(f"killed after {step}")

        coordinator = Coordinator(
            consul, nomad, KEYS, session, options, clock=clock, name=f"agent #{number}", fault_hook=fault
        )
        try:
            outcomes[number] = coordinator.handle_change(alloc, "server", changed_at)
        except SimulatedCrash:
            return
        except BaseException as exc:
            errors.append(exc)
        session.destroy()

    def watch_slots(stop: threading.Event) -> None:
        while not stop.is_set():
            for kill in list(kills):
                if kill.slot_key and kill.freed_after is None:
                    entry = sim.consul_state.kv_get(kill.slot_key)
                    if entry is None or entry.session != kill.session.id:
                        kill.freed_after = clock.monotonic() - kill.killed_at
            clock.sleep(0.1)

    changed_at = clock.time()
    sim.set_key("config/web", f"v2-{seed}")
    sim.consul_faults.error_rate = 0.03
    stop = threading.Event()
    watcher = threading.Thread(target=watch_slots, args=(stop,), daemon=True)
    threads = [
        threading.Thread(target=agent, args=(n, a, changed_at), name=f"agent #{n}", daemon=True)
        for n, a in enumerate(allocs)
    ]
    result: dict[str, Any] = {}

    def roll() -> None:
        try:
            roller = RollingRestart(consul, nomad, cfg, clock=clock, name="chaos rollout")
            result["r"] = roller.run("web", RolloutOptions(changed_at=changed_at))
        except BaseException as exc:
            errors.append(exc)

    threads.append(threading.Thread(target=roll, name="rollout", daemon=True))
    watcher.start()
    # The victims and the partitioned agent get a head start, so they hold slots when they fail;
    # the rollout (which finishes what they leave behind) starts when every victim is dead.
    early = [*victims, partitioned]
    for n in early:
        threads[n].start()
    clock.sleep(1.0)
    for n, t in enumerate(threads[:-1]):
        if n not in early:
            t.start()
    for n in victims:
        threads[n].join(60)
    threads[-1].start()
    for t in threads:
        t.join(60)
    # A holder killed late may still hold its slot when the others are done: watch it to its deadline.
    watch_until = max((k.killed_at for k in kills), default=0.0) + 2 * TTL + LOCK_DELAY
    while any(k.slot_key and k.freed_after is None for k in kills) and clock.monotonic() < watch_until:
        clock.sleep(0.1)
    stop.set()
    watcher.join(5)
    sim.consul_faults.error_rate = 0.0

    where = f"seed {seed}: kills {_describe_kills(kills)}, partitioned #{partitioned}"
    assert not errors, (where, errors)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"{where}: hung (agents by number, the rollout last): {hung}"
    restarts = sim.restarts()
    assert sim.peak_concurrency("web", "app", "server") <= CONCURRENCY, where
    assert Counter(r.alloc_id for r in restarts) == {a.id: 1 for a in allocs}, where
    assert {r.cause for r in restarts} == {"template"}, where
    # No trigger without a held slot: one fenced write per trigger key, and nothing wrote it after.
    assert sorted(key for key, _ in fenced) == sorted(KEYS.trigger_key(_ref(a)) for a in allocs), where
    for key, index in fenced:
        entry = sim.consul_state.kv_get(key)
        assert entry is not None and entry.modify_index == index, f"{where}: {key} written unfenced"
    # A victim whose own session was lost first (renewals starved) stopped cleanly instead.
    assert kills, where
    survivors = {n: outcomes.get(n) for n in victims if n not in {k.number for k in kills}}
    assert all(o is not None and o.outcome == Outcome.SKIPPED for o in survivors.values()), (where, survivors)
    # Killed holders' slots come free within 2 x TTL + lock-delay.
    for kill in kills:
        if kill.slot_key is not None:
            assert kill.freed_after is not None, f"{where}: {kill.slot_key} never freed"
            assert kill.freed_after <= 2 * TTL + LOCK_DELAY, f"{where}: {kill}"
    plan = PlanStore(consul).load(KEYS.task_lock_key(SCOPE))
    assert plan is not None, where
    unfinished = {
        m.alloc_index: (m.state.value, m.holder_name)
        for m in plan.members.values()
        if m.state != MemberState.DONE
    }
    assert plan.status.value == "complete" and not unfinished, (where, unfinished)
    assert result["r"].ok, f"{where}; rollout not ok: {_not_ok(result['r'])}"


def _describe_kills(kills: Sequence[Kill]) -> str:
    """The kills, one short phrase each: which agent, after which step, which slot it held."""
    return (
        "; ".join(
            f"#{k.number} after {k.step.value} holding {k.slot_key or 'no slot'}, freed after "
            + ("never" if k.freed_after is None else f"{k.freed_after:.1f}s")
            for k in kills
        )
        or "none"
    )


def _not_ok(result: RolloutResult) -> str:
    """Only what made a rollout not ok: its failed and skipped members, with reasons and who."""
    return "; ".join(
        f"[{o.target.ref.alloc_index}] {o.target.alloc_id[:8]} {o.outcome.value}: {o.reason}"
        + (f" (by {o.by})" if o.by else "")
        for o in (*result.failed, *result.skipped)
    )


def _ref(alloc: Allocation) -> TaskRef:
    return TaskRef(alloc.node_name, alloc.job_id, alloc.task_group, "server", alloc.index)
