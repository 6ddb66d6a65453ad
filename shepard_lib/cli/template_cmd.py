"""``shepard template``: print the shepard.tpl text (or the Nomad ``template`` block) to add to a job."""

from __future__ import annotations

import argparse

from shepard_lib import cli
from shepard_lib.keyspace import check_prefix, nomad_template_block, shepard_template


def _prefix(value: str) -> str:
    try:
        check_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``template``."""
    parser = subparsers.add_parser(
        "template",
        help="print the shepard.tpl template that makes a task restartable",
        description="Print the Consul template a task renders to local/shepard.tpl with "
        'change_mode = "restart"; with --hcl, the whole Nomad template block.',
        epilog="Exit codes: 0 printed; 2 usage or configuration error (an invalid --prefix or config).",
    )
    parser.add_argument("--prefix", type=_prefix, help="key prefix (default: the config's key_prefix)")
    parser.add_argument("--hcl", action="store_true", help="print a Nomad job `template { ... }` block")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the template for ``--prefix`` (or the configured ``key_prefix``)."""
    prefix = args.prefix or cli.load_config_from_args(args).key_prefix
    print(nomad_template_block(prefix) if args.hcl else shepard_template(prefix), end="")
    return 0
