"""``shepard config check``: validate the configuration and show the effective settings."""

from __future__ import annotations

import argparse

import yaml

from shepard_lib import cli
from shepard_lib.config import file_form


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``config check``."""
    config = subparsers.add_parser(
        "config",
        help="work with the configuration",
        description="Work with Shepard's configuration (see docs/configuration.md).",
        epilog="Exit codes: 0 ok; 2 usage or configuration error.",
    )
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="validate the configuration and print the effective settings (tokens redacted)",
        description="Validate the configuration (file, environment, defaults) and print the effective "
        "settings as YAML, tokens redacted.",
        epilog="Exit codes: 0 valid; 2 invalid, with one line per problem on stderr.",
    )
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Print the effective configuration as a config file accepts it; ConfigError (exit 2) when invalid."""
    cfg = cli.load_config_from_args(args)
    print(yaml.safe_dump(file_form(cfg), sort_keys=False, default_flow_style=False), end="")
    return 0
