"""HealthGate against the simulated cluster over HTTP.

Sim-only: the tests drive the simulator's scenario conditions (``unhealthy_if``, ``crash_if``),
its check states and its restart record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import Background, connected

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import HealthSource
from shepard_lib.errors import HealthTimeout, LockLost, TaskFailed
from shepard_lib.health import CANCEL_CHECK, HealthGate, HealthReport
from shepard_lib.keyspace import Keyspace, TaskRef
from shepard_lib.model import Allocation, CheckStatus, HealthCheck
from shepard_lib.sim import SimCluster

SCALE = 50.0
SCENARIO: dict[str, Any] = {
    "seed": 5,
    "nodes": ["n1", "n2"],
    "jobs": [
        {
            "name": "web",
            "groups": [
                {
                    "name": "app",
                    "count": 2,
                    "tasks": [
                        {
                            "name": "server",
                            "shepard": True,
                            "service": "web",
                            "unhealthy_if": {"key": "config/web", "equals": "broken"},
                            "crash_if": {"key": "config/web", "equals": "crash"},
                        },
                        {"name": "helper", "shepard": True},
                    ],
                }
            ],
        }
    ],
    "timing": {"restart": "1s", "healthy_after": "500ms", "crash_after": "500ms"},
    "restart_policy": {"attempts": 2, "delay": "1s"},
    "keys": {"config/web": "v1"},
}


@dataclass
class Env:
    sim: SimCluster
    consul: ConsulBackend
    nomad: NomadBackend

    def gate(
        self, source: HealthSource, *, min_healthy_time: float = 3, healthy_deadline: float = 60
    ) -> HealthGate:
        return HealthGate(
            self.consul,
            self.nomad,
            source=source,
            min_healthy_time=min_healthy_time,
            healthy_deadline=healthy_deadline,
            clock=self.sim.clock,
        )

    def alloc(self, index: int) -> Allocation:
        [alloc] = [a for a in self.nomad.job_allocations("web") if a.index == index]
        return alloc

    def restart_and_wait(
        self, gate: HealthGate, alloc: Allocation, task: str = "server", **kwargs: Any
    ) -> HealthReport:
        before = gate.baseline(alloc.id, task)
        self.nomad.restart_task(alloc.id, task)
        return gate.wait_healthy(alloc.id, task, before=before, **kwargs)

    def check_of(self, alloc: Allocation) -> HealthCheck | None:
        _, checks = self.consul.service_checks("web")
        return next((c for c in checks if alloc.id in c.service_id), None)

    def until(self, what: str, predicate: Callable[[], bool], within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.002)


@pytest.fixture
def env(sim_cluster_factory: Any, no_client_env: None) -> Iterator[Env]:
    sim: SimCluster = sim_cluster_factory(SCENARIO, time_scale=SCALE)
    with connected(sim) as (consul, nomad):
        yield Env(sim, consul, nomad)


@pytest.mark.parametrize("source", [HealthSource.CONSUL, HealthSource.BOTH])
def test_gate_passes_once_the_restarted_task_has_passing_checks_for_min_healthy_time(
    env: Env, source: HealthSource
) -> None:
    alloc = env.alloc(1)
    report = env.restart_and_wait(env.gate(source, min_healthy_time=3), alloc, services=["web"])
    [record] = env.sim.restarts()
    assert (report.alloc_id, report.task) == (alloc.id, "server")
    assert record.healthy_at is not None and record.running_at is not None
    assert report.restarted_at == pytest.approx(record.stopped_at, abs=0.01)
    assert report.running_at == pytest.approx(record.running_at, abs=0.01)
    assert report.healthy_at >= record.healthy_at + 3 - 0.01, "passed before checks were passing for 3s"
    # Generous: each answer of the Nomad sim can take ~40 ms real (2 cluster seconds at this scale).
    assert report.healthy_at <= record.healthy_at + 3 + 6


@pytest.mark.parametrize("source", list(HealthSource))
def test_gate_waits_for_the_restart_itself_not_the_old_healthy_run(env: Env, source: HealthSource) -> None:
    alloc = env.alloc(0)
    gate = env.gate(source, min_healthy_time=0)
    before = gate.baseline(alloc.id, "server")
    assert before.state == "running"
    # Through the trigger key: Nomad restarts the task only once its template re-rendered, so the
    # gate first sees the old, healthy run.
    ref = TaskRef(alloc.node_name, "web", "app", "server", alloc.index)
    env.sim.set_key(Keyspace().trigger_key(ref), "restart-please")
    report = gate.wait_healthy(alloc.id, "server", before=before, services=["web"])
    [record] = env.sim.restarts()
    assert report.running_at is not None and before.started_at is not None
    assert report.running_at > before.started_at
    assert record.running_at is not None and report.healthy_at >= record.running_at
    if source is not HealthSource.NOMAD:
        assert record.healthy_at is not None and report.healthy_at >= record.healthy_at


def test_source_nomad_judges_the_task_state_alone(env: Env) -> None:
    env.sim.set_key("config/web", "broken")  # the check stays critical: Nomad does not care
    alloc = env.alloc(0)
    report = env.restart_and_wait(env.gate(HealthSource.NOMAD, min_healthy_time=3), alloc, services=["web"])
    [record] = env.sim.restarts()
    assert record.healthy_at is None
    assert report.running_at is not None and report.healthy_at >= report.running_at + 3 - 0.01
    check = env.check_of(alloc)
    assert check is not None and check.status is CheckStatus.CRITICAL


@pytest.mark.parametrize("source", [HealthSource.CONSUL, HealthSource.BOTH])
def test_health_timeout_when_a_check_stays_critical(env: Env, source: HealthSource) -> None:
    env.sim.set_key("config/web", "broken")
    gate = env.gate(source, healthy_deadline=15)
    alloc = env.alloc(1)
    before = gate.baseline(alloc.id, "server")
    env.nomad.restart_task(alloc.id, "server")
    start = env.sim.clock.monotonic()
    with pytest.raises(HealthTimeout, match=r"within 15s: service web: check .* is critical"):
        gate.wait_healthy(alloc.id, "server", before=before, services=["web"])
    assert 15 <= env.sim.clock.monotonic() - start <= 19


def test_task_failed_when_the_restarted_task_crash_loops_until_dead(env: Env) -> None:
    env.sim.set_key("config/web", "crash")
    with pytest.raises(TaskFailed, match="dead"):
        env.restart_and_wait(env.gate(HealthSource.CONSUL), env.alloc(0), services=["web"])
    assert env.nomad.allocation(env.alloc(0).id).task_states["server"].failed


def test_task_failed_when_the_allocation_is_killed_while_waiting(env: Env) -> None:
    env.sim.set_key("config/web", "broken")
    alloc = env.alloc(1)
    gate = env.gate(HealthSource.CONSUL)
    call = Background(lambda: env.restart_and_wait(gate, alloc, services=["web"]))
    env.sim.clock.sleep(3)
    assert call.thread.is_alive()
    env.sim.nomad.kill_allocation(alloc.id)
    call.join()
    assert isinstance(call.error, TaskFailed), call.error


def test_a_check_flapping_back_to_critical_restarts_the_stable_timer(env: Env) -> None:
    alloc = env.alloc(0)
    gate = env.gate(HealthSource.CONSUL, min_healthy_time=10)
    before = gate.baseline(alloc.id, "server")
    env.nomad.restart_task(alloc.id, "server")
    call = Background(lambda: gate.wait_healthy(alloc.id, "server", before=before, services=["web"]))
    env.until("the restart", lambda: len(env.sim.restarts()) == 1)
    env.until("the check to pass", lambda: env.sim.restarts()[0].healthy_at is not None)
    check = env.check_of(alloc)
    assert check is not None
    env.sim.clock.sleep(4)
    assert call.thread.is_alive(), "the gate passed before min_healthy_time"
    env.sim.consul_state.set_check_status(check.check_id, CheckStatus.CRITICAL, "flap", node=check.node)
    env.sim.clock.sleep(1)
    env.sim.consul_state.set_check_status(check.check_id, CheckStatus.PASSING, "ok", node=check.node)
    passing_again = env.sim.clock.time()
    call.join()
    assert call.error is None, call.error
    assert isinstance(call.result, HealthReport)
    assert call.result.healthy_at >= passing_again + 10 - 0.05, "the stable timer did not restart"


def test_task_without_services_falls_back_to_nomad_state_and_logs_it_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shepard_lib.health")
    gate = env.gate(HealthSource.CONSUL, min_healthy_time=1)
    for index in (0, 1):
        report = env.restart_and_wait(gate, env.alloc(index), "helper")
        assert report.task == "helper"
    fallbacks = [r for r in caplog.records if "no Consul services" in r.getMessage()]
    assert len(fallbacks) == 1, [r.getMessage() for r in fallbacks]
    assert "web/app/helper" in fallbacks[0].getMessage()


def test_cancel_ends_the_wait_with_lock_lost(env: Env) -> None:
    env.sim.set_key("config/web", "broken")
    cancel = threading.Event()
    gate = env.gate(HealthSource.CONSUL)
    call = Background(lambda: env.restart_and_wait(gate, env.alloc(0), services=["web"], cancel=cancel))
    env.sim.clock.sleep(3)
    cancelled = env.sim.clock.monotonic()
    cancel.set()
    call.join()
    assert isinstance(call.error, LockLost), call.error
    assert env.sim.clock.monotonic() - cancelled <= CANCEL_CHECK + 4


def test_the_gate_waits_with_blocking_queries_not_polling(env: Env) -> None:
    alloc = env.alloc(1)
    before = env.sim.nomad.request_counts()
    env.restart_and_wait(env.gate(HealthSource.CONSUL, min_healthy_time=30), alloc, services=["web"])
    after = env.sim.nomad.request_counts()
    reads = sum(n - before.get(k, 0) for k, n in after.items() if k.startswith("GET /v1/allocation"))
    # The allocation changes a handful of times during a restart; 30 s of polling would be far more.
    assert reads <= 10, f"{reads} allocation reads during one health wait"
