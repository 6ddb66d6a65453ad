"""``shepard agent`` as a process: signals, exit codes, an agent killed mid-rollout (SIGKILL).

Sim-only (the agents read each simulated node's data dir). Each agent is a real ``shepard agent``
process with a config file naming its node's Nomad agent, data dir and the sim's time scale.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_support import KEYS, SCALE, complete, read_plan, scenario, wait_plan, wait_until

from shepard_lib.keyspace import Keyspace, TaskScope
from shepard_lib.plan import MemberState
from shepard_lib.sim import SimCluster
from shepard_lib.sim.consul import ConsulServer
from shepard_lib.sim.nomad.restarts import peak_concurrency
from shepard_lib.sim.pytest_plugin import SimClusterFactory

SHEPARD = str(Path(sys.executable).parent / "shepard")
TTL = 30.0  # 1.5 s real at SCALE: no sub-second real TTL on a busy machine
LOCK_DELAY = 2.0


@pytest.fixture(autouse=True)
def _isolated(no_client_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEPARD_CONFIG_PATH", raising=False)


def write_config(sim: SimCluster, node: str, path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "consul": {"address": sim.consul_addr},
        "nomad": {"address": sim.nomad_agent_addr(node)},
        "nomad_data_dir": str(sim.node_data_dir(node)),
        "time_scale": SCALE,
        "settle_time": "2s",
        "min_healthy_time": "1s",
        "healthy_deadline": "1m",
        "session_ttl": f"{TTL:g}s",
        "lock_delay": f"{LOCK_DELAY:g}s",
        "shutdown_timeout": "10s",
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class AgentProcess:
    """A running ``shepard agent``; its stderr goes to a file the test can read."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [SHEPARD, "agent", "--config", str(config), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log_file.close()


@contextmanager
def agent_processes(
    sim: SimCluster, tmp_path: Path, nodes: list[str], *args: str, **changes: Any
) -> Iterator[dict[str, AgentProcess]]:
    """One ``shepard agent [args]`` per node, each started once its heartbeat is held."""
    with ExitStack() as stack:
        running = {}
        for node in nodes:
            config = write_config(sim, node, tmp_path / f"{node}.yaml", **changes)
            process = AgentProcess(config, tmp_path / f"{node}.log", *args)
            stack.callback(process.stop)
            running[node] = process
        for node, process in running.items():
            wait_until(
                sim,
                lambda n=node, p=process: heartbeat_session(sim, n) is not None or p.proc.poll() is not None,
                f"the agent of {node} holds its heartbeat",
            )
            assert process.proc.poll() is None, process.text()
        yield running


def heartbeat_session(sim: SimCluster, node: str, keys: Keyspace = KEYS) -> str | None:
    entry = sim.consul_state.kv_get(keys.node_key(node))
    return entry.session if entry is not None else None


def slot_holder(sim: SimCluster, scope: TaskScope, keys: Keyspace = KEYS) -> tuple[str, str] | None:
    """(session, holder text) of slot 0 of ``scope``, None when free."""
    entry = sim.consul_state.kv_get(keys.slot_key(scope, 0))
    if entry is None or entry.session is None:
        return None
    return entry.session, json.loads(entry.text())["holder"]


def session_exists(sim: SimCluster, session: str) -> bool:
    return sim.consul_state.read(lambda: sim.consul_state.sessions.get(session) is not None)


def test_sigterm_while_holding_a_slot_releases_it_destroys_the_session_and_exits_0(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    scope = TaskScope("web", "app", "server")

    def in_flight() -> list[str]:
        plan, _ = read_plan(sim)
        return [a for a, m in plan.members.items() if m.state is MemberState.RESTARTING] if plan else []

    # A long min_healthy_time keeps the slot held; shutdown_timeout lets the restart not finish.
    with agent_processes(sim, tmp_path, ["n1"], min_healthy_time="5m", healthy_deadline="10m") as running:
        agent = running["n1"]
        session = heartbeat_session(sim, "n1")
        assert session is not None
        sim.set_key("config/web", "v2")
        wait_until(sim, lambda: len(in_flight()) == 1, "the agent restarts a member")
        assert slot_holder(sim, scope) == (session, slot_holder(sim, scope)[1])  # type: ignore[index]
        (member,) = in_flight()
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(timeout=sim.clock.real(10.0) + 30)
        log = agent.text()
    assert code == 0, log
    assert slot_holder(sim, scope) is None, "the slot was released"
    assert heartbeat_session(sim, "n1") is None, "the heartbeat was released"
    assert not session_exists(sim, session), "the session was destroyed"
    assert "Traceback" not in log, log
    plan, _ = read_plan(sim)
    assert plan is not None and in_flight() == [member], "the restart in flight stays restarting"
    assert plan.members[member].session == session, "held by the destroyed session: reclaimable"

    # Another participant (an operator's `shepard restart`, joining the rollout) reclaims it.
    config = write_config(sim, "n1", tmp_path / "operator.yaml", min_healthy_time="1s")
    result = subprocess.run(
        [SHEPARD, "restart", "web", "--config", str(config)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"alloc {member}: reclaimed from n1" in result.stderr, result.stderr
    assert "event=reclaimed" in result.stderr, result.stderr
    plan = wait_plan(sim, complete(2))
    assert plan.members[member].holder_name not in (None, "n1"), "finished by the reclaimer"
    counts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert counts == Counter({a: 1 for a in plan.members}), "the reclaimed restart was not done twice"


def _main_thread_asleep(pid: int) -> bool:
    """Whether the main thread of process ``pid`` sleeps in the kernel (state S in /proc)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "S"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc/<pid>/task and tgkill")
def test_a_sigterm_the_kernel_gives_to_another_thread_than_the_main_one_still_stops_the_agent(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    """A process's signal may go to any of its threads (the kernel picks one that does not block it):
    CPython only flags it there, and the handler runs when the main thread next runs Python code.
    Found as an agent that ignored SIGTERM under load; here the signal goes to another thread on purpose."""
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    with agent_processes(sim, tmp_path, ["n1"]) as running:
        agent = running["n1"]
        pid = agent.proc.pid
        wait_until(sim, lambda: "agent of node n1 started" in agent.text(), "the agent has started")
        wait_until(sim, lambda: _main_thread_asleep(pid), "the agent's main thread waits for a signal")
        others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
        assert others, "the agent runs its parts in threads"
        assert ctypes.CDLL(None, use_errno=True).tgkill(pid, others[-1], signal.SIGTERM) == 0
        code = agent.proc.wait(timeout=30)
        log = agent.text()
    assert code == 0, log
    assert "stopping" in log and heartbeat_session(sim, "n1") is None, log


def test_sighup_with_a_bad_config_keeps_the_old_one_and_with_a_good_one_applies_it(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    # No shepard_concurrency in the job: a new plan takes the agent's concurrency.
    sim = sim_cluster_factory(scenario(count=3, concurrency=None, nodes=1), time_scale=SCALE)
    with agent_processes(sim, tmp_path, ["n1"], concurrency=1) as running:
        agent = running["n1"]
        config = tmp_path / "n1.yaml"
        good = config.read_text(encoding="utf-8")
        assert "concurrency: 1\n" in good
        config.write_text(good.replace("concurrency: 1\n", "concurrency: many\n"), encoding="utf-8")
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(sim, lambda: "config reload failed" in agent.text(), "the bad reload is logged")
        assert "concurrency: expected an integer >= 1" in agent.text()
        assert agent.proc.poll() is None, "a bad config does not stop the agent"
        config.write_text(good.replace("concurrency: 1\n", "concurrency: 2\n"), encoding="utf-8")
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(sim, lambda: "config reloaded" in agent.text(), "the good reload is logged")
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(3))
        assert agent.proc.poll() is None
        log = agent.text()
    assert len(plan.members) == 3, "the agent still works after both reloads"
    assert plan.concurrent_lock_count == 2, "the reloaded concurrency is in effect"
    assert "change only when the agent restarts" not in log, log


@pytest.mark.parametrize("lock_scope", ["cluster", "node"])
def test_an_agent_killed_mid_rollout_leaves_nothing_stuck(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path, lock_scope: str
) -> None:
    sim = sim_cluster_factory(scenario(count=6, concurrency=1, nodes=3), time_scale=SCALE)
    keys = Keyspace(lock_scope=lock_scope)  # type: ignore[arg-type]
    nodes = ["n1", "n2", "n3"]

    def scope_of(node: str) -> TaskScope:
        return TaskScope("web", "app", "server", node=node if lock_scope == "node" else None)

    with agent_processes(sim, tmp_path, nodes, lock_scope=lock_scope) as running:
        sessions = {node: heartbeat_session(sim, node, keys) for node in nodes}
        sim.set_key("config/web", "v2")
        busy: list[str] = []

        def victim_busy() -> bool:
            """An agent holds a slot (cluster-wide plan: the lane) once its node's two changes are in."""
            for node in ["n2"] if lock_scope == "node" else nodes:
                held = slot_holder(sim, scope_of(node), keys)
                plan, _ = read_plan(sim, scope_of(node), keys)
                registered = sum(m.node == node for m in plan.members.values()) if plan else 0
                if held is not None and held[0] == sessions[node] and registered == 2:
                    busy.append(node)
                    return True
            return False

        # Killed while it holds a slot, once it has registered both of its node's changes.
        wait_until(sim, victim_busy, "an agent holds a restart slot with both its members registered")
        victim_node = busy[0]
        victim, victim_scope = sessions[victim_node], scope_of(victim_node)
        running[victim_node].proc.kill()
        killed_at = sim.clock.monotonic()
        wait_until(
            sim, lambda: (slot_holder(sim, victim_scope, keys) or ("",))[0] != victim, "the slot is freed"
        )
        freed_after = sim.clock.monotonic() - killed_at
        plans = {}
        for node in nodes if lock_scope == "node" else [None]:
            scope = TaskScope("web", "app", "server", node=node)
            plans[node] = wait_plan(sim, complete(2 if node else 6), scope=scope, keys=keys)
    # Consul invalidates a session at most 2 x TTL after its last renew; TTL / 2 allows for this
    # test thread being scheduled late on a busy machine.
    assert freed_after <= 2 * TTL + LOCK_DELAY + TTL / 2, f"slot freed {freed_after:.1f}s after the kill"
    members = {a for plan in plans.values() for a in plan.members}
    counts = Counter(r.alloc_id for r in sim.restarts() if r.job == "web")
    assert set(counts) == members and len(members) == 6
    assert all(n == 1 for n in counts.values()), counts
    per_node = Counter(r.node for r in sim.restarts())
    assert per_node[victim_node] == 2, "the dead agent's members were driven by the others"
    if lock_scope == "cluster":
        assert sim.peak_concurrency("web", "app", "server") == 1
    else:
        now = sim.clock.time()
        for node in ("n1", "n2", "n3"):
            on_node = [r for r in sim.restarts() if r.node == node]
            assert peak_concurrency(on_node, now, "web", "app", "server") == 1, f"{node}: more than 1 at once"


def test_startup_with_a_bad_config_exits_2_and_with_an_unreachable_cluster_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("concurrency: 0\n", encoding="utf-8")
    result = subprocess.run(
        [SHEPARD, "agent", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "concurrency: expected an integer >= 1, got '0'" in result.stderr
    assert "Traceback" not in result.stderr

    (tmp_path / "data" / "alloc").mkdir(parents=True)
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(
        yaml.safe_dump(
            {
                "consul": {"address": "127.0.0.1:1"},
                "nomad": {"address": "127.0.0.1:1"},
                "nomad_data_dir": str(tmp_path / "data"),
                "time_scale": 50,
            }
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [SHEPARD, "agent", "--config", str(unreachable)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "shepard: nomad agent.self failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_consul_outage_is_one_log_line_not_one_per_retry_and_the_agent_resumes(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    with agent_processes(sim, tmp_path, ["n1"]) as running:
        agent = running["n1"]
        port = sim.consul_server.port
        sim.consul_server.stop()
        wait_until(sim, lambda: "Consul unreachable" in agent.text(), "the outage is logged")
        sim.clock.sleep(3 * TTL)  # several retries of every kind, and the session's TTL, pass
        sim.consul_server = ConsulServer(sim.consul_state, port=port).start()
        wait_until(sim, lambda: "Consul reachable again" in agent.text(), "the end of the outage is logged")
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(2))
        log = agent.text()
    assert len(plan.members) == 2, "the agent works again with a new session"
    assert log.count("shepard_lib.agent.outage: Consul unreachable") == 1, log
    assert "attempt 1/5 failed" not in log and "renew failed" not in log, log


def test_an_agent_restarted_after_a_crash_works_and_takes_its_heartbeat_when_the_old_session_ends(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    sim = sim_cluster_factory(scenario(count=2, concurrency=1, nodes=1), time_scale=SCALE)
    # A TTL long enough that the new process is up before the crashed one's session ends.
    with agent_processes(sim, tmp_path, ["n1"], session_ttl="2m") as running:
        old = heartbeat_session(sim, "n1")
        running["n1"].proc.kill()  # as systemd's Restart=on-failure would find it
        running["n1"].proc.wait(30)
        config = tmp_path / "n1.yaml"
        restarted = AgentProcess(config, tmp_path / "n1-again.log")
        try:
            wait_until(sim, lambda: "is held by another session" in restarted.text(), "the refusal is logged")
            wait_until(
                sim,
                lambda: (s := heartbeat_session(sim, "n1")) is not None and s != old,
                "the new agent holds the heartbeat once the crashed one's session ended",
                timeout=1200.0,
            )
            sim.set_key("config/web", "v2")
            plan = wait_plan(sim, complete(2))
        finally:
            restarted.stop()
    assert all(m.holder_name == "n1" for m in plan.members.values())


def test_each_decision_is_one_json_line_naming_its_task_and_allocation(
    sim_cluster_factory: SimClusterFactory, tmp_path: Path
) -> None:
    sim = sim_cluster_factory(scenario(count=3, concurrency=1, nodes=1), time_scale=SCALE)
    with agent_processes(sim, tmp_path, ["n1"], "--log-format", "json") as running:
        agent = running["n1"]
        sim.set_key("config/web", "v2")
        plan = wait_plan(sim, complete(3))
        wait_until(sim, lambda: agent.text().count('"event": "healthy"') == 3, "every outcome is logged")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=120) == 0
        lines = [json.loads(line) for line in agent.text().splitlines()]  # every line is JSON
    refs = {a.id: f"n1/web/app/server[{a.index}]" for a in sim.nomad.allocations("web")}
    decisions = [line for line in lines if "event" in line]
    for line in decisions:
        alloc_id = line["alloc_id"]
        assert line["ref"] == refs[alloc_id], line
        assert line["message"].startswith(f"{refs[alloc_id]} alloc {alloc_id}: "), line
    by_alloc: dict[str, list[str]] = {}
    for line in decisions:
        by_alloc.setdefault(line["alloc_id"], []).append(line["event"])
    assert set(by_alloc) == set(plan.members)
    for alloc_id, events in by_alloc.items():
        # One agent keeps its slot from member to member (a lane), and gives it back once at the end.
        taken = [e for e in events if e in ("slot_acquired", "slot_kept")]
        assert len(taken) == 1, (alloc_id, events)
        released = [e for e in events if e == "slot_released"]
        assert events == ["change", "registered", *taken, "triggered", "healthy", *released], (
            alloc_id,
            events,
        )
    assert Counter(e for events in by_alloc.values() for e in events)["slot_released"] == 1, by_alloc
