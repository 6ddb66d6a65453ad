"""``shepard config check``: validate the configuration and show the effective settings."""

from __future__ import annotations

import argparse

import yaml

from shepard_lib import cli
from shepard_lib.config import redacted


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``config check``."""
    config = subparsers.add_parser("config", help="work with the configuration")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="validate the configuration and print the effective settings (tokens redacted)",
        description="Validate the configuration (file, environment, defaults) and print the effective "
        "settings as YAML, tokens redacted. Exit 0 when valid; 2 with one line per problem otherwise.",
    )
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Print the effective configuration as YAML; ConfigError (exit 2) when it is invalid."""
    cfg = cli.load_config_from_args(args)
    print(yaml.safe_dump(redacted(cfg), sort_keys=False, default_flow_style=False), end="")
    return 0
