"""What the benchmarks share: the simulator and the agents in their own processes, and the measures.

- :class:`SimProcess`: ``shepard sim serve --agents`` as a subprocess (its restart record, its
  request counters, its CPU time);
- :class:`AgentHosts`: the agents of every node in one or more ``_agent_host.py`` subprocesses, with
  :func:`agent_config`;
- :func:`scenario`: the job every benchmark rolls out;
- the measures of a rollout from the sim's restart record: :func:`ideal_makespan` (list scheduling
  of the recorded durations on c slots, no overhead), :func:`batch_makespan` (``nomad job restart
  -batch-size=c``: each batch waits for its slowest member), :func:`handoffs`, :func:`peak`;
- :func:`cpu_seconds` from ``/proc``, :func:`percentile`, :func:`machine` (what ran the benchmark).

Times in the restart record are cluster seconds; the benchmarks report them as such.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import requests
import yaml

from shepard_lib.sim.nomad.restarts import RestartRecord, peak_concurrency
from shepard_lib.sim.scenario import web_scenario

HERE = Path(__file__).resolve().parent
JOB, GROUP, TASK, CONFIG_KEY = "web", "app", "server", "config/web"


def scenario(
    allocations: int,
    nodes: int,
    restart: str | dict[str, Any],
    healthy_after: str | dict[str, Any],
    seed: int = 11,
) -> dict[str, Any]:
    """One job of ``allocations`` Shepard-managed instances on ``nodes`` nodes (config template ``noop``)."""
    return web_scenario(
        count=allocations,
        nodes=nodes,
        seed=seed,
        restart=restart,
        healthy_after=healthy_after,
        unhealthy_if_broken=False,
    )


def agent_config(concurrency: int, healthy_deadline: float) -> dict[str, Any]:
    """The agents' settings: defaults, but a short settle and no extra healthy time (the ideal has none)."""
    return {
        "concurrency": concurrency,
        "settle_time": 1.0,
        "min_healthy_time": 0.0,
        "healthy_deadline": healthy_deadline,
        "max_failures": 0,
        # 3 real seconds at the default scale, as in the demo: a renewal starved on a busy machine
        # must not lose a session (15 s would be 0.75 real seconds at scale 20).
        "session_ttl": 60.0,
        "log_level": "WARNING",
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class NodeAgent:
    """A simulated node as ``sim serve --agents`` announces it."""

    node: str
    nomad: str
    data_dir: str


class SimProcess:
    """``shepard sim serve --scenario ... --time-scale ... --agents`` in its own process."""

    def __init__(self, scenario_dict: dict[str, Any], time_scale: float) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="shepard-bench-")
        path = Path(self._tmp.name) / "scenario.yaml"
        path.write_text(yaml.safe_dump(scenario_dict))
        self.time_scale = time_scale
        self.stderr = (Path(self._tmp.name) / "sim.log").open("w+")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-c", "import sys; from shepard_lib.cli import main; sys.exit(main())"),
                *("sim", "serve", "--scenario", str(path), "--time-scale", f"{time_scale:g}"),
                *("--agents", "--data-dir", str(Path(self._tmp.name) / "data")),
            ],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_"))},
        )
        self.nodes: list[NodeAgent] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = dict(w.split("=", 1) for w in line.split()[1:])
            if line.startswith("agent "):
                self.nodes.append(NodeAgent(words["node"], words["nomad"], words["data_dir"]))
            elif line.startswith("ready "):
                self.consul, self.nomad = words["consul"], words["nomad"]
                break
        else:
            self.close()
            raise RuntimeError(f"shepard sim serve exited before it was ready: {self.log_tail()}")
        self.http = requests.Session()

    def log_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def restarts(self) -> list[RestartRecord]:
        """The sim's restart record (``GET /_sim/restarts``)."""
        answer = self.http.get(f"{self.nomad}/_sim/restarts", timeout=60)
        answer.raise_for_status()
        return [RestartRecord(**r) for r in answer.json()]

    def consul_requests(self) -> dict[str, dict[str, int]]:
        """Consul requests by endpoint and method since the last :meth:`reset_consul_requests`."""
        answer = self.http.get(f"{self.consul}/_sim/requests", timeout=60)
        answer.raise_for_status()
        counts: dict[str, dict[str, int]] = answer.json()
        return counts

    def consul_shapes(self) -> dict[str, int]:
        """Consul requests by shape (``GET /_sim/requests?detail``) since the last reset."""
        answer = self.http.get(f"{self.consul}/_sim/requests?detail", timeout=60)
        answer.raise_for_status()
        shapes: dict[str, int] = answer.json()
        return shapes

    def reset_consul_requests(self) -> None:
        self.http.delete(f"{self.consul}/_sim/requests", timeout=60).raise_for_status()

    def nomad_requests(self) -> dict[str, int]:
        """Nomad requests by ``"METHOD endpoint"`` since the sim started."""
        answer = self.http.get(f"{self.nomad}/_sim/requests", timeout=60)
        answer.raise_for_status()
        counts: dict[str, int] = answer.json()
        return counts

    def set_key(self, key: str, value: str) -> None:
        """Write a Consul key as an operator would (one counted request)."""
        self.http.put(f"{self.consul}/v1/kv/{key}", data=value.encode(), timeout=60).raise_for_status()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()
        self._tmp.cleanup()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AgentHosts:
    """The agents of ``nodes``, spread over ``processes`` ``_agent_host.py`` subprocesses."""

    def __init__(
        self, sim: SimProcess, config: dict[str, Any], tasks_per_node: dict[str, int], processes: int = 1
    ) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.stopped: list[str] = []
        self.sessions_lost = 0
        self.warnings: list[str] = []
        self._logs = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        processes = max(1, min(processes, len(sim.nodes)))
        groups = [sim.nodes[i::processes] for i in range(processes)]
        for group in groups:
            spec = {
                "consul": sim.consul,
                "tasks": sum(tasks_per_node.get(n.node, 0) for n in group),
                "config": {"time_scale": sim.time_scale, **config},
                "agents": [n.__dict__ for n in group],
            }
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "_agent_host.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._logs,
                text=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            self.procs.append(proc)
        for proc in self.procs:  # started all at once: the slow part (discovery, inotify) overlaps
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("watching "):
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"an agent host failed to start: {line!r} {tail}")

    def log_tail(self) -> str:
        self._logs.seek(0)
        return self._logs.read()[-3000:]

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def close(self) -> None:
        """Stop every agent (SIGTERM to every host at once) and keep each host's ``stopped ...`` line."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=120)
                self.stopped += [line for line in out.splitlines() if line.startswith("stopped ")]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                self.stopped.append("stopped never (killed)")
        self.procs = []
        self._logs.seek(0)
        lines = self._logs.read().splitlines()
        self._logs.close()
        self.sessions_lost = sum(1 for line in lines if line.startswith("session ") and " lost: " in line)
        self.warnings = [line for line in lines if line.strip()][-20:]

    def threads_left(self) -> int:
        """Threads still alive after ``Agent.stop`` in every host (after :meth:`close`)."""
        return sum(
            int(line.split("threads=", 1)[1].split()[0]) for line in self.stopped if "threads=" in line
        )

    def thread_names_left(self) -> list[str]:
        """Names of the threads :meth:`threads_left` counts."""
        names = {
            n for line in self.stopped if "names=" in line for n in line.split("names=", 1)[1].split(",")
        }
        return sorted(names - {"-"})

    def __enter__(self) -> AgentHosts:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def tasks_per_node(sim: SimProcess) -> dict[str, int]:
    """How many tasks run on each node now (from the restart-free initial placement)."""
    answer = sim.http.get(f"{sim.nomad}/v1/allocations", timeout=60)
    answer.raise_for_status()
    return dict(Counter(a["NodeName"] for a in answer.json() if a["ClientStatus"] == "running"))


def wait_all_healthy(
    sim: SimProcess, allocations: int, timeout: float, poll: float = 0.2
) -> list[RestartRecord]:
    """Poll the restart record (uncounted) until ``allocations`` allocations restarted healthy."""
    deadline = time.monotonic() + timeout
    while True:
        records = sim.restarts()
        if len({r.alloc_id for r in records if r.healthy_at is not None}) >= allocations:
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len({r.alloc_id for r in records if r.healthy_at is not None})} of {allocations} "
                f"restarted healthy after {timeout:.0f}s"
            )
        time.sleep(poll)


# --- measures -------------------------------------------------------------------------------------


def durations(records: Sequence[RestartRecord]) -> list[float]:
    """Each restart's slot time (requested -> healthy), in the order the restarts were requested."""
    done = sorted((r for r in records if r.healthy_at is not None), key=lambda r: r.requested_at)
    return [r.healthy_at - r.requested_at for r in done if r.healthy_at is not None]


def ideal_makespan(times: Sequence[float], c: int) -> float:
    """List scheduling of ``times`` (in order) on ``c`` slots with zero overhead: the makespan."""
    free = [0.0] * min(c, len(times))
    for t in times:
        heapq.heappush(free, heapq.heappop(free) + t)
    return max(free, default=0.0)


def batch_makespan(times: Sequence[float], c: int) -> float:
    """``nomad job restart -batch-size=c`` on the same ``times``: each batch waits for its slowest."""
    return sum(max(times[i : i + c]) for i in range(0, len(times), c))


def makespan(records: Sequence[RestartRecord]) -> float:
    """First restart requested -> last healthy."""
    done = [r for r in records if r.healthy_at is not None]
    return (
        max(r.healthy_at for r in done if r.healthy_at) - min(r.requested_at for r in done) if done else 0.0
    )


def handoffs(records: Sequence[RestartRecord], c: int) -> list[float]:
    """Slot hand-offs: from a restart becoming healthy (its slot free) to the next restart requested.

    Greedy matching: the k-th restart requested after the first ``c`` takes the slot of the k-th
    restart to become healthy (``c``: the restarts that ran at once, when fewer than the limit).
    """
    requested = sorted(r.requested_at for r in records)[c:]
    released = sorted(r.healthy_at for r in records if r.healthy_at is not None)
    return [max(0.0, req - rel) for req, rel in zip(requested, released, strict=False)]


def peak(records: Sequence[RestartRecord]) -> int:
    """Most restarts active at once (the sim's own measure)."""
    now = max((t for r in records for t in (r.ended_at, r.requested_at) if t is not None), default=0.0)
    return peak_concurrency(records, now)


def restarts_per_alloc(records: Sequence[RestartRecord]) -> Counter[str]:
    return Counter(r.alloc_id for r in records)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _key_kind(key: str) -> str:
    """What a Shepard key is: plan, slot (one), slots (the prefix), heartbeat(s), trigger, other."""
    if key.endswith("/task_lock"):
        return "plan"
    if key.endswith(("/restart_lock", "/restart_lock/")):
        return "slots"
    if "/restart_lock/" in key:
        return "slot"
    if "/gc/" in key:
        return "gc leader"
    if key.endswith("/nodes/"):
        return "heartbeats"
    if "/nodes/" in key:
        return "heartbeat"
    if "/keys/" in key:
        return "triggers (GC scan)" if key.endswith("/") else "trigger"
    return "prefix (GC scan)" if key.endswith("/") else "other"


def purpose(shape: str) -> str:
    """The purpose of a request shape of the sim (``request_shape``): ``"plan write (cas alone) 409"``."""
    words = shape.split(" ")
    method, status = words[0], words[-1]
    flags = {w for w in words if w.startswith("?")}
    outcome = {"200": "", "409": " refused", "404": " (none)"}.get(status, f" {status}")
    if shape.startswith("PUT /v1/txn ["):
        ops = tuple(
            (op.split(" ")[0], _key_kind(op.split(" ")[1]))
            for op in shape.split("[", 1)[1].rsplit("]", 1)[0].split(", ")
        )
        kinds = {
            (("cas", "plan"),): "plan write (registration, finish keeping the slot, settle)",
            (("cas", "plan"), ("check-session", "slot"), ("check-index", "slot"), ("set", "trigger")): (
                "claim + trigger"
            ),
            (("cas", "plan"), ("unlock", "slot")): "finish + release",
            (("lock", "slot"),): "slot lock",
            (("unlock", "slot"),): "slot release",
        }
        return "txn " + kinds.get(ops, " ".join(f"{v} {k}" for v, k in ops)) + outcome
    endpoint = words[1]
    if endpoint.startswith("/v1/kv/"):
        kind = _key_kind(endpoint[len("/v1/kv/") :])
        blocking = "?index" in flags
        if method == "GET":
            what = {"plan": "plan", "slots": "slot prefix", "heartbeats": "heartbeats"}.get(kind, kind)
            return f"kv {what} {'watch (blocking)' if blocking else 'read'}{outcome}"
        verb = next((f[1:] for f in ("?acquire", "?release", "?cas") if f in flags), method.lower())
        return f"kv {kind} {verb}{outcome}"
    if endpoint in ("/v1/health/checks", "/v1/health/node"):
        what = "checks" if endpoint == "/v1/health/checks" else "node"
        return f"health {what} " + ("watch (blocking)" if "?index" in flags else "read")
    return f"{method} {endpoint}{outcome}"


WAITING = (
    "PUT /v1/session/renew",
    "kv heartbeats watch",
    "kv slot prefix watch",
    "kv gc leader",
    "(GC scan)",
)
"""Purposes that cost per agent per minute, not per restart: session renewals, the heartbeat watch,
a waiting agent's blocking query on the slots (once per ``session_ttl`` until a slot frees), and
periodic garbage collection (its leader lock and scans)."""


def waiting_cost(by_purpose: dict[str, int]) -> int:
    """The requests of ``by_purpose`` (:func:`purposes`) that are :data:`WAITING` costs."""
    return sum(n for what, n in by_purpose.items() if any(w in what for w in WAITING))


def purposes(shapes: dict[str, int]) -> dict[str, int]:
    """Requests by :func:`purpose`, most first."""
    out: Counter[str] = Counter()
    for shape, n in shapes.items():
        out[purpose(shape)] += n
    return dict(out.most_common())


def consul_total(counts: dict[str, dict[str, int]]) -> int:
    return sum(sum(methods.values()) for methods in counts.values())


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, Python, and the load at the start."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
