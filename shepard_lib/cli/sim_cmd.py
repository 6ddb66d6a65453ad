"""``shepard sim serve``: run a simulated Consul + Nomad cluster until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.scenario import small_scenario

log = logging.getLogger(__name__)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {port}")
    return port


def _scale(value: str) -> float:
    try:
        scale = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if scale <= 0:
        raise argparse.ArgumentTypeError(f"expected a time scale > 0, got {scale:g}")
    return scale


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sim serve``."""
    sim = subparsers.add_parser(
        "sim",
        help="run a simulated Consul + Nomad cluster",
        description="Simulated Consul and Nomad speaking the real HTTP APIs.",
    )
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)
    serve = sim_sub.add_parser(
        "serve",
        help="serve a simulated cluster until SIGTERM/SIGINT",
        description="Start a simulated Consul and Nomad from a scenario and serve them until SIGTERM or "
        "SIGINT. Prints one line 'ready consul=<addr> nomad=<addr>' once both listen; with --agents, "
        "one line 'agent node=<name> nomad=<addr> data_dir=<dir>' per node before it.",
    )
    serve.add_argument(
        "--consul-port", type=_port, default=0, help="Consul HTTP port (default: any free port)"
    )
    serve.add_argument("--nomad-port", type=_port, default=0, help="Nomad HTTP port (default: any free port)")
    serve.add_argument(
        "--data-dir", metavar="DIR", help="parent of the nodes' Nomad data dirs (default: a temp dir)"
    )
    serve.add_argument("--scenario", metavar="FILE.yaml", help="scenario file (default: the small scenario)")
    serve.add_argument("--acl-token", metavar="TOKEN", help="require this ACL token on both APIs")
    serve.add_argument("--time-scale", type=_scale, default=1.0, help="cluster seconds per real second")
    serve.add_argument(
        "--agents",
        action="store_true",
        help="also serve each node's own Nomad agent API (its /v1/agent/self is that node) and print "
        "its address and the node's data dir, one line per node, before the ready line",
    )
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean stop, 1 when a port is taken.

    An invalid scenario raises ScenarioError (a ConfigError: exit 2).
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            cluster = SimCluster.from_scenario(
                args.scenario or small_scenario(),
                data_dir=args.data_dir,
                time_scale=args.time_scale,
                acl_token=args.acl_token,
                consul_port=args.consul_port,
                nomad_port=args.nomad_port,
            )
        except OSError as exc:
            print(f"shepard sim serve: cannot listen: {exc}", file=sys.stderr)
            return 1
        with cluster:
            if args.agents:
                for node in cluster.scenario.nodes:
                    print(
                        f"agent node={node.name} nomad={cluster.nomad_agent_addr(node.name)} "
                        f"data_dir={cluster.node_data_dir(node.name)}",
                        flush=True,
                    )
            print(f"ready consul={cluster.consul_addr} nomad={cluster.nomad_addr}", flush=True)
            log.info("simulated cluster serving; node data dirs under %s", cluster.data_dir)
            stop.wait()
            log.info("stopping the simulated cluster")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
