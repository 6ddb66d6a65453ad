"""Helpers of the coordination tests (``test_coordinator``, ``test_core_correctness``), imported as
``coordination_support``: one job ``web`` (group ``app``, task ``server``) on the sim, backends and
coordinators on the sim's clock, and the sim's restart record by allocation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from shepard_lib.backends import ConsulAPI
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, ShepardConfig, default_config
from shepard_lib.coordinator import Coordinator, CoordinatorOptions, Target, target_for
from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.model import Allocation, TxnOp, TxnVerb
from shepard_lib.plan import Plan, PlanStore
from shepard_lib.rollout import RollingRestart
from shepard_lib.session import Session
from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.scenario import web_scenario

SCALE = 25.0
KEYS = Keyspace()
SCOPE = TaskScope("web", "app", "server")
PLAN_KEY = KEYS.task_lock_key(SCOPE)


def scenario(
    count: int,
    concurrency: int | None = 1,
    *,
    nodes: int = 3,
    seed: int = 8,
    group_meta: Mapping[str, str] | None = None,
    unhealthy_if_broken: bool = True,
) -> dict[str, Any]:
    """Job ``web`` (``web_scenario``) on ``node-1`` .. ``node-<nodes>``; ``concurrency``: the job's meta
    ``shepard_concurrency`` (None: no meta); ``group_meta``: the group's meta."""
    spec = web_scenario(
        count=count,
        nodes=[f"node-{n}" for n in range(1, nodes + 1)],
        concurrency=concurrency,
        seed=seed,
        unhealthy_if_broken=unhealthy_if_broken,
    )
    if group_meta:
        spec["jobs"][0]["groups"][0]["meta"] = dict(group_meta)
    return spec


def restarts_by_alloc(sim: SimCluster) -> Counter[str]:
    """How many times the sim restarted each allocation."""
    return Counter(r.alloc_id for r in sim.restarts())


def sets_trigger(ops: Sequence[TxnOp]) -> bool:
    """Whether a txn writes a trigger key (a trigger, not a plan write)."""
    return any(op.verb == TxnVerb.SET and op.key.startswith(KEYS.keys_prefix()) for op in ops)


class Cluster:
    """Backends, config and helpers on the sim's clock (or a skewed one), for job ``web``."""

    TIMING: ClassVar[Mapping[str, float]] = {
        "session_ttl": 50.0,  # 2 s real at SCALE: no sub-second real TTL on a busy machine
        "lock_delay": 2.0,
        "min_healthy_time": 2.0,
        "healthy_deadline": 20.0,
    }
    """Cluster seconds of the configuration's timing settings; ``changes`` override them."""

    def __init__(
        self, sim: SimCluster, clock: Clock | None = None, token: str | None = None, **changes: Any
    ) -> None:
        self.sim = sim
        self.clock = clock or sim.clock
        self.cfg: ShepardConfig = replace(
            default_config(),
            consul=ConsulConfig(address=sim.consul_addr, token=token),
            nomad=NomadConfig(address=sim.nomad_addr, token=token),
            **{**self.TIMING, **changes},
        )
        self.consul = ConsulBackend(self.cfg.consul, self.clock)
        self.nomad = NomadBackend(self.cfg.nomad, self.clock)
        self.options = CoordinatorOptions.from_config(self.cfg)
        self.plans = PlanStore(self.consul, clock=self.clock)

    def allocs(self) -> list[Allocation]:
        """The job's allocations Nomad keeps running, by index."""
        live = [a for a in self.nomad.job_allocations("web") if a.desired_status == "run"]
        return sorted(live, key=lambda a: a.index)

    def session(self, name: str) -> Session:
        return Session(
            self.consul, name, ttl=self.cfg.session_ttl, lock_delay=self.cfg.lock_delay, clock=self.clock
        )

    def coordinator(
        self, session: Session, name: str, consul: ConsulAPI | None = None, **kwargs: Any
    ) -> Coordinator:
        """A coordinator on ``session``, talking to ``consul`` (a test's proxy) or to the sim's Consul."""
        return Coordinator(
            consul or self.consul,
            self.nomad,
            KEYS,
            session,
            self.options,
            clock=self.clock,
            name=name,
            **kwargs,
        )

    def rollout(self, **kwargs: Any) -> RollingRestart:
        return RollingRestart(self.consul, self.nomad, self.cfg, clock=self.clock, **kwargs)

    def plan(self) -> Plan:
        """The plan of ``web/app/server``, which must exist."""
        plan = self.plans.load(PLAN_KEY)
        assert plan is not None
        return plan

    def target(self, alloc: Allocation) -> Target:
        return target_for(alloc, "server", self.nomad.job("web"))
