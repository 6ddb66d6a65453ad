"""A wide chaos run: 100 allocations at concurrency 20, checking the invariants of docs/design.md section 4.

Sim-only (fault controls and the restart record). Each seed: one config change of a 100-allocation
task, rolled out at concurrency 20, while four agents (one coordinator each, with its own session)
handle the same change for one allocation each and are killed at a protocol step chosen by the
seed (session abandoned, no cleanup), and Consul answers a fraction of requests with HTTP 500 or
applies them and loses the answer. Many holders share one plan and one slot prefix here, which is
where the cost work (shared health watches, plan writes from the last plan seen, spread slot
choice) could break an invariant.

Invariants checked:

- never more than 20 restarts of the task at once (the sim's restart record);
- every allocation restarted exactly once, each by a trigger-key write;
- no trigger without a held slot: every attempt to write a trigger key was a txn fenced by the
  slot's session and fencing token (``check-session`` and ``check-index``), and no trigger key was
  written twice;
- the plan ends complete with every member done.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
from chaos_support import (
    KEYS,
    KILL_STEPS,
    LOCK_DELAY,
    SCALE,
    SCOPE,
    TTL,
    FencedWrites,
    chaos_config,
    check_every_trigger_fenced_and_written_once,
    check_plan_complete,
    scenario,
)

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.coordinator import Coordinator, CoordinatorOptions, SimulatedCrash, Step, Target
from shepard_lib.model import Allocation
from shepard_lib.plan import PlanStore
from shepard_lib.rollout import RollingRestart, RolloutOptions
from shepard_lib.session import Session
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SEEDS = range(2)
ALLOCS = 100
CONCURRENCY = 20
NODES = 10


pytestmark = pytest.mark.usefixtures("no_client_env")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_wide_rollout_keeps_the_invariants_under_kills_and_consul_errors(
    sim_cluster_factory: SimClusterFactory, seed: int
) -> None:
    rng = random.Random(seed)
    sim = sim_cluster_factory(
        scenario(seed, count=ALLOCS, nodes=NODES, concurrency=CONCURRENCY), time_scale=SCALE
    )
    clock = sim.clock
    cfg = chaos_config(sim)
    consul = FencedWrites(ConsulBackend(cfg.consul, clock))
    nomad = NomadBackend(cfg.nomad, clock)
    options = CoordinatorOptions.from_config(cfg)
    allocs: list[Allocation] = sorted(nomad.job_allocations("web"), key=lambda a: a.index)
    victims = {a.index: rng.choice(KILL_STEPS) for a in rng.sample(allocs, 4)}
    killed: list[tuple[int, Step]] = []
    errors: list[BaseException] = []

    def agent(alloc: Allocation, seen_index: int) -> None:
        session = Session(consul, f"agent #{alloc.index}", ttl=TTL, lock_delay=LOCK_DELAY, clock=clock)
        session.create()

        def fault(step: Step, target: Target) -> None:
            if victims.get(alloc.index) == step:
                session.abandon()
                killed.append((alloc.index, step))
                raise SimulatedCrash(f"killed after {step}")

        coordinator = Coordinator(
            consul, nomad, KEYS, session, options, clock=clock, name=f"agent #{alloc.index}", fault_hook=fault
        )
        try:
            coordinator.handle_change(alloc, "server", seen_index=seen_index)
        except SimulatedCrash:
            return
        except BaseException as exc:
            errors.append(exc)
        session.destroy()

    seen_index = PlanStore(consul).read(KEYS.task_lock_key(SCOPE))[1]  # before the change: 0, no plan
    sim.set_key("config/web", f"v2-{seed}")
    sim.consul_faults.error_rate = 0.02
    sim.consul_faults.lost_reply_rate = 0.005
    agents = [
        threading.Thread(target=agent, args=(a, seen_index), name=f"agent #{a.index}", daemon=True)
        for a in allocs
        if a.index in victims
    ]
    for thread in agents:
        thread.start()
    clock.sleep(1.0)  # the agents hold slots (or are dead) when the rollout starts
    result = RollingRestart(consul, nomad, cfg, clock=clock, name="wide rollout").run(
        "web", RolloutOptions(seen_index=seen_index)
    )
    for thread in agents:
        thread.join(60)
    sim.consul_faults.error_rate = 0.0
    sim.consul_faults.lost_reply_rate = 0.0

    where = f"seed {seed}: killed {killed}"
    assert not errors, (where, errors)
    assert not [t.name for t in agents if t.is_alive()], f"{where}: an agent hung"
    restarts = sim.restarts()
    assert sim.peak_concurrency("web", "app", "server") <= CONCURRENCY, where
    assert Counter(r.alloc_id for r in restarts) == {a.id: 1 for a in allocs}, where
    assert {r.cause for r in restarts} == {"template"}, where
    check_every_trigger_fenced_and_written_once(sim, consul, where)
    check_plan_complete(consul, where)
    assert not result.failed, (where, [o.to_dict() for o in result.failed])
