"""Trigger: fenced restarts through the trigger key (consul_key) or Nomad's restart API (nomad_api).

Sim-only: the tests read the simulator's restart record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import connected

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import RestartMethod
from shepard_lib.errors import LockLost
from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.locks import RestartSlots
from shepard_lib.model import Allocation
from shepard_lib.session import Session
from shepard_lib.sim import SimCluster
from shepard_lib.trigger import Trigger

SCALE = 50.0
KEYSPACE = Keyspace()
SCENARIO: dict[str, Any] = {
    "seed": 3,
    "nodes": ["n1", "n2"],
    "jobs": [
        {
            "name": "web",
            "groups": [
                {
                    "name": "app",
                    "count": 3,
                    "tasks": [
                        {"name": "server", "shepard": True, "service": "web"},
                        {"name": "helper", "shepard": True},
                    ],
                }
            ],
        }
    ],
    "timing": {"restart": "1s", "healthy_after": "500ms"},
}


@dataclass
class Env:
    sim: SimCluster
    consul: ConsulBackend
    nomad: NomadBackend

    def session(self, name: str, *, ttl: float = 60.0, lock_delay: float = 15.0) -> Session:
        # A long TTL: the renew thread must not notice a destroyed session before the test fires.
        return Session(self.consul, name, ttl=ttl, lock_delay=lock_delay, clock=self.sim.clock)

    def alloc(self, index: int) -> Allocation:
        [alloc] = [a for a in self.nomad.job_allocations("web") if a.index == index]
        return alloc

    def ref(self, alloc: Allocation, task: str = "server") -> TaskRef:
        return TaskRef(alloc.node_name, alloc.job_id, alloc.task_group, task, alloc.index)

    def slots(self, task: str = "server") -> RestartSlots:
        scope = KEYSPACE.scope(TaskRef("", "web", "app", task, 0))
        return RestartSlots(self.consul, KEYSPACE.slot_prefix(scope), 1, clock=self.sim.clock)

    def wait_restarts(self, n: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.sim.restarts()) < n:
            assert time.monotonic() < deadline, f"expected {n} restarts, have {self.sim.restarts()}"
            time.sleep(0.005)

    def settle(self) -> None:
        """Wait until the sim acted on every write so far: what did not restart by then never will."""
        self.sim.wait_caught_up()


@pytest.fixture
def env(sim_cluster_factory: Any, no_client_env: None) -> Iterator[Env]:
    sim: SimCluster = sim_cluster_factory(SCENARIO, time_scale=SCALE)
    with connected(sim) as (consul, nomad):
        yield Env(sim, consul, nomad)


def test_consul_key_trigger_restarts_exactly_that_task_through_its_template(env: Env) -> None:
    alloc = env.alloc(1)
    ref = env.ref(alloc)
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.CONSUL_KEY)
    with env.session("agent") as session, env.slots().hold(session, holder="agent") as slot:
        trigger.fire(ref, alloc.id, slot)
        first = env.sim.get_key(KEYSPACE.trigger_key(ref))
        env.wait_restarts(1)
        env.sim.wait_settled()  # running again: the next trigger restarts it again
        trigger.fire(ref, alloc.id, slot)
        assert env.sim.get_key(KEYSPACE.trigger_key(ref)) != first, "each trigger must write a fresh value"
        env.wait_restarts(2)
        env.settle()
    records = env.sim.restarts()
    assert [(r.alloc_id, r.task, r.cause) for r in records] == [(alloc.id, "server", "template")] * 2


@pytest.mark.parametrize("after_loss", ["slot free", "slot taken by another session"])
def test_fenced_trigger_is_refused_once_the_slot_was_lost(env: Env, after_loss: str) -> None:
    alloc = env.alloc(0)
    ref = env.ref(alloc)
    key = KEYSPACE.trigger_key(ref)
    env.sim.set_key(key, "before")
    env.wait_restarts(1)
    env.sim.wait_settled()
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.CONSUL_KEY)
    with env.session("zombie", lock_delay=0) as zombie, env.session("successor") as successor:
        slot = env.slots().acquire(zombie, holder="zombie")
        env.consul.session_destroy(zombie.id)  # behind its back: the renew thread has not noticed
        if after_loss == "slot taken by another session":
            env.slots().acquire(successor, holder="successor", timeout=0)
        assert not slot.lost.is_set(), "the test needs the fence itself to refuse, not the lost event"
        refused = r"no longer held by this acquisition \(failed session check for key"
        with pytest.raises(LockLost, match=refused):
            trigger.fire(ref, alloc.id, slot)
        env.settle()
    assert env.sim.get_key(key) == "before", "a trigger was written without a held slot"
    assert len(env.sim.restarts()) == 1, "a restart happened without a held slot"


def test_trigger_with_a_lost_session_writes_nothing(env: Env) -> None:
    alloc = env.alloc(2)
    ref = env.ref(alloc)
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.CONSUL_KEY)
    # TTL 60 s (1.2 real seconds): not lost by a starved renew before the test destroys it; the
    # first renew after the destroy (at TTL/2) learns it is gone.
    with env.session("lost", ttl=60) as session:
        slot = env.slots().acquire(session, holder="lost")
        env.consul.session_destroy(session.id)
        assert env.sim.clock.wait(slot.lost, 120), "slot.lost not set after the session was destroyed"
        with pytest.raises(LockLost, match=r"not triggered: the session holding .*restart_lock/0 is lost"):
            trigger.fire(ref, alloc.id, slot)
    assert env.sim.get_key(KEYSPACE.trigger_key(ref)) is None
    assert env.sim.restarts() == []


def test_nomad_api_trigger_restarts_exactly_the_task(env: Env) -> None:
    alloc = env.alloc(2)
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.NOMAD_API)
    with env.session("agent") as session, env.slots("helper").hold(session, holder="agent") as slot:
        trigger.fire(env.ref(alloc, "helper"), alloc.id, slot)
        env.wait_restarts(1)
        env.settle()
    assert [(r.alloc_id, r.task, r.cause) for r in env.sim.restarts()] == [(alloc.id, "helper", "api")]
    assert env.sim.get_key(KEYSPACE.trigger_key(env.ref(alloc, "helper"))) is None
    states = env.nomad.allocation(alloc.id).task_states
    assert (states["helper"].restarts, states["server"].restarts) == (1, 0)


def test_nomad_api_trigger_is_refused_when_the_slot_is_no_longer_held(env: Env) -> None:
    alloc = env.alloc(1)
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.NOMAD_API)
    with env.session("zombie", lock_delay=0) as zombie, env.session("successor") as successor:
        slot = env.slots().acquire(zombie, holder="zombie")
        env.consul.session_destroy(zombie.id)
        env.slots().acquire(successor, holder="successor", timeout=0)
        with pytest.raises(LockLost, match="no longer held"):
            trigger.fire(env.ref(alloc), alloc.id, slot)
        env.settle()
    assert env.sim.restarts() == []


class RecordedReads:
    """The Consul backend, recording each ``get`` as ``(key, consistent)``."""

    def __init__(self, consul: ConsulBackend) -> None:
        self._consul = consul
        self.reads: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._consul, name)

    def get(self, key: str, *, consistent: bool = False) -> object:
        self.reads.append((key, consistent))
        return self._consul.get(key, consistent=consistent)


def test_nomad_api_fence_reads_the_slot_with_a_consistent_read(env: Env) -> None:
    # Consul's default read mode may answer from a leader that was just replaced, showing a slot that
    # is no longer held; only ``?consistent`` confirms leadership first. The sim has one state and
    # cannot serve that stale answer, so the test checks the mode of the fence read.
    alloc = env.alloc(0)
    reads = RecordedReads(env.consul)
    trigger = Trigger(reads, env.nomad, KEYSPACE, RestartMethod.NOMAD_API)  # type: ignore[arg-type]
    with env.session("agent") as session, env.slots().hold(session, holder="agent") as slot:
        trigger.fire(env.ref(alloc), alloc.id, slot)
    assert reads.reads == [(slot.key, True)], "the fence read of the slot must be a consistent read"


def test_nomad_api_trigger_is_refused_for_an_earlier_acquisition_by_the_same_session(env: Env) -> None:
    alloc = env.alloc(0)
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.NOMAD_API)
    with env.session("agent") as session:
        slots = env.slots()
        earlier = slots.acquire(session, holder="first")
        slots.release(earlier)
        slots.acquire(session, holder="second")  # the same session holds the slot again, a new acquisition
        with pytest.raises(LockLost, match="no longer held"):
            trigger.fire(env.ref(alloc), alloc.id, earlier)
    assert env.sim.restarts() == []


def test_nomad_api_trigger_is_refused_when_the_slot_key_is_gone(env: Env) -> None:
    alloc = env.alloc(0)
    trigger = Trigger(env.consul, env.nomad, KEYSPACE, RestartMethod.NOMAD_API)
    with env.session("agent") as session:
        slot = env.slots().acquire(session, holder="agent")
        env.consul.delete(slot.key)
        with pytest.raises(LockLost, match="no longer held"):
            trigger.fire(env.ref(alloc), alloc.id, slot)
    assert env.sim.restarts() == []
