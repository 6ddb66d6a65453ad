"""``shepard agent``: run the per-node agent, or print its systemd unit (``--print-unit``)."""

from __future__ import annotations

import argparse
import sys

from shepard_lib.agent.unit import UnitOptions, render_unit
from shepard_lib.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``agent``."""
    defaults = UnitOptions()
    agent = subparsers.add_parser(
        "agent",
        help="run the per-node agent: restart this node's tasks, a few at a time, when their files change",
        description=(
            "Watch this node's Nomad allocations and restart a task whose files changed through "
            "Shepard's plan and restart slots. SIGTERM/SIGINT: finish a restart in flight (up to "
            "shutdown_timeout), release everything, exit 0. SIGHUP: reload the config."
        ),
        epilog="Exit codes: 0 stopped by SIGTERM/SIGINT (or --print-unit printed the unit), 1 Consul or "
        "Nomad could not be reached at startup, 2 usage or configuration error.",
    )
    unit = agent.add_argument_group("systemd unit (with --print-unit)")
    unit.add_argument("--print-unit", action="store_true", help="print the agent's systemd unit and exit")
    unit.add_argument("--user", default=defaults.user, help=f"User= (default: {defaults.user})")
    unit.add_argument("--group", help="Group= (default: the user's name)")
    unit.add_argument(
        "--config-path",
        default=defaults.config,
        help=f"the config file ExecStart passes (default: {defaults.config})",
    )
    unit.add_argument(
        "--venv", default=sys.prefix, help="the virtualenv holding bin/shepard (default: this one's)"
    )
    unit.add_argument(
        "--nomad-data-dir", default=defaults.data_dir, help=f"ReadOnlyPaths= (default: {defaults.data_dir})"
    )
    unit.add_argument(
        "--stop-timeout",
        type=int,
        default=defaults.stop_timeout,
        metavar="SECONDS",
        help=f"TimeoutStopSec=, above shutdown_timeout (default: {defaults.stop_timeout})",
    )
    agent.set_defaults(func=_agent)


def _agent(args: argparse.Namespace) -> int:
    from shepard_lib.cli import load_config_from_args

    if args.print_unit:
        options = UnitOptions(
            user=args.user,
            group=args.group,
            config=args.config_path,
            venv=args.venv,
            data_dir=args.nomad_data_dir,
            stop_timeout=args.stop_timeout,
        )
        try:
            text = render_unit(options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sys.stdout.write(text)
        return 0
    from shepard_lib.agent.daemon import run

    return run(args, load_config_from_args)
