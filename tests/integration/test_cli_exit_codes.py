"""One exit-code rule for every command, through the real console script against the simulator.

A job Nomad does not know, or a plan that does not exist, is a usage error (exit 2) in the same
words whichever command named it; every command's ``--help`` describes it and lists its exit codes.
"""

from __future__ import annotations

import pytest
from support import Console, client_env

from shepard_lib.cli import _all_parsers, build_parser
from shepard_lib.sim.cluster import SimCluster

NO_JOB = "job 'nosuchjob' not found in Nomad namespace 'default'\n"


def _shepard(sim: SimCluster, *args: str) -> tuple[int, str, str]:
    env = client_env(CONSUL_HTTP_ADDR=sim.consul_addr, NOMAD_ADDR=sim.nomad_addr, SHEPARD_TIME_SCALE="20")
    return Console(*args, env=env).finish()


@pytest.mark.parametrize(
    "argv",
    [
        ["restart", "nosuchjob"],
        ["status", "nosuchjob"],
        ["resume", "nosuchjob/app/server"],
        ["abort", "nosuchjob/app/server"],
        ["job", "check", "nosuchjob"],
    ],
)
def test_a_job_nomad_does_not_know_is_exit_2_in_the_same_words(
    sim_cluster: SimCluster, argv: list[str]
) -> None:
    assert _shepard(sim_cluster, *argv) == (2, "", NO_JOB)


@pytest.mark.parametrize("command", ["resume", "abort"])
def test_a_plan_that_does_not_exist_is_exit_2_in_the_same_words(
    sim_cluster: SimCluster, command: str
) -> None:
    code, out, err = _shepard(sim_cluster, command, "web/app/server")
    assert (code, out, err) == (2, "", "no plan for web/app/server (`shepard status` lists the plans)\n")


@pytest.mark.parametrize("command", ["status", "resume", "abort"])
def test_status_resume_and_abort_help_describe_the_command_and_explain_the_scope(command: str) -> None:
    code, out, err = Console(command, "--help").finish()
    assert code == 0, err
    description = out.split("\n\n")[1]
    assert not description.startswith(("positional", "options")), f"no description: {out}"
    if command != "status":
        assert (
            "JOB/GROUP/TASK names one task's plan: the Nomad job ID, the task group and the task"
            in " ".join(out.split())
        )
    assert "Exit codes: 0 " in out


def test_every_commands_help_lists_its_exit_codes() -> None:
    parser = build_parser()
    for sub in [parser, *_all_parsers(parser)]:
        assert "Exit codes:" in sub.format_help(), f"`{sub.prog} --help` lists no exit codes"
