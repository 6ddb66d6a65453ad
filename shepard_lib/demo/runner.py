"""Run the demo: the same job, the same config change, under each way of restarting.

Each run gets a fresh simulated cluster (:mod:`shepard_lib.demo.scenario`), changes the Consul key
the job's config template reads, and watches the simulator's restart record until the change has
played out; coordinated runs start one real :class:`~shepard_lib.agent.Agent` per simulated node
(in this process, each talking to its own node's Nomad agent API and watching its own node's
allocation directories with inotify), exactly as ``shepard agent`` runs on a Nomad client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shepard_lib.agent import Agent
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig, ShepardConfig, default_config
from shepard_lib.demo.scenario import (
    BAD_VALUE,
    CONFIG_KEY,
    GOOD_VALUES,
    GROUP,
    JOB,
    TASK,
    Mode,
    demo_scenario,
)
from shepard_lib.demo.timeline import RunMeasures, healthy_series, measure
from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.plan import Plan, PlanStatus
from shepard_lib.sim import RestartRecord, SimCluster

__all__ = ["DemoOptions", "RunResult", "RunSpec", "Snapshot", "run_demo", "run_once"]

log = logging.getLogger(__name__)

QUIET_AFTER_HALT = 30.0
"""Cluster seconds a halted Shepard run is watched further, to show nothing else restarts."""

UNHEALTHY_GRACE = 20.0
"""Cluster seconds a restarted-but-unhealthy instance is given before the run counts it as down for good."""


@dataclass(frozen=True)
class DemoOptions:
    """The demo's knobs; the defaults finish in well under a minute."""

    allocations: int = 24
    nodes: int = 6
    concurrency: int = 2
    splay: float = 5.0
    time_scale: float = 20.0
    run_timeout: float = 900.0  # cluster seconds
    data_dir: Path | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run: a mode, and whether the new config value is bad."""

    name: str
    mode: Mode
    bad_config: bool = False


RUNS = (
    RunSpec("uncoordinated", Mode.UNCOORDINATED),
    RunSpec("splay", Mode.SPLAY),
    RunSpec("shepard", Mode.SHEPARD),
    RunSpec("uncoordinated_bad_config", Mode.UNCOORDINATED, bad_config=True),
    RunSpec("shepard_bad_config", Mode.SHEPARD, bad_config=True),
)
"""Every run of the demo, in the order shown."""


@dataclass(frozen=True)
class Snapshot:
    """The state of a run at one instant, for a progress display."""

    run: str
    healthy: int
    down: int
    restarted: int
    instances: int
    elapsed: float  # cluster seconds since the change
    finished: bool = False


Observer = Callable[[Snapshot], None]


@dataclass(frozen=True)
class RunResult:
    """What one run did: its measures, its healthy-instance timeline and how it ended."""

    spec: RunSpec
    measures: RunMeasures
    series: tuple[tuple[float, int], ...]
    plan_status: str | None
    real_seconds: float
    timed_out: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the issue's fields, cluster seconds where a time is given."""
        return {
            "mode": self.spec.name,
            "bad_config": self.spec.bad_config,
            **dataclasses.asdict(self.measures),
            "plan_status": self.plan_status,
            "timed_out": self.timed_out,
            "real_seconds": round(self.real_seconds, 2),
        }


def shepard_config(options: DemoOptions) -> ShepardConfig:
    """Shepard's settings for the demo: the defaults, with times sized for a quick, readable run."""
    return dataclasses.replace(
        default_config(),
        concurrency=options.concurrency,
        max_failures=0,
        settle_time=2.0,
        min_healthy_time=3.0,
        healthy_deadline=30.0,
        session_ttl=120.0,  # 6 real seconds at the default scale: no renew is starved on a busy machine
        lock_delay=5.0,
        time_scale=options.time_scale,
        log_level="WARNING",
    )


def run_demo(options: DemoOptions, observer: Observer | None = None) -> list[RunResult]:
    """Every run of :data:`RUNS`, one after the other."""
    return [run_once(spec, options, observer) for spec in RUNS]


def run_once(spec: RunSpec, options: DemoOptions, observer: Observer | None = None) -> RunResult:
    """One run on a fresh cluster."""
    scenario = demo_scenario(
        spec.mode, allocations=options.allocations, nodes=options.nodes, splay=options.splay
    )
    started_real = time.monotonic()
    with contextlib.ExitStack() as stack:
        data_dir = options.data_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="shepard-demo-"))
        )
        sim = stack.enter_context(
            SimCluster.from_scenario(scenario, data_dir=data_dir / spec.name, time_scale=options.time_scale)
        )
        if spec.mode.coordinated:
            stack.enter_context(_agents(sim, shepard_config(options)))
        change_at = sim.clock.time()
        sim.set_key(CONFIG_KEY, BAD_VALUE if spec.bad_config else GOOD_VALUES[1])
        end, status, timed_out = _watch(sim, spec, options, change_at, observer)
        records = _since(sim.restarts(), change_at)
    floor = options.allocations - options.concurrency
    return RunResult(
        spec=spec,
        measures=measure(records, options.allocations, floor, change_at, end),
        series=tuple(healthy_series(records, options.allocations, change_at, end)),
        plan_status=status,
        real_seconds=time.monotonic() - started_real,
        timed_out=timed_out,
    )


@contextlib.contextmanager
def _agents(sim: SimCluster, cfg: ShepardConfig) -> Iterator[list[Agent]]:
    """One started agent per simulated node, on the sim's clock; stopped on exit."""
    with contextlib.ExitStack() as stack:
        agents = []
        for node in (n.name for n in sim.scenario.nodes):
            node_cfg = dataclasses.replace(
                cfg,
                node_name=node,
                nomad_data_dir=str(sim.node_data_dir(node)),
                consul=ConsulConfig(address=sim.consul_addr),
                nomad=NomadConfig(address=sim.nomad_agent_addr(node)),
            )
            consul = ConsulBackend(node_cfg.consul, sim.clock)
            nomad = NomadBackend(node_cfg.nomad, sim.clock)
            stack.callback(consul.close)
            stack.callback(nomad.close)
            agents.append(stack.enter_context(Agent(node_cfg, consul, nomad, clock=sim.clock)))
        _wait_watching(agents, len(sim.nomad.allocations()), sim)
        yield agents


def _wait_watching(agents: list[Agent], tasks: int, sim: SimCluster, timeout: float = 120.0) -> None:
    """Wait until the agents watch every task, so the change cannot slip past them."""
    deadline = sim.clock.monotonic() + timeout
    while sum(len(a.watched()) for a in agents) < tasks:
        if sim.clock.monotonic() > deadline:
            raise RuntimeError(f"the agents watch {sum(len(a.watched()) for a in agents)} of {tasks} tasks")
        time.sleep(0.02)


def _since(records: list[RestartRecord], start: float) -> list[RestartRecord]:
    return [r for r in records if r.requested_at >= start]


def _watch(
    sim: SimCluster, spec: RunSpec, options: DemoOptions, start: float, observer: Observer | None
) -> tuple[float, str | None, bool]:
    """Watch until the change has played out; returns (end time, plan status, timed out)."""
    plan_key = Keyspace().task_lock_key(TaskScope(job=JOB, group=GROUP, task=TASK))
    halted_at: float | None = None
    while True:
        now = sim.clock.time()
        records = _since(sim.restarts(), start)
        status = _plan_status(sim.get_key(plan_key)) if spec.mode.coordinated else None
        snap = _snapshot(spec, records, options.allocations, start, now)
        if observer is not None:
            observer(snap)
        if status == PlanStatus.FAILED and halted_at is None:
            halted_at = now
        done = _played_out(records, options.allocations, now, status, halted_at)
        timed_out = now - start > options.run_timeout
        if done or timed_out:
            if observer is not None:
                observer(dataclasses.replace(snap, finished=True))
            return now, status, timed_out and not done
        time.sleep(0.05)


def _played_out(
    records: list[RestartRecord], instances: int, now: float, status: str | None, halted_at: float | None
) -> bool:
    if halted_at is not None:  # a halted rollout: show that nothing else restarts for a while
        return now - halted_at >= QUIET_AFTER_HALT and all(r.running_at is not None for r in records)
    settled = {
        r.alloc_id
        for r in records
        if r.healthy_at is not None or (r.running_at is not None and now - r.running_at >= UNHEALTHY_GRACE)
    }
    if len(settled) < instances:
        return False
    return status in (None, PlanStatus.COMPLETE, PlanStatus.FAILED)


def _plan_status(raw: str | None) -> str | None:
    if raw is None:
        return None
    plan: Plan = Plan.decode(raw.encode("utf-8"))
    return str(plan.status)


def _snapshot(
    spec: RunSpec, records: list[RestartRecord], instances: int, start: float, now: float
) -> Snapshot:
    down = sum(1 for r in records if r.stopped_at is not None and r.ended_at is None)
    return Snapshot(
        run=spec.name,
        healthy=instances - down,
        down=down,
        restarted=len({r.alloc_id for r in records if r.healthy_at is not None}),
        instances=instances,
        elapsed=now - start,
    )
