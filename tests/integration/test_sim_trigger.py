"""The shepard.tpl trigger path: a new value at an allocation's trigger key restarts that allocation only."""

from __future__ import annotations

import time
import uuid
from typing import Any

from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.sim import SimCluster

SCALE = 50.0


def _scenario(job: str = "web", prefix: str = "shepard") -> dict[str, Any]:
    return {
        "seed": 9,
        "key_prefix": prefix,
        "nodes": ["n1", "n2", "n3"],
        "jobs": [
            {
                "name": job,
                "groups": [
                    {
                        "name": "app",
                        "count": 6,
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


def _wait_restarts(sim: SimCluster, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(sim.restarts()) < n:
        assert time.monotonic() < deadline, f"expected {n} restarts, have {sim.restarts()}"
        time.sleep(0.005)


def _trigger(
    sim: SimCluster, index: int, task: str = "server", prefix: str = "shepard", job: str = "web"
) -> str:
    alloc = sim.nomad.allocation(job, "app", index)
    key = Keyspace(prefix).trigger_key(TaskRef(alloc.node.name, job, "app", task, index))
    value = uuid.uuid4().hex
    sim.set_key(key, value)
    return value


def test_trigger_key_restarts_exactly_that_allocation_task(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(), time_scale=SCALE)
    value = _trigger(sim, 4)
    _wait_restarts(sim, 1)
    sim.wait_caught_up()
    sim.wait_settled()
    [record] = sim.restarts()
    alloc = sim.nomad.allocation("web", "app", 4)
    assert (record.alloc_id, record.task, record.cause, record.node) == (alloc.id, "server", "template", "n2")
    tpl = sim.node_data_dir("n2") / "alloc" / alloc.id / "server/local/shepard.tpl"
    assert tpl.read_text() == value + "\n"
    others = [a for a in sim.nomad.allocations("web") if a.id != alloc.id]
    assert all(a.task_states["server"].restarts == 0 for a in others)
    assert alloc.task_states["helper"].restarts == 0


def test_same_trigger_value_twice_restarts_once(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(), time_scale=SCALE)
    alloc = sim.nomad.allocation("web", "app", 0)
    key = Keyspace().trigger_key(TaskRef(alloc.node.name, "web", "app", "server", 0))
    sim.set_key(key, "one")
    _wait_restarts(sim, 1)
    sim.wait_settled()
    sim.set_key(key, "one")
    sim.wait_caught_up()
    assert len(sim.restarts()) == 1


def test_trigger_works_for_names_that_need_escaping_and_a_custom_prefix(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(job="web%2F..v1", prefix="ops/shepard"), time_scale=SCALE)
    _trigger(sim, 2, task="helper", prefix="ops/shepard", job="web%2F..v1")
    _wait_restarts(sim, 1)
    [record] = sim.restarts()
    assert (record.job, record.alloc_index, record.task) == ("web%2F..v1", 2, "helper")
