"""A process hosting one real :class:`~shepard_lib.agent.Agent` per simulated node it is given.

Run by the benchmarks (``python benchmarks/_agent_host.py``) with a JSON spec on standard input::

    {"consul": "http://127.0.0.1:8500", "tasks": 24,
     "config": {"concurrency": 5, "settle_time": 1.0, ...},       # ShepardConfig fields
     "agents": [{"node": "n1", "nomad": "http://...", "data_dir": "/..."}, ...]}

Each agent is what ``shepard agent`` runs on a Nomad client (its own Consul session, inotify on its
node's allocation dirs, its node's Nomad agent API); several share this process as in
``shepard demo``, but not the simulator's, so their CPU is measured apart from the sim's. Prints
``watching <n>`` once the agents of this process watch ``tasks`` tasks, then runs until SIGTERM or
standard input closes, stops every agent and prints ``stopped <s> threads=<n> names=<a,b>``: the
seconds the stops took and the threads other than the main one still alive after them (none expected).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from typing import Any

from shepard_lib.agent import Agent
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, default_config


def main() -> int:
    spec: dict[str, Any] = json.loads(sys.stdin.readline())
    base = dataclasses.replace(default_config(), **spec["config"])
    clock = Clock(base.time_scale)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    stdin_reader = threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True)
    stdin_reader.start()
    agents: list[Agent] = []
    backends: list[ConsulBackend | NomadBackend] = []
    try:
        for entry in spec["agents"]:
            cfg = dataclasses.replace(
                base,
                node_name=entry["node"],
                nomad_data_dir=entry["data_dir"],
                consul=ConsulConfig(address=spec["consul"]),
                nomad=NomadConfig(address=entry["nomad"]),
            )
            consul, nomad = ConsulBackend(cfg.consul, clock), NomadBackend(cfg.nomad, clock)
            backends += [consul, nomad]
            agents.append(Agent(cfg, consul, nomad, clock=clock).start())
        while sum(len(a.watched()) for a in agents) < spec["tasks"]:
            if stop.wait(0.05):
                return 1
        print(f"watching {sum(len(a.watched()) for a in agents)}", flush=True)
        stop.wait()
    finally:
        started = time.monotonic()
        stoppers = [threading.Thread(target=_stop, args=(a, base.shutdown_timeout)) for a in agents]
        for stopper in stoppers:  # in parallel, as the nodes' agents would stop
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for backend in backends:
            backend.close()
        # Counted at once: Agent.stop returns when every thread of its agent has ended.
        left = [t for t in threading.enumerate() if t not in (threading.main_thread(), stdin_reader)]
        names = ",".join(sorted({t.name for t in left})) or "-"
        print(f"stopped {time.monotonic() - started:.2f} threads={len(left)} names={names}", flush=True)
    return 0


def _stop(agent: Agent, timeout: float) -> None:
    with contextlib.suppress(Exception):
        agent.stop(timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
