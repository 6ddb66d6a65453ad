"""The ``shepard`` command: exit codes, ``config check``, ``template``, secrets never printed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml

from shepard_lib import __version__, cli
from shepard_lib.cli import config_cmd
from shepard_lib.config import default_config, file_form
from shepard_lib.errors import PlanError
from shepard_lib.keyspace import nomad_template_block, shepard_template

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "shepard.yaml")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    """No Consul/Nomad/Shepard variables from the machine; logging restored afterwards."""
    for name in list(os.environ):
        if name.startswith(("CONSUL_", "NOMAD_", "SHEPARD_")):
            monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"shepard {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: shepard" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "frobnicate")
    assert code == 2
    assert "invalid choice" in err


def test_config_check_prints_the_effective_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "config", "check", "--config", EXAMPLE)
    assert (code, err) == (0, "")
    assert yaml.safe_load(out) == file_form(default_config())


def test_global_options_work_before_and_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("concurrency: 7\n", encoding="utf-8")
    for argv in (
        ["--config", str(path), "config", "check"],
        ["config", "check", "--config", str(path)],
        ["config", "--config", str(path), "check"],
    ):
        code, out, _ = run(capsys, *argv)
        assert code == 0, argv
        assert yaml.safe_load(out)["concurrency"] == 7, argv


def test_log_flags_override_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "config", "check", "--config", EXAMPLE, "--log-level", "debug", "--log-format", "json"
    )
    assert code == 0
    data = yaml.safe_load(out)
    assert (data["log_level"], data["log_format"]) == ("DEBUG", "json")


def test_config_check_without_a_file_uses_environment_and_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOMAD_ADDR", "10.1.2.3:4646")
    code, out, _ = run(capsys, "config", "check")
    assert code == 0
    assert yaml.safe_load(out)["nomad"]["address"] == "http://10.1.2.3:4646"


def test_config_check_never_prints_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "nomad.token"
    token_file.write_text("nomad-secret-from-file-42\n", encoding="utf-8")
    path = tmp_path / "c.yaml"
    path.write_text(f"nomad: {{token_file: {token_file}}}\n", encoding="utf-8")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "consul-secret-from-env-17")
    code, out, err = run(capsys, "config", "check", "--config", str(path), "--log-level", "DEBUG")
    assert code == 0
    data = yaml.safe_load(out)
    assert data["consul"]["token"] == data["nomad"]["token"] == "<redacted>"
    for secret in ("consul-secret-from-env-17", "nomad-secret-from-file-42"):
        assert secret not in out and secret not in err


def test_config_token_in_file_is_not_printed_even_when_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("consul: {token: inline-secret-99}\nconcurrency: 0\n", encoding="utf-8")
    code, out, err = run(capsys, "config", "check", "--config", str(path))
    assert code == 2
    assert "inline-secret-99" not in out + err


def test_bad_config_prints_one_line_per_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("concurrency: 0\nsession_ttl: 5\nlock_scop: node\n", encoding="utf-8")
    code, out, err = run(capsys, "config", "check", "--config", str(path))
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "concurrency: expected an integer >= 1, got '0'",
        "lock_scop: unknown key (did you mean 'lock_scope'?)",
        "session_ttl: expected a duration between 10s and 24h, got '5' (durations look like 15s, 2m, 1h30m)",
    ]


def test_missing_config_file_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    code, out, err = run(capsys, "config", "check", "--config", str(missing))
    assert (code, out) == (2, "")
    assert err == f"config file not found: {missing}\n"


def test_yaml_error_exits_2_naming_the_position(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: [\n", encoding="utf-8")
    code, _, err = run(capsys, "config", "check", "--config", str(path))
    assert code == 2
    assert err.startswith(f"{path}:2:1: YAML syntax error")
    assert "Traceback" not in err


def test_shepard_error_exits_1_with_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(args: argparse.Namespace) -> int:
        raise PlanError("plan web/app/server is failed: resume it first")

    monkeypatch.setattr(config_cmd, "run_check", failing)
    code, _, err = run(capsys, "config", "check")
    assert code == 1
    assert err == "shepard: plan web/app/server is failed: resume it first\n"


def test_template_prints_shepard_tpl(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "template")
    assert (code, out) == (0, shepard_template("shepard"))


def test_template_hcl_with_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "template", "--prefix", "ops/shepard", "--hcl")
    assert (code, out) == (0, nomad_template_block("ops/shepard"))


def test_template_uses_the_configured_key_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("key_prefix: apps/shepard\n", encoding="utf-8")
    code, out, _ = run(capsys, "template", "--config", str(path))
    assert (code, out) == (0, shepard_template("apps/shepard"))


def test_template_rejects_a_bad_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "template", "--prefix", "a//b")
    assert (code, out) == (2, "")
    assert "argument --prefix: expected segments of letters" in err


def test_every_command_module_registers_a_handler() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["config", "check"]).func is config_cmd.run_check
    assert callable(parser.parse_args(["template"]).func)


def test_restart_accepts_max_failures_zero_and_again() -> None:
    """Issue 11: `--max-failures 0` (halt at the first failure) is valid; `--again` is a flag."""
    args = cli.build_parser().parse_args(["restart", "web", "--max-failures", "0", "--again"])
    assert (args.max_failures, args.again) == (0, True)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["restart", "web", "--max-failures", "-1"])
