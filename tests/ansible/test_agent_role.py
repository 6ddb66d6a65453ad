"""The agent role's failure paths and token hygiene, with ``ansible-playbook -vvv`` on localhost.

Its happy path (virtualenv, config mode and content, unit verified, idempotence) is the Molecule scenario
``extensions/molecule/agent``; here: a bad configuration is refused with Shepard's message before it is
written, bad role variables (and a missing ``shepard_agent_package``) are refused by the argument spec,
check mode on a host without Shepard yet writes nothing, and the tokens never appear in the output.
The example ``docs/examples/agent.yml`` runs here in check mode, on this machine as its one Nomad client.
"""

from __future__ import annotations

import grp
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_collection import ANSIBLE_PLAYBOOK, EXAMPLES, PLAYBOOKS, REPO, run_playbook

TOKEN = "role-consul-token-8e21c4"
NOMAD_TOKEN = "role-nomad-token-57ab0d"

pytestmark = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK.exists(),
    reason=f"ansible-core is not installed next to {sys.executable}: pip install -e '.[ansible]'",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Shepard wheel built from this checkout."""
    dist = tmp_path_factory.mktemp("dist")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(REPO)]
    subprocess.run(argv, check=True, timeout=600)
    (built,) = dist.glob("shepard-*.whl")
    return str(built)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One host for every test here, so the virtualenv is made once."""
    return tmp_path_factory.mktemp("host")


def _role(
    root: Path,
    wheel: str | None,
    tmp_path: Path,
    expect_failure: bool = False,
    check: bool = False,
    **variables: object,
) -> str:
    """The role on ``root`` with Shepard from ``wheel`` (None: without ``shepard_agent_package``)."""
    (root / "systemd").mkdir(exist_ok=True)
    package = {"shepard_agent_package": wheel} if wheel is not None else {}
    extra = {"root": str(root), **package, **variables}
    try:
        tokens = [TOKEN, NOMAD_TOKEN]
        return run_playbook(PLAYBOOKS / "agent.yml", tmp_path, extra, tokens=tokens, check=check)
    except AssertionError as exc:
        if not expect_failure:
            raise
        return str(exc)


def test_a_bad_configuration_is_refused_with_shepards_message_and_not_written(
    root: Path, wheel: str, tmp_path: Path
) -> None:
    output = _role(
        root,
        wheel,
        tmp_path,
        expect_failure=True,
        shepard_agent_config={"concurrency": 0, "session_ttl": "fast"},
        shepard_agent_consul_token=TOKEN,
    )
    assert "ansible-playbook exited 2" in output
    assert "failed to validate" in output
    assert "concurrency" in output and "session_ttl" in output, "Shepard's problems are shown"
    assert not (root / "etc" / "shepard.yaml").exists()


def test_bad_role_variables_are_refused_by_the_argument_spec(root: Path, wheel: str, tmp_path: Path) -> None:
    output = _role(root, wheel, tmp_path, expect_failure=True, shepard_agent_service_manager="upstart")
    assert "value of shepard_agent_service_manager must be one of: systemd, none, got: upstart" in output


def test_the_package_is_required_because_shepard_on_pypi_is_another_project(
    root: Path, tmp_path: Path
) -> None:
    output = _role(root, None, tmp_path, expect_failure=True)
    assert "ansible-playbook exited 2" in output
    assert "missing required arguments: shepard_agent_package" in output
    assert "Install Shepard into its virtualenv" not in output, "the role stops before installing anything"


def test_check_mode_on_a_host_without_shepard_yet_writes_nothing(
    wheel: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    fresh = tmp_path_factory.mktemp("fresh-host")
    output = _role(
        fresh,
        wheel,
        tmp_path,
        check=True,
        shepard_agent_config={"nomad_data_dir": str(fresh)},
        shepard_agent_consul_token=TOKEN,
    )
    assert "TASK [shepard.nomad.agent : Print the systemd unit of the installed Shepard]" in output
    assert re.search(r"localhost +: ok=\d+ +changed=[1-9]", output), "check mode reports what would change"
    assert sorted(p.name for p in fresh.iterdir()) == ["systemd"], "check mode created something"
    assert list((fresh / "systemd").iterdir()) == []


def test_the_tokens_reach_the_config_file_and_never_the_output(
    root: Path, wheel: str, tmp_path: Path
) -> None:
    _role(
        root,
        wheel,
        tmp_path,
        shepard_agent_config={"nomad_data_dir": str(root)},
        shepard_agent_consul_token=TOKEN,
        shepard_agent_nomad_token=NOMAD_TOKEN,
    )
    config = root / "etc" / "shepard.yaml"
    written = yaml.safe_load(config.read_text(encoding="utf-8"))
    assert (written["consul"]["token"], written["nomad"]["token"]) == (TOKEN, NOMAD_TOKEN)
    assert config.stat().st_mode & 0o777 == 0o600
    unit = (root / "systemd" / "shepard-agent.service").read_text(encoding="utf-8")
    assert f"ExecStart={root}/venv/bin/shepard agent --config {config}" in unit
    assert f"ReadOnlyPaths={root}" in unit


def test_the_agent_example_runs_in_check_mode_and_writes_nothing(wheel: str, tmp_path: Path) -> None:
    """The example as written (its variables pass the role's argument spec), on localhost as the one
    ``nomad_clients`` host, with Shepard from this checkout's wheel (the example's path is a placeholder),
    no systemd (not PID 1 here) and no become (these tests run as the user who owns the paths)."""
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[nomad_clients]\nlocalhost\n", encoding="utf-8")
    paths = [Path("/opt/shepard"), Path("/etc/shepard"), Path("/etc/systemd/system/shepard-agent.service")]
    before = {path: path.exists() for path in paths}
    account_before = _accounts("shepard")
    extra = {
        "shepard_agent_package": wheel,
        "shepard_agent_service_manager": "none",
        "ansible_become": False,
        "vault_shepard_consul_token": TOKEN,
        "vault_shepard_nomad_token": NOMAD_TOKEN,
    }
    tokens = [TOKEN, NOMAD_TOKEN]
    output = run_playbook(
        EXAMPLES / "agent.yml", tmp_path, extra, tokens=tokens, check=True, inventory=str(inventory)
    )
    assert "Validating arguments against arg spec 'main'" in output
    recap = re.search(r"localhost +: ok=\d+ +changed=[1-9]\d* +unreachable=0 +failed=0", output)
    assert recap, output[-3000:]
    assert {path: path.exists() for path in paths} == before, "check mode wrote to the host"
    assert _accounts("shepard") == account_before, "check mode created the service user or group"


def _accounts(name: str) -> tuple[bool, bool]:
    """Whether the user and the group ``name`` exist."""
    return name in {u.pw_name for u in pwd.getpwall()}, name in {g.gr_name for g in grp.getgrall()}
