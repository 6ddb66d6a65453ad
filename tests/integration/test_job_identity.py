"""Jobs whose ID is not their name, and dispatched children, restart through Shepard's trigger keys.

Shepard keys triggers, plans and slots by the job's ID; ``local/shepard.tpl`` reads the same ID
(``NOMAD_JOB_ID``). Two jobs where a name-based key would miss: ``job "web-prod" { name = "web" }``
and a child of a parameterized job (ID ``batch/dispatch-<unix>-<hex>``, escaped to one key
segment). Both are restarted with ``restart_method: consul_key``, so only the template can restart
them: a member whose template reads another key fails at ``healthy_deadline``.

Each test runs against the simulator and, marked ``real_cluster``, against the cluster named by
``CONSUL_HTTP_ADDR`` / ``NOMAD_ADDR`` (``CONSUL_HTTP_TOKEN`` / ``NOMAD_TOKEN`` under ACLs) with
``SHEPARD_TEST_PREFIX`` (the key prefix the jobs' templates read) and:

* ``SHEPARD_TEST_RENAMED_JOB``: the ID of a throwaway service job whose ``name`` differs from its
  ID and whose tasks render ``local/shepard.tpl`` (``shepard template``);
* ``SHEPARD_TEST_PARAMETERIZED_JOB``: the ID of a parameterized batch job with no required meta
  whose tasks render ``local/shepard.tpl`` and run until stopped; the test dispatches one child,
  restarts it and purges it.

Restarts are counted from Nomad's task states, the same way in both variants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, RestartMethod, ShepardConfig, default_config
from shepard_lib.keyspace import Keyspace, TaskRef, shepard_template
from shepard_lib.rollout import RollingRestart, RolloutOptions, is_shepard_managed
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SCALE = 25.0
REAL_SKIP = (
    "set CONSUL_HTTP_ADDR and NOMAD_ADDR (and CONSUL_HTTP_TOKEN / NOMAD_TOKEN) to run against a real cluster"
)
PREFIX_SKIP = "set SHEPARD_TEST_PREFIX to the key prefix the test jobs' templates read"
RENAMED_SKIP = (
    "set SHEPARD_TEST_RENAMED_JOB to the ID of a throwaway job whose name differs from its ID and whose "
    "tasks render local/shepard.tpl"
)
PARAMETERIZED_SKIP = (
    "set SHEPARD_TEST_PARAMETERIZED_JOB to the ID of a parameterized batch job (no required meta) whose "
    "tasks render local/shepard.tpl and run until stopped"
)
# The template Shepard printed before it keyed by NOMAD_JOB_ID.
BY_NAME_TEMPLATE = shepard_template().replace('env "NOMAD_JOB_ID"', 'env "NOMAD_JOB_NAME"')


def _group(name: str, count: int, task: str, service: str, **extra: Any) -> dict[str, Any]:
    spec = {"name": task, "service": service, **extra}
    spec.setdefault("shepard", True)
    return {"name": name, "count": count, "tasks": [spec]}


SCENARIO: dict[str, Any] = {
    "seed": 11,
    "nodes": ["node-1", "node-2"],
    "jobs": [
        {"name": "web", "id": "web-prod", "groups": [_group("app", 3, "server", "web")]},
        {
            "name": "batch",
            "parameterized": {"meta_optional": ["tenant"]},
            "groups": [_group("work", 2, "worker", "worker")],
        },
        {
            "name": "old",
            "id": "old-prod",
            "groups": [
                _group(
                    "app",
                    1,
                    "server",
                    "old",
                    shepard=False,
                    templates=[
                        {
                            "data": BY_NAME_TEMPLATE,
                            "destination": "local/shepard.tpl",
                            "change_mode": "restart",
                        }
                    ],
                )
            ],
        },
    ],
    "timing": {"restart": "1s", "healthy_after": "500ms"},
}


@dataclass
class Cluster:
    """What a test needs of the sim or a real cluster."""

    kind: str
    config: ShepardConfig
    clock: Clock
    renamed_job: str | None
    parameterized_job: str | None

    def backends(self) -> tuple[ConsulBackend, NomadBackend]:
        return ConsulBackend(self.config.consul, self.clock), NomadBackend(self.config.nomad, self.clock)

    def nomad_url(self, *segments: str) -> str:
        """``<nomad>/v1/<segments>``, each segment percent-encoded (a job ID may hold ``/``)."""
        path = "/".join(urllib.parse.quote(s, safe="") for s in segments)
        return f"{self.config.nomad.address.rstrip('/')}/v1/{path}"

    def nomad_headers(self) -> dict[str, str]:
        return {"X-Nomad-Token": self.config.nomad.token} if self.config.nomad.token else {}


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def cluster(request: pytest.FixtureRequest, sim_cluster_factory: SimClusterFactory) -> Iterator[Cluster]:
    if request.param == "sim":
        sim = sim_cluster_factory(SCENARIO, time_scale=SCALE)
        config = dataclasses.replace(
            default_config(),
            consul=ConsulConfig(address=sim.consul_addr),
            nomad=NomadConfig(address=sim.nomad_addr),
            session_ttl=10.0,
            lock_delay=2.0,
            min_healthy_time=2.0,
            healthy_deadline=300.0,  # 12 real seconds of margin on a busy machine; a pass never waits it
        )
        yield Cluster("sim", config, sim.clock, "web-prod", "batch")
        return
    if not (os.environ.get("CONSUL_HTTP_ADDR") and os.environ.get("NOMAD_ADDR")):
        pytest.skip(REAL_SKIP)
    prefix = os.environ.get("SHEPARD_TEST_PREFIX")
    if not prefix:
        pytest.skip(PREFIX_SKIP)
    from shepard_lib.config import load_config

    config = dataclasses.replace(
        load_config(env=os.environ), key_prefix=prefix, min_healthy_time=2.0, healthy_deadline=300.0
    )
    yield Cluster(
        "real",
        config,
        Clock(),
        os.environ.get("SHEPARD_TEST_RENAMED_JOB"),
        os.environ.get("SHEPARD_TEST_PARAMETERIZED_JOB"),
    )


def _restart_counts(nomad: NomadBackend, job_id: str, tasks: set[str]) -> dict[tuple[str, str], int]:
    return {
        (a.id, t): a.task_states[t].restarts
        for a in nomad.job_allocations(job_id)
        if a.running
        for t in tasks
        if t in a.task_states
    }


def _managed_tasks(nomad: NomadBackend, job_id: str) -> set[str]:
    return {t.name for g in nomad.job(job_id).groups for t in g.tasks if is_shepard_managed(t)}


def _delete_keys_of(consul: ConsulBackend, keyspace: Keyspace, job_id: str, *, triggers: bool) -> None:
    """Delete the plans and slots of ``job_id`` and, with ``triggers``, its trigger keys.

    A trigger key stays while its job runs: the template reads it, so deleting it restarts the task.
    """
    for key in consul.keys(keyspace.locks_prefix()):
        with contextlib.suppress(ValueError):
            if keyspace.parse_lock_key(key)[0].job == job_id:
                consul.delete(key)
    for key in consul.keys(keyspace.keys_prefix()) if triggers else []:
        with contextlib.suppress(ValueError):
            if keyspace.parse_trigger_key(key).job == job_id:
                consul.delete(key)


def _rollout_restarts_each_once(cluster: Cluster, job_id: str, *, gone_after: bool = False) -> None:
    """Restart ``job_id`` through the trigger keys; every managed task restarted exactly once.

    Its keys are deleted afterwards (its trigger keys only when ``gone_after``: the job is purged next).
    """
    consul, nomad = cluster.backends()
    keyspace = Keyspace(cluster.config.key_prefix, cluster.config.lock_scope)
    try:
        tasks = _managed_tasks(nomad, job_id)
        assert tasks, f"job {job_id} has no task that renders local/shepard.tpl"
        before = _restart_counts(nomad, job_id, tasks)
        assert before, f"job {job_id} has no running allocation"
        config = dataclasses.replace(cluster.config, concurrency=2, restart_method=RestartMethod.CONSUL_KEY)
        result = RollingRestart(consul, nomad, config, clock=cluster.clock).run(job_id, RolloutOptions())
        assert result.ok, result.to_dict()
        assert {o.target.ref.job for o in result.restarted} == {job_id}
        after = _restart_counts(nomad, job_id, tasks)
        assert {k: after[k] - n for k, n in before.items()} == dict.fromkeys(before, 1)
        for outcome in result.restarted:
            # the key the coordinator wrote (and the template read): the job ID is one segment
            key = keyspace.trigger_key(outcome.target.ref)
            assert key.count("/") == keyspace.keys_prefix().count("/") + 4, key
            assert keyspace.parse_trigger_key(key).job == job_id
            assert consul.get(key, consistent=True) is not None, key
    finally:
        _delete_keys_of(consul, keyspace, job_id, triggers=gone_after)
        consul.close()
        nomad.close()


def test_a_job_whose_name_differs_from_its_id_restarts_through_its_trigger_keys(cluster: Cluster) -> None:
    if cluster.renamed_job is None:
        pytest.skip(RENAMED_SKIP)
    _, nomad = cluster.backends()
    try:
        job = nomad.job(cluster.renamed_job)
    finally:
        nomad.close()
    assert job.name != job.id, f"{job.id}: its name is its ID, so this test would prove nothing"
    _rollout_restarts_each_once(cluster, job.id)


def test_a_dispatched_child_restarts_through_its_escaped_trigger_keys(cluster: Cluster) -> None:
    if cluster.parameterized_job is None:
        pytest.skip(PARAMETERIZED_SKIP)
    resp = requests.post(
        cluster.nomad_url("job", cluster.parameterized_job, "dispatch"),
        json={"Meta": {"tenant": "7"}} if cluster.kind == "sim" else {},
        headers=cluster.nomad_headers(),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    child = resp.json()["DispatchedJobID"]
    try:
        assert child.startswith(f"{cluster.parameterized_job}/dispatch-"), child
        _wait_running(cluster, child)
        _, nomad = cluster.backends()
        try:
            job = nomad.job(child)
        finally:
            nomad.close()
        assert job.name == job.id == child
        _rollout_restarts_each_once(cluster, child, gone_after=cluster.kind == "real")  # purged below
    finally:
        if cluster.kind == "real":
            requests.delete(
                cluster.nomad_url("job", child),
                params={"purge": "true"},
                headers=cluster.nomad_headers(),
                timeout=30,
            )


def test_a_template_reading_the_job_name_never_restarts_a_renamed_job(cluster: Cluster) -> None:
    """The defect this layout fixes, reproduced: the trigger key is written, the template reads another."""
    if cluster.kind != "sim":
        pytest.skip("needs a job whose template reads NOMAD_JOB_NAME on purpose; the simulator builds one")
    consul, nomad = cluster.backends()
    try:
        config = dataclasses.replace(
            cluster.config, concurrency=1, restart_method=RestartMethod.CONSUL_KEY, healthy_deadline=20.0
        )
        result = RollingRestart(consul, nomad, config, clock=cluster.clock).run("old-prod", RolloutOptions())
        assert not result.ok and not result.restarted
        (failed,) = result.failed
        ref = failed.target.ref
        assert ref.job == "old-prod"
        assert consul.get(Keyspace().trigger_key(ref), consistent=True) is not None, "Shepard wrote its key"
        wrong = TaskRef(ref.node, "old", ref.group, ref.task, ref.alloc_index)
        assert consul.get(Keyspace().trigger_key(wrong), consistent=True) is None
        assert _restart_counts(nomad, "old-prod", {"server"}) == {(failed.target.alloc_id, "server"): 0}
    finally:
        consul.close()
        nomad.close()


def _wait_running(cluster: Cluster, job_id: str, timeout: float = 120.0) -> None:
    """Wait (blocking queries) until ``job_id`` has allocations and every one of them is running."""
    deadline = time.monotonic() + timeout
    index = 0
    while True:
        resp = requests.get(
            cluster.nomad_url("job", job_id, "allocations"),
            params={"index": index, "wait": "5s"},
            headers=cluster.nomad_headers(),
            timeout=60,
        )
        resp.raise_for_status()
        index = int(resp.headers["X-Nomad-Index"])
        allocs = resp.json()
        if allocs and all(a["ClientStatus"] == "running" for a in allocs):
            return
        assert time.monotonic() < deadline, (
            f"{job_id}: allocations not all running after {timeout}s: {allocs}"
        )
