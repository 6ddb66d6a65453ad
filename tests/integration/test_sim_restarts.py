"""The restart record, peak concurrency and makespan; unhealthy and crash-looping restarts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

from shepard_lib.model import CheckStatus
from shepard_lib.sim import RestartRecord, SimCluster, makespan, peak_concurrency

SCALE = 50.0
SLACK = 5.0  # cluster seconds (100 ms real) of scheduling delay tolerated on a busy machine


def _wait_until(done: Callable[[], bool], what: str, timeout: float = 5.0, poll: float = 0.005) -> None:
    """Poll ``done`` every ``poll`` real seconds; fail with ``what`` after ``timeout`` real seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(poll)


def _scenario(count: int = 4, **timing: Any) -> dict[str, Any]:
    return {
        "seed": 11,
        "nodes": ["n1", "n2"],
        "jobs": [
            {
                "name": "web",
                "groups": [
                    {
                        "name": "app",
                        "count": count,
                        "tasks": [
                            {
                                "name": "server",
                                "shepard": True,
                                "service": "web",
                                "unhealthy_if": {"key": "config/web", "equals": "broken"},
                                "crash_if": {"key": "config/web", "equals": "crash"},
                            }
                        ],
                    }
                ],
            }
        ],
        "timing": {"restart": "2s", "healthy_after": "1s", "crash_after": "500ms", **timing},
        "restart_policy": {"attempts": 2, "delay": "1s"},
        "keys": {"config/web": "v1"},
    }


def _record(start: float, end: float | None, task: str = "t", job: str = "j") -> RestartRecord:
    return RestartRecord("a", 0, "n", job, "g", task, "api", start, stopped_at=start, ended_at=end)


def _check(sim: SimCluster, alloc_id: str) -> CheckStatus | None:
    """The status of the allocation's check in Consul, None while its service is not registered."""
    checks = requests.get(f"{sim.consul_addr}/v1/health/checks/web", timeout=10).json()
    mine = [c for c in checks if alloc_id in c["ServiceID"]]
    assert len(mine) <= 1, mine
    return CheckStatus(mine[0]["Status"]) if mine else None


def test_peak_concurrency_counts_overlapping_intervals_only() -> None:
    records = [
        _record(0, 10),
        _record(5, 15),
        _record(10, 20),
        _record(12, None),
        _record(1, 2, task="other"),
    ]
    assert peak_concurrency(records, now=30, task="t") == 3  # 10..15 holds [5,15], [10,20], [12,now]
    assert peak_concurrency(records, now=30) == 3
    assert peak_concurrency([_record(0, 10), _record(10, 20)], now=30) == 1, (
        "touching intervals do not overlap"
    )
    assert peak_concurrency(records, now=30, job="other") == 0
    assert makespan(records, now=30, task="t") == 30
    assert makespan([], now=30) == 0


def test_every_restart_is_recorded_with_its_timeline(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(count=1), time_scale=SCALE)
    alloc = sim.nomad.allocation("web", "app", 0)
    assert _check(sim, alloc.id) == CheckStatus.PASSING
    sim.nomad.restart(alloc.id, "server")
    assert _check(sim, alloc.id) is None, "Nomad deregisters the service before it stops the task"
    sim.wait_settled()
    [record] = sim.restarts()
    assert record.stopped_at is not None and record.running_at is not None and record.healthy_at is not None
    assert record.stopped_at <= record.running_at <= record.healthy_at
    assert 2 * 0.9 <= record.running_at - record.stopped_at < 2 + SLACK
    assert 1 * 0.9 <= record.healthy_at - record.running_at < 1 + SLACK
    assert record.outcome == "healthy" and record.ended_at == record.healthy_at
    assert _check(sim, alloc.id) == CheckStatus.PASSING
    served = requests.get(f"{sim.nomad_addr}/_sim/restarts", timeout=10).json()
    assert served == [record.to_json()]
    assert {
        "alloc_id",
        "node",
        "job",
        "group",
        "task",
        "cause",
        "stopped_at",
        "running_at",
        "healthy_at",
    } <= (served[0].keys())


def test_a_restarted_task_runs_before_its_service_is_registered_again(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(count=1, register_after="30s"), time_scale=SCALE)
    alloc = sim.nomad.allocation("web", "app", 0)
    sim.nomad.restart(alloc.id, "server")
    restarted = sim.clock.monotonic()
    _wait_until(
        lambda: alloc.task_states["server"].state == "running", "the task did not run again", 10, 0.002
    )
    running = sim.clock.monotonic()
    assert _check(sim, alloc.id) is None, "the service is registered the moment the task runs"
    assert running - restarted < 2 + 30 - 5, "the check above came too late to mean anything"
    sim.wait_settled()
    assert _check(sim, alloc.id) == CheckStatus.PASSING
    [record] = sim.restarts()
    assert record.running_at is not None and record.healthy_at is not None
    assert record.healthy_at - record.running_at >= 30 - 0.01, "healthy before Consul had its check"


def test_simultaneous_restarts_overlap_and_sequential_ones_do_not(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(count=4), time_scale=SCALE)
    allocs = sim.nomad.allocations("web")
    for alloc in allocs[:3]:
        sim.nomad.restart(alloc.id, "server")
    assert sim.peak_concurrency("web", "app", "server") == 3, "still restarting: open intervals count"
    sim.wait_settled()
    assert sim.peak_concurrency("web", "app", "server") == 3
    first_batch = sim.makespan("web")
    assert 3 * 0.9 <= first_batch < 3 + SLACK, "three restarts at once take one restart, not three"


def test_restarts_one_at_a_time_never_overlap(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(count=3), time_scale=SCALE)
    for alloc in sim.nomad.allocations("web"):
        sim.nomad.restart(alloc.id)
        sim.wait_settled()
    assert len(sim.restarts()) == 3
    assert sim.peak_concurrency("web") == 1
    assert sim.makespan("web") >= 3 * 3 * 0.9


def test_unhealthy_value_keeps_the_check_critical_and_the_restart_open(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(count=2), time_scale=SCALE)
    alloc = sim.nomad.allocation("web", "app", 0)
    sim.set_key("config/web", "broken")
    sim.nomad.restart(alloc.id, "server")
    _wait_until(lambda: sim.restarts()[0].running_at is not None, "the task should start again")
    time.sleep(3 / SCALE)  # well past healthy_after (1 s)
    [record] = sim.restarts()
    assert record.running_at is not None and record.healthy_at is None and record.ended_at is None
    assert alloc.task_states["server"].state == "running"
    assert _check(sim, alloc.id) == CheckStatus.CRITICAL
    sim.set_key("config/web", "v1")
    sim.nomad.restart(sim.nomad.allocation("web", "app", 1).id)
    sim.nomad.restart(alloc.id)
    sim.wait_settled()
    outcomes = [r.outcome for r in sim.restarts()]
    assert outcomes == ["superseded", "healthy", "healthy"]
    assert sim.peak_concurrency("web") == 2


def test_crash_value_crash_loops_until_the_restart_policy_gives_up(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario(count=2), time_scale=SCALE)
    alloc = sim.nomad.allocation("web", "app", 0)
    sim.set_key("config/web", "crash")
    sim.nomad.restart(alloc.id, "server")
    _wait_until(
        lambda: alloc.task_states["server"].state == "dead", "the task should fail after its restart attempts"
    )
    state = alloc.task_states["server"]
    assert state.failed and state.restarts == 1 + 2
    assert alloc.client_status == "failed"
    assert [e.type for e in state.events][-2:] == ["Terminated", "Not Restarting"]
    [record] = sim.restarts()
    assert record.outcome == "failed" and record.failed_at is not None and record.healthy_at is None
    checks = requests.get(f"{sim.consul_addr}/v1/health/checks/web", timeout=10).json()
    assert all(alloc.id not in c["ServiceID"] for c in checks), "a dead task's service is deregistered"
    assert sim.nomad.allocation("web", "app", 1).task_states["server"].state == "running"


def test_seeded_lognormal_timing_repeats(sim_cluster_factory: Any) -> None:
    timing = {"restart": {"lognormal": {"median": "2s", "sigma": 0.8}}}

    def durations() -> list[float]:
        # Scale 10: the 0.5 s tolerance below is 50 real ms of scheduling delay on a busy machine.
        sim = sim_cluster_factory(_scenario(count=1, **timing), time_scale=10)
        alloc = sim.nomad.allocation("web", "app", 0)
        for _ in range(3):
            sim.nomad.restart(alloc.id)
            sim.wait_settled()
        records = sim.restarts()
        # A loaded machine runs a timer late, never early: the observed downtime is at least the draw.
        assert all(r.running_at - r.stopped_at >= r.down_for - 1e-6 for r in records), records  # type: ignore[operator]
        return [r.down_for for r in records]  # type: ignore[misc]

    first, second = durations(), durations()
    assert len(first) == len(second) == 3
    assert first == second, "the same seed draws the same downtimes"
    assert max(first) - min(first) > 0.5, f"lognormal draws should differ: {first}"
