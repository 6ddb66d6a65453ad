"""The README's library example runs as written against the simulated cluster.

Sim-only: it reads the simulator's restart record.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from shepard_lib.keyspace import shepard_template
from shepard_lib.sim.pytest_plugin import SimClusterFactory

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_library_example_restarts_the_job_two_at_a_time(
    sim_cluster_factory: SimClusterFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim_cluster = sim_cluster_factory(time_scale=1.0)  # the example runs on the real clock
    (example,) = [block for block in _python_blocks() if "RollingRestart" in block]
    config = tmp_path / "shepard.yaml"
    config.write_text("min_healthy_time: 1s\nhealthy_deadline: 60s\n", encoding="utf-8")
    monkeypatch.setenv("SHEPARD_CONFIG_PATH", str(config))
    monkeypatch.setenv("CONSUL_HTTP_ADDR", sim_cluster.consul_addr)
    monkeypatch.setenv("NOMAD_ADDR", sim_cluster.nomad_addr)
    for name in ("CONSUL_HTTP_TOKEN", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION"):
        monkeypatch.delenv(name, raising=False)

    exec(compile(example, str(README), "exec"), {})

    assert capsys.readouterr().out.startswith("True "), "the example's rollout did not succeed"
    restarted = [r.alloc_id for r in sim_cluster.restarts()]
    assert sorted(restarted) == sorted(a.id for a in sim_cluster.nomad.allocations()), restarted
    assert sim_cluster.peak_concurrency("web", "app", "server") <= 2


def test_the_readme_shows_the_template_shepard_prints() -> None:
    assert shepard_template().strip() in README.read_text(encoding="utf-8"), (
        "README.md shows a stale shepard.tpl: paste `shepard template` into it"
    )


def test_the_gc_example_reports_what_would_go_and_deletes_nothing(
    sim_cluster_factory: SimClusterFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim_cluster = sim_cluster_factory(time_scale=1.0)
    (example,) = [block for block in _python_blocks() if "collect_garbage" in block]
    monkeypatch.delenv("SHEPARD_CONFIG_PATH", raising=False)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", sim_cluster.consul_addr)
    monkeypatch.setenv("NOMAD_ADDR", sim_cluster.nomad_addr)
    for name in ("CONSUL_HTTP_TOKEN", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION"):
        monkeypatch.delenv(name, raising=False)
    stale = "shepard/keys/node-1/web/app/server/9"
    sim_cluster.set_key(stale, "x")

    exec(compile(example, str(README), "exec"), {})

    assert capsys.readouterr().out.strip() == "True {'alloc_gone': 1} {}"
    assert sim_cluster.get_key(stale) == "x", "a dry run deleted a key"


# The shell examples, run as written from the checkout, with `.venv/bin/shepard` as the quick start made it.
# Not run: the install (the environment running these tests is it) and `scripts/test` (which runs them).
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
NOT_RUN = {"scripts/test\n"}
REPO = README.parent


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def _untracked() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout


@pytest.mark.parametrize("number", range(len(_shell_blocks())))
def test_every_shell_example_of_the_readme_works_as_written(number: int) -> None:
    block = _shell_blocks()[number]
    if block in NOT_RUN:
        pytest.skip(f"not run from a test: {block.strip()}")
    if not (REPO / ".venv" / "bin" / "shepard").exists():
        pytest.skip("the examples call .venv/bin/shepard: run the quick start first")
    if block.startswith(INSTALL):
        block = block[len(INSTALL) :]  # the install is this test environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_", "SHEPARD_"))}
    before = _untracked()
    done = subprocess.run(
        ["timeout", "300", "bash", "-euo", "pipefail", "-c", block],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, (
        f"README example failed ({done.returncode}):\n{block}\n{done.stdout}\n{done.stderr}"
    )
    assert _untracked() == before, "the example left files in the checkout"
