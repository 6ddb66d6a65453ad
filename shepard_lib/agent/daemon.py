"""``shepard agent``: the agent as a process, with its signals.

SIGTERM and SIGINT stop it: no new work, a restart in flight may finish for ``shutdown_timeout``,
then the slots and the heartbeat are released and the session destroyed, and the process exits 0.
SIGHUP reloads the configuration file: a bad new configuration is logged and the old one kept;
the tokens of both the running and the new configuration are redacted from the logs from then on.
While Consul or Nomad is unreachable the process logs one line per outage (the per-retry lines of
the backends move to DEBUG, see :func:`~shepard_lib.agent.outage.quiet_retries`).
Startup with a bad configuration raises ConfigError (exit 2), with Consul or Nomad unreachable
ShepardError (exit 1); the CLI prints either as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from shepard_lib.agent.agent import Agent
from shepard_lib.agent.outage import quiet_retries
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ShepardConfig, secret_values
from shepard_lib.errors import ConfigError
from shepard_lib.logsetup import setup_logging

__all__ = ["run"]

log = logging.getLogger(__name__)

SIGNAL_CHECK = 1.0
"""Real seconds the main thread waits at most before it runs the handler of a signal received
meanwhile. The kernel may deliver a process's signal to any of its threads; CPython then only
flags it, and the handler runs when the main thread next runs Python code, which a wait without
a timeout would never do."""


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], ShepardConfig]) -> int:
    """Run the agent until SIGTERM/SIGINT; ``load`` reads the configuration (again on SIGHUP)."""
    cfg = load(args)
    quiet_retries()
    wake = threading.Event()
    flags = {"stop": False, "reload": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        flags["reload" if signum == signal.SIGHUP else "stop"] = True
        wake.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        clock = Clock(cfg.time_scale)
        consul = ConsulBackend(cfg.consul, clock)
        nomad = NomadBackend(cfg.nomad, clock)
        agent = Agent(cfg, consul, nomad, clock=clock)
        agent.start()
        try:
            while not flags["stop"]:
                if not wake.wait(SIGNAL_CHECK):
                    continue  # a signal another thread received has run its handler by now
                wake.clear()
                if flags["reload"] and not flags["stop"]:
                    flags["reload"] = False
                    _reload(agent, args, load)
        finally:
            agent.stop()
            consul.close()
            nomad.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _reload(
    agent: Agent, args: argparse.Namespace, load: Callable[[argparse.Namespace], ShepardConfig]
) -> None:
    log.info("SIGHUP: reloading the configuration")
    running = agent.config
    try:
        cfg = load(args)
    except ConfigError as exc:
        log.error("config reload failed, keeping the running config: %s", "; ".join(exc.problems))
        return
    agent.reload(cfg)
    # ``load`` set logging up to redact the new file's tokens; the running connections keep the
    # old ones until a restart (RESTART_ONLY), so those stay redacted too.
    setup_logging(cfg.log_level, cfg.log_format, secrets=[*secret_values(running), *secret_values(cfg)])
