"""Seeded chaos runs of the rollout protocol, checking the invariants of docs/design.md section 4.

Sim-only (fault controls and the restart record). Each seed: one config change of a 14-allocation
task, handled by one coordinator per allocation (each with its own session, as agents on the
nodes, each on a host whose clock is skewed by up to 30 s) and by a rolling restart of the same
change. Meanwhile, chosen by the seed:

- some coordinators are killed at a random protocol step (the session is abandoned and the thread
  stops without any cleanup: the coordinator's fault hook raises SimulatedCrash); one killed once
  its member is through acts as a lane, so it dies with that member's finish deferred in memory
  and its slot kept;
- one coordinator is partitioned (its session renewals fail until the TTL runs out);
- Consul answers a fraction of requests with HTTP 500 before applying them, loses the answer of
  a fraction after applying them, applies a fraction of writes only after the client gave up on
  them (late writes), and answers a fraction of applied writes after the client gave up (late
  replies); besides these random draws, two late writes, two late replies and one lost reply are
  injected into transactions chosen by the seed, so every seed has them;
- one node is taken away mid-rollout, drained or down (by the seed): Nomad stops its allocations
  (drained: complete; down: lost) and places replacements on the other nodes;
- half of the coordinators act as an agent's lane: they keep their slot after their own member and
  drive other pending members under it, each finish written with the next claim's txn (or with the
  slot's release), leaving members restarting under another live holder to it.

Invariants checked on every seed:

- never more than ``c`` restarts of the task at once (the sim's restart record);
- every allocation Nomad kept running restarted exactly once (one change, one generation); one
  it stopped restarted at most once; a replacement Nomad placed after the change never restarted;
- no trigger without a held slot: every write of a trigger key went through a transaction fenced
  by ``check-session`` and ``check-index`` on a slot, and each trigger key was written at most
  once (CreateIndex == ModifyIndex), so no late write landed a second time;
- a killed holder's slot is free again within 2 x TTL + lock-delay of the kill (its session's end
  taken from when Consul's TTL timer fires, as the sim records it, not from when a possibly starved
  watcher thread looked);
- the plan completes, and the rollout is ok (members of stopped allocations skipped as stopped);
- the faults happened: late writes, late replies and lost replies hit transactions (the sim's
  counts), and a client gave up on at least one late transaction.

Seeds: 20 by default (CI); ``SHEPARD_CHAOS_SEEDS=200`` runs 200 (the scheduled run). The time
scale keeps the session TTL at 2 real seconds, well above scheduling noise on a loaded machine.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from chaos_support import (
    KEYS,
    KILL_STEPS,
    LOCK_DELAY,
    SCALE,
    SCOPE,
    TTL,
    TXN,
    FencedWrites,
    chaos_config,
    check_every_trigger_fenced_and_written_once,
    check_faults_hit_transactions,
    check_plan_complete,
    scenario,
)
from fault_support import SkewedClock

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.coordinator import (
    Coordinator,
    CoordinatorOptions,
    EventKind,
    Outcome,
    RolloutEvent,
    SimulatedCrash,
    Step,
    Target,
    target_for,
)
from shepard_lib.errors import NotFound
from shepard_lib.model import Allocation
from shepard_lib.plan import MemberState, Plan, PlanStore
from shepard_lib.rollout import RollingRestart, RolloutOptions, RolloutResult
from shepard_lib.session import Session
from shepard_lib.sim.consul import Fault
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SEEDS = range(int(os.environ.get("SHEPARD_CHAOS_SEEDS", "20")))
ALLOCS = 14
CONCURRENCY = 3
NODES = ["node-1", "node-2", "node-3", "node-4"]
MAX_SKEW = 30.0
CLIENT_TIMEOUT = 1.0
"""Real seconds a coordinator's Consul client waits for an answer; a late write or reply waits longer."""
INJECTED = (Fault.LATE_WRITE, Fault.LATE_WRITE, Fault.LATE_REPLY, Fault.LATE_REPLY, Fault.LOST_REPLY)
"""Faults injected into transactions of every seed, besides the random ones."""
INJECT_WITHIN = 30
"""They hit transactions among the first this many of the run, which every run makes."""


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
def test_invariants_hold_under_kills_partitions_late_writes_drains_and_skewed_clocks(
    sim_cluster_factory: SimClusterFactory, seed: int
) -> None:
    rng = random.Random(seed)
    sim = sim_cluster_factory(
        scenario(seed, count=ALLOCS, nodes=NODES, concurrency=CONCURRENCY), time_scale=SCALE
    )
    clock = sim.clock
    cfg = chaos_config(sim)
    sessions_consul = ConsulBackend(cfg.consul, clock)  # renewals keep the default timeout
    consul = FencedWrites(ConsulBackend(cfg.consul, clock, timeout=CLIENT_TIMEOUT))
    nomad = NomadBackend(cfg.nomad, clock)
    options = CoordinatorOptions.from_config(cfg)
    allocs: list[Allocation] = sorted(nomad.job_allocations("web"), key=lambda a: a.index)
    steps = (*KILL_STEPS, Step.FINISHED)
    victims = dict(zip(rng.sample(range(ALLOCS), 3), (rng.choice(steps) for _ in range(3)), strict=True))
    partitioned = rng.choice([i for i in range(ALLOCS) if i not in victims])
    taken = rng.choice(NODES)
    take_after = rng.randint(1, ALLOCS // 2)  # restarts seen by the rollout before the node is taken away
    skews = [rng.uniform(-MAX_SKEW, MAX_SKEW) for _ in range(ALLOCS)]
    how = rng.choice(("drained", "down"))
    # The first ~45 transactions are there in every run (registrations, slots, claims, finishes).
    planned = zip(rng.sample(range(INJECT_WITHIN), len(INJECTED)), INJECTED, strict=True)
    # A victim killed once its member is through is a lane: it dies with that member's finish deferred.
    lanes = set(rng.sample(range(ALLOCS), ALLOCS // 2))
    lanes |= {n for n, step in victims.items() if step == Step.FINISHED}
    kills: list[Kill] = []
    outcomes: dict[int, Any] = {}
    lost_first: dict[int, bool] = {}  # by agent: its session was lost before it was through
    errors: list[BaseException] = []

    def slot_held_by(session_id: str) -> str | None:
        entries = [sim.consul_state.kv_get(KEYS.slot_key(SCOPE, n)) for n in range(CONCURRENCY)]
        return next((e.key for e in entries if e is not None and e.session == session_id), None)

    def agent(number: int, alloc: Allocation, seen_index: int) -> None:
        host_clock = SkewedClock(clock, skews[number])
        session = Session(
            sessions_consul,
            f"agent {alloc.node_name} #{number}",
            ttl=TTL,
            lock_delay=LOCK_DELAY,
            clock=host_clock,
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
            consul, nomad, KEYS, session, options, clock=host_clock, name=f"agent #{number}", fault_hook=fault
        )
        lane = number in lanes
        try:
            outcomes[number] = coordinator.handle_change(
                alloc,
                "server",
                seen_index=seen_index,
                keep_slot=lane,
                wait_for_holders=not lane,
                defer_finish=lane,
            )
            if lane:
                drive_lane(coordinator, random.Random(seed * 1000 + number))
            lost_first[number] = session.lost.is_set()
        except SimulatedCrash:
            return
        except BaseException as exc:
            errors.append(exc)
        session.destroy()

    def drive_lane(coordinator: Coordinator, lane_rng: random.Random) -> None:
        """What an agent's lane does (shepard_lib.agent.rollouts): while the slot is kept, drive any
        pending member; then give the slot back (with the deferred finish)."""
        key = KEYS.task_lock_key(SCOPE)
        tried: set[str] = set()
        job = nomad.job("web")
        while coordinator.keeps_slot:
            plan, _ = coordinator.plans.known(key)
            pending = sorted(
                a for a, m in (plan.members.items() if plan else ()) if m.state == MemberState.PENDING
            )
            pending = [a for a in pending if a not in tried]
            if not pending:
                break
            alloc_id = lane_rng.choice(pending)
            tried.add(alloc_id)
            try:
                member_alloc = nomad.allocation(alloc_id)
            except NotFound:
                continue
            target = target_for(member_alloc, "server", job)
            coordinator.drive(target, keep_slot=True, wait_for_holders=False, defer_finish=True)
        coordinator.release_slots()

    def look_at_slots() -> None:
        for kill in list(kills):
            if kill.slot_key and kill.freed_after is None:
                entry = sim.consul_state.kv_get(kill.slot_key)
                if entry is None or entry.session != kill.session.id:
                    # When Consul's TTL timer fired, not when this (possibly starved) thread saw it.
                    expired = sim.consul_state.session_expired_at(kill.session.id or "")
                    kill.freed_after = (clock.monotonic() if expired is None else expired) - kill.killed_at

    def wait_until_victims_acted() -> None:
        deadline = clock.monotonic() + clock.cluster(60.0)
        while clock.monotonic() < deadline:
            index = sim.consul_state.index
            entry = sim.consul_state.kv_get(KEYS.task_lock_key(SCOPE))
            plan = Plan.decode(entry.value) if entry is not None else None
            members = [plan.members.get(allocs[n].id) if plan else None for n in victims]
            waiting = [
                n
                for n, m in zip(victims, members, strict=True)
                if threads[n].is_alive() and (m is None or m.state == MemberState.PENDING)
            ]
            if not waiting:
                return
            sim.consul_state.wait_for_change(index, 0.5)

    def watch_slots(stop: threading.Event) -> None:
        while not stop.is_set():
            look_at_slots()
            clock.sleep(0.1)

    seen_index = PlanStore(consul).read(KEYS.task_lock_key(SCOPE))[1]  # before the change: 0, no plan
    sim.set_key("config/web", f"v2-{seed}")
    faults = sim.consul_faults
    faults.error_rate = 0.03
    faults.lost_reply_rate = 0.01
    faults.late_write_rate = 0.01
    faults.late_reply_rate = 0.01
    faults.late_delay = clock.cluster(CLIENT_TIMEOUT * 1.5)
    for after, fault in planned:
        faults.inject(fault, TXN, after=after)
    stop = threading.Event()
    watcher = threading.Thread(target=watch_slots, args=(stop,), daemon=True)
    threads = [
        threading.Thread(target=agent, args=(n, a, seen_index), name=f"agent #{n}", daemon=True)
        for n, a in enumerate(allocs)
    ]
    result: dict[str, Any] = {}

    restarted_seen: list[str] = []

    def take_node_midway(event: RolloutEvent) -> None:
        if event.kind == EventKind.RESTARTED:
            restarted_seen.append(event.alloc_id)
            if len(restarted_seen) == take_after:
                if how == "drained":
                    sim.nomad.drain_node(sim.nomad.node(taken).id, deadline=3600.0)
                else:
                    sim.nomad.set_node_down(taken)

    def roll() -> None:
        try:
            roller = RollingRestart(
                consul, nomad, cfg, clock=clock, name="chaos rollout", observer=take_node_midway
            )
            result["r"] = roller.run("web", RolloutOptions(seen_index=seen_index))
        except BaseException as exc:
            errors.append(exc)

    threads.append(threading.Thread(target=roll, name="rollout", daemon=True))
    watcher.start()
    # The victims and the partitioned agent get a head start, so they hold slots when they fail;
    # the rollout (which finishes what they leave behind) starts when every victim is dead. The
    # victims start alone (as many as the slots) and the others once each victim has claimed its
    # own member or died: a lane cannot restart a victim's member before the victim reaches its step.
    early = [*victims, partitioned]
    for n in victims:
        threads[n].start()
    wait_until_victims_acted()
    threads[partitioned].start()
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
    look_at_slots()
    faults.reset()

    where = (
        f"seed {seed}: kills {_describe_kills(kills)}, partitioned #{partitioned}, "
        f"{taken} {how} after {take_after} restart(s), lanes {sorted(lanes)}"
    )
    assert not errors, (where, errors)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"{where}: hung (agents by number, the rollout last): {hung}"
    restarts = sim.restarts()
    assert sim.peak_concurrency("web", "app", "server") <= CONCURRENCY, where
    counts = Counter(r.alloc_id for r in restarts)
    stopped = {a.id for a in allocs if sim.nomad.state.allocs[a.id].desired_status != "run"}
    assert stopped, f"{where}: taking the node away stopped nothing"
    kept = {a.id for a in allocs} - stopped
    assert {a: counts[a] for a in kept} == dict.fromkeys(kept, 1), where
    assert all(counts[a] <= 1 for a in stopped), (where, {a: counts[a] for a in stopped})
    replacements = {sim.nomad.state.allocs[a].next_allocation for a in stopped}
    assert not replacements & set(counts), f"{where}: a replacement restarted outside the plan"
    assert {r.cause for r in restarts} == {"template"}, where
    check_every_trigger_fenced_and_written_once(sim, consul, where)
    check_faults_hit_transactions(sim, consul, where)
    # A victim whose own session was lost first (renewals starved) stopped cleanly instead: at least
    # one victim was killed, unless every one of them lost its session before its kill step (seed 30 of
    # a 200-seed run at load 15 starved every renew thread of the process for a whole TTL).
    assert kills or all(lost_first.get(n) for n in victims), (where, {n: outcomes.get(n) for n in victims})
    survivors = {n: outcomes.get(n) for n in victims if n not in {k.number for k in kills}}
    assert all(o is not None and o.outcome != Outcome.FAILED for o in survivors.values()), (where, survivors)
    # Killed holders' slots come free within 2 x TTL + lock-delay.
    for kill in kills:
        if kill.slot_key is not None:
            assert kill.freed_after is not None, f"{where}: {kill.slot_key} never freed"
            assert kill.freed_after <= 2 * TTL + LOCK_DELAY, f"{where}: {kill}"
    check_plan_complete(consul, where, stopped)
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
