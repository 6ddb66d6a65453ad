"""The simulator's template runner: how its Nomad client renders templates from Consul.

A test of the sim, not of Nomad: it reads the sim's own task states, files and restart record. The
behaviour copied is Nomad's template runner (consul-template, ``change_mode``, splay); a real
cluster's is exercised by the real-cluster variant of ``test_real_cluster.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shepard_lib.sim import SimCluster

SCALE = 50.0


def _scenario(templates: list[dict[str, Any]], count: int = 2, **task: Any) -> dict[str, Any]:
    return {
        "seed": 5,
        "nodes": [{"name": "n1", "class": "web", "meta": {"rack": "r7"}}, "n2"],
        "jobs": [
            {
                "name": "web",
                "meta": {"team": "edge"},
                "groups": [
                    {
                        "name": "app",
                        "count": count,
                        "tasks": [{"name": "server", "templates": templates, **task}],
                    }
                ],
            }
        ],
        "timing": {"restart": "1s", "healthy_after": "500ms"},
        "keys": {"config/web": "v1"},
    }


def _wait(pred: Callable[[], bool], real_seconds: float = 5.0) -> None:
    deadline = time.monotonic() + real_seconds
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _task_dir(sim: SimCluster, index: int = 0, task: str = "server") -> Path:
    alloc = sim.nomad.allocation("web", "app", index)
    return sim.node_data_dir(alloc.node.name) / "alloc" / alloc.id / task


def test_templates_render_into_the_task_dir_before_the_task_starts(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(
        _scenario([{"key": "config/web", "destination": "local/app.conf"}], shepard=True)
    )
    local = _task_dir(sim) / "local"
    assert (local / "app.conf").read_text() == "v1"
    assert (local / "shepard.tpl").read_text() == "\n", (
        "no trigger value yet: keyOrDefault renders the default"
    )
    alloc = sim.nomad.allocation("web", "app", 0)
    root = sim.node_data_dir("n1") / "alloc" / alloc.id
    for sub in ("alloc/logs", "alloc/data", "alloc/tmp", "server/local", "server/secrets", "server/tmp"):
        assert (root / sub).is_dir(), sub
    assert [e.type for e in alloc.task_states["server"].events] == ["Received", "Task Setup", "Started"]


def test_restart_mode_change_rerenders_and_restarts_the_task(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(
        _scenario([{"key": "config/web", "destination": "local/app.conf", "change_mode": "restart"}])
    )
    sim.set_key("config/web", "v2")
    _wait(lambda: len(sim.restarts()) == 2)
    sim.wait_settled()
    assert (_task_dir(sim, 0) / "local/app.conf").read_text() == "v2"
    assert {(r.alloc_index, r.cause) for r in sim.restarts()} == {(0, "template"), (1, "template")}
    assert all(a.task_states["server"].restarts == 1 for a in sim.nomad.allocations("web"))


def test_noop_change_rewrites_the_file_without_a_restart(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(_scenario([{"key": "config/web", "destination": "local/app.conf"}]))
    path = _task_dir(sim) / "local/app.conf"
    sim.set_key("config/web", "v2")
    _wait(lambda: path.read_text() == "v2")
    sim.wait_caught_up()
    assert sim.restarts() == []
    assert all(a.task_states["server"].restarts == 0 for a in sim.nomad.allocations("web"))


def test_identical_content_is_not_a_change(sim_cluster_factory: Any) -> None:
    same = '{{ key "config/web" | replaceAll "v1" "same" | replaceAll "v2" "same" }}'
    sim = sim_cluster_factory(
        _scenario([{"data": same, "destination": "local/app.conf", "change_mode": "restart"}], count=1)
    )
    path = _task_dir(sim) / "local/app.conf"
    mtime = path.stat().st_mtime_ns
    sim.set_key("config/web", "v2")  # a new value that renders the same text
    sim.set_key("config/web", "v2")  # a write of the same value
    sim.set_key("other/key", "x")
    sim.wait_caught_up()
    assert path.read_text() == "same" and path.stat().st_mtime_ns == mtime
    assert sim.restarts() == []


def test_env_has_the_task_environment_and_node_attributes_only(sim_cluster_factory: Any) -> None:
    names = [
        "NOMAD_ALLOC_ID",
        "NOMAD_ALLOC_INDEX",
        "NOMAD_ALLOC_NAME",
        "NOMAD_JOB_NAME",
        "NOMAD_JOB_ID",
        "NOMAD_GROUP_NAME",
        "NOMAD_TASK_NAME",
        "NOMAD_NAMESPACE",
        "NOMAD_DC",
        "NOMAD_REGION",
        "NOMAD_ALLOC_DIR",
        "NOMAD_TASK_DIR",
        "NOMAD_SECRETS_DIR",
        "node.unique.name",
        "node.unique.id",
        "node.datacenter",
        "node.class",
        "attr.unique.hostname",
        "meta.rack",
        "NOMAD_META_team",
        "NOMAD_NODE_NAME",
    ]
    data = "\n".join(f'{n}={{{{ env "{n}" }}}}' for n in names)
    sim = sim_cluster_factory(_scenario([{"data": data, "destination": "local/env.txt"}], count=1))
    alloc = sim.nomad.allocation("web", "app", 0)
    rendered = dict(
        line.split("=", 1) for line in (_task_dir(sim) / "local/env.txt").read_text().splitlines()
    )
    assert rendered == {
        "NOMAD_ALLOC_ID": alloc.id,
        "NOMAD_ALLOC_INDEX": "0",
        "NOMAD_ALLOC_NAME": "web.app[0]",
        "NOMAD_JOB_NAME": "web",
        "NOMAD_JOB_ID": "web",
        "NOMAD_GROUP_NAME": "app",
        "NOMAD_TASK_NAME": "server",
        "NOMAD_NAMESPACE": "default",
        "NOMAD_DC": "dc1",
        "NOMAD_REGION": "global",
        "NOMAD_ALLOC_DIR": "/alloc",
        "NOMAD_TASK_DIR": "/local",
        "NOMAD_SECRETS_DIR": "/secrets",
        "node.unique.name": "n1",
        "node.unique.id": alloc.node.id,
        "node.datacenter": "dc1",
        "node.class": "web",
        "attr.unique.hostname": "n1",
        "meta.rack": "r7",
        "NOMAD_META_team": "edge",
        "NOMAD_NODE_NAME": "",
    }


def test_raw_exec_tasks_see_host_paths(sim_cluster_factory: Any) -> None:
    data = '{{ env "NOMAD_TASK_DIR" }}'
    sim = sim_cluster_factory(
        _scenario([{"data": data, "destination": "local/dir.txt"}], count=1, driver="raw_exec")
    )
    local = _task_dir(sim) / "local"
    assert (local / "dir.txt").read_text() == str(local)


def test_a_missing_key_blocks_the_start_until_it_exists(sim_cluster_factory: Any) -> None:
    sim = sim_cluster_factory(
        _scenario([{"key": "config/later", "destination": "local/later.conf"}], count=1), settle=False
    )
    alloc = sim.nomad.allocation("web", "app", 0)
    sim.wait_caught_up()
    assert alloc.task_states["server"].state == "pending" and alloc.client_status == "pending"
    sim.set_key("config/later", "now")
    sim.wait_settled()
    assert (_task_dir(sim) / "local/later.conf").read_text() == "now"
    assert alloc.task_states["server"].state == "running"


def test_splay_delays_the_restart_by_a_seeded_random_time(sim_cluster_factory: Any) -> None:
    tpl = {"key": "config/web", "destination": "local/app.conf", "change_mode": "restart", "splay": "20s"}
    sim = sim_cluster_factory(_scenario([tpl], count=2))
    sim.set_key("config/web", "v2")
    _wait(lambda: len(sim.restarts()) == 2, real_seconds=25 / SCALE + 2)
    delays = [r.stopped_at - r.requested_at for r in sim.restarts() if r.stopped_at is not None]
    assert all(0 <= d < 20 + 5 for d in delays), delays  # splay < 20 s, plus scheduling slack
    assert max(delays) > 0.5, f"splay should spread the restarts, got {delays}"


def test_signal_mode_records_the_signal_and_does_not_restart(sim_cluster_factory: Any) -> None:
    tpl = {
        "key": "config/web",
        "destination": "local/app.conf",
        "change_mode": "signal",
        "change_signal": "SIGHUP",
    }
    sim = sim_cluster_factory(_scenario([tpl], count=1))
    sim.set_key("config/web", "v2")
    _wait(lambda: len(sim.nomad.signals()) == 1)
    signal = sim.nomad.signals()[0]
    assert (signal.task, signal.signal) == ("server", "SIGHUP")
    events = sim.nomad.allocation("web", "app", 0).task_states["server"].events
    assert events[-1].type == "Signaling" and events[-1].fields["TaskSignal"] == "SIGHUP"
    assert sim.restarts() == []


def test_a_template_outside_the_supported_subset_fails_the_task(sim_cluster_factory: Any) -> None:
    bad = '{{ with service "db" }}{{ end }}'
    sim = sim_cluster_factory(
        _scenario([{"data": bad, "destination": "local/db.conf"}], count=1), settle=False
    )
    alloc = sim.nomad.allocation("web", "app", 0)
    state = alloc.task_states["server"]
    assert state.state == "dead" and state.failed and alloc.client_status == "failed"
    assert state.events[-1].type == "Template"
    assert state.events[-1].display_message.startswith("Template failed: ")
