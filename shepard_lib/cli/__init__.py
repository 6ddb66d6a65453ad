"""The ``shepard`` command.

Each subcommand lives in a module ``shepard_lib.cli.<name>_cmd`` with
``register(subparsers) -> None``, which adds its parser(s) and sets ``func`` to a handler
``(args: argparse.Namespace) -> int``. Adding a command is one entry in :data:`COMMAND_MODULES`.

Global options (``--config``, ``--log-level``, ``--log-format``) are accepted before or after
the subcommand. Exit codes: 0 ok, 1 failure, 2 usage or configuration error; errors are one
line each on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from shepard_lib import __version__
from shepard_lib.config import ShepardConfig, load_config, secret_values
from shepard_lib.errors import ConfigError, ShepardError
from shepard_lib.logsetup import logs_json, setup_logging

COMMAND_MODULES: tuple[str, ...] = (
    "restart_cmd",
    "agent_cmd",
    "config_cmd",
    "template_cmd",
    "job_cmd",
    "gc_cmd",
    "demo_cmd",
    "sim_cmd",
    "logs_cmd",
)
"""The modules under ``shepard_lib.cli`` that register subcommands, in ``--help`` order."""


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    options: list[tuple[str, dict[str, Any]]] = [
        (
            "--config",
            {
                "metavar": "PATH",
                "help": "YAML config file (default: $SHEPARD_CONFIG_PATH; none: defaults and environment)",
            },
        ),
        (
            "--log-level",
            {
                "type": str.upper,
                "choices": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                "help": "log level (default: the config's log_level, INFO)",
            },
        ),
        (
            "--log-format",
            {"choices": ["text", "json"], "help": "log format (default: the config's log_format, text)"},
        ),
    ]
    for flag, kwargs in options:
        if flag not in parser._option_string_actions:  # a command may define its own
            parser.add_argument(flag, default=default, **kwargs)


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield sub
                yield from _all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``shepard`` argument parser with every command of :data:`COMMAND_MODULES`."""
    parser = argparse.ArgumentParser(
        prog="shepard",
        description="Safe, rate-limited restarts of HashiCorp Nomad tasks.",
        epilog="Exit codes: 0 ok; 1 failure (a restart failed, Consul or Nomad could not be reached); "
        "2 usage or configuration error; 128 + the signal when SIGINT/SIGTERM interrupted a rollout. "
        "Each command's --help lists its own. Design: docs/design.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, default=None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    # Also accept the global options after the subcommand; SUPPRESS keeps a value given earlier.
    for sub in _all_parsers(parser):
        _add_global_options(sub, default=argparse.SUPPRESS)
    return parser


def load_config_from_args(args: argparse.Namespace) -> ShepardConfig:
    """The configuration for ``args`` (``--config`` and the log flags override the file).

    Also reconfigures logging with the effective level and format, redacting the tokens.
    Raises ConfigError.
    """
    overrides = {"log_level": args.log_level, "log_format": args.log_format}
    cfg = load_config(path=args.config, overrides=overrides)
    setup_logging(cfg.log_level, cfg.log_format, secrets=secret_values(cfg))
    return cfg


def job_not_found(job: str, namespace: str) -> ConfigError:
    """The usage error (exit 2) of every command for a job Nomad does not know: one wording for all."""
    return ConfigError(f"job {job!r} not found in Nomad namespace {namespace!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``shepard`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(args.log_level or "INFO", args.log_format or "text")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _error(problem)
        return 2
    except ShepardError as exc:
        _error(f"shepard: {exc}")
        return 1
    except KeyboardInterrupt:
        _error("shepard: interrupted")
        return 130
    return code


def _error(line: str) -> None:
    """One error line on stderr: plain, or a JSON log record when the logs are JSON lines."""
    if logs_json():
        logging.getLogger("shepard_lib.cli").error(line)
    else:
        print(line, file=sys.stderr)
