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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from shepard_lib.backends import ConsulAPI
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, default_config
from shepard_lib.coordinator import Coordinator, CoordinatorOptions, SimulatedCrash, Step, Target
from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.model import Allocation, TxnOp, TxnResult, TxnVerb
from shepard_lib.plan import MemberState, PlanStore
from shepard_lib.rollout import RollingRestart, RolloutOptions
from shepard_lib.session import Session
from shepard_lib.sim.pytest_plugin import SimClusterFactory
from shepard_lib.sim.scenario import web_scenario

SEEDS = range(2)
SCALE = 10.0
ALLOCS = 100
CONCURRENCY = 20
TTL = 20.0
LOCK_DELAY = 3.0
KEYS = Keyspace()
SCOPE = TaskScope("web", "app", "server")
KILL_STEPS = (Step.SLOT, Step.CLAIMED, Step.TRIGGERED, Step.HEALTHY)
FENCES = (TxnVerb.CHECK_SESSION, TxnVerb.CHECK_INDEX)


def scenario(seed: int) -> dict[str, Any]:
    return web_scenario(
        count=ALLOCS,
        nodes=10,
        concurrency=CONCURRENCY,
        seed=seed,
        restart={"lognormal": {"median": "1s", "sigma": 0.4}},
        unhealthy_if_broken=False,
    )


class FencedWrites:
    """A ConsulAPI proxy recording every attempt to write a trigger key, and whether a slot fenced it."""

    def __init__(self, inner: ConsulAPI) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.attempts: list[tuple[str, bool]] = []

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        slots = KEYS.slot_prefix(SCOPE)
        fenced = {op.verb for op in ops if op.key.startswith(slots)} >= set(FENCES)
        with self._lock:
            self.attempts += [(op.key, fenced) for op in ops if op.key.startswith(KEYS.keys_prefix())]
        return self._inner.txn(ops)

    def put(self, key: str, value: bytes | str, **kwargs: Any) -> bool:
        if key.startswith(KEYS.keys_prefix()):
            with self._lock:
                self.attempts.append((key, False))
        return self._inner.put(key, value, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


pytestmark = pytest.mark.usefixtures("no_client_env")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_wide_rollout_keeps_the_invariants_under_kills_and_consul_errors(
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
        healthy_deadline=120.0,  # 12 real seconds: a loaded machine must not fail a healthy restart
    )
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
    # No trigger without a held slot: every attempt to write a trigger key was fenced by the slot's
    # session and token, and none landed twice (a write applied late would show here).
    unfenced = [key for key, fenced in consul.attempts if not fenced]
    assert consul.attempts and not unfenced, f"{where}: unfenced trigger writes {unfenced}"
    for key in {key for key, _ in consul.attempts}:
        entry = sim.consul_state.kv_get(key)
        assert entry is None or entry.create_index == entry.modify_index, f"{where}: {key} written twice"
    plan = PlanStore(consul).load(KEYS.task_lock_key(SCOPE))
    assert plan is not None, where
    unfinished = {m.alloc_index: m.state.value for m in plan.members.values() if m.state != MemberState.DONE}
    assert plan.status.value == "complete" and not unfinished, (where, unfinished)
    assert not result.failed, (where, [o.to_dict() for o in result.failed])
