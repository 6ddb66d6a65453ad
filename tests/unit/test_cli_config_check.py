"""``shepard config check`` through the real console script: what it prints is what the file accepts,
and the mistakes a file can hide (two tokens, a key given twice, a quoted number) are named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

SHEPARD = str(Path(sys.executable).with_name("shepard"))


def _check(config: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_", "SHEPARD_"))}
    done = subprocess.run(
        [SHEPARD, "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_the_printed_config_is_accepted_when_pasted_back_with_durations_as_written(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text("session_ttl: 15s\nhealthy_deadline: 1h30m\nconsul: {token: t0ken-abcdef}\n")
    code, out, err = _check(first)
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert "t0ken-abcdef" not in out and printed["consul"]["token"] == "<redacted>"
    assert printed["session_ttl"] == "15s" and printed["healthy_deadline"] == "1h30m", out
    assert "null" not in out, "unset keys are left out (the schema rejects null)"
    pasted = tmp_path / "pasted.yaml"
    pasted.write_text(out)
    code, again, err = _check(pasted)
    assert (code, err) == (0, ""), err
    assert again == out


def test_token_and_token_file_both_set_is_rejected(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    config = tmp_path / "shepard.yaml"
    config.write_text(f"nomad: {{token: inline-token, token_file: {token_file}}}\n")
    code, out, err = _check(config)
    assert code == 2 and out == ""
    assert err == f"nomad.token and nomad.token_file: both set in {config}; keep one\n"


def test_a_key_given_twice_is_rejected_naming_both_lines(tmp_path: Path) -> None:
    config = tmp_path / "shepard.yaml"
    config.write_text("concurrency: 2\nsession_ttl: 15s\nconcurrency: 5\n")
    code, out, err = _check(config)
    assert code == 2 and out == ""
    assert "duplicate key 'concurrency' (lines 1 and 3)" in err and str(config) in err, err


def test_a_quoted_number_says_the_value_was_a_string(tmp_path: Path) -> None:
    config = tmp_path / "shepard.yaml"
    config.write_text('concurrency: "2"\n')
    code, _, err = _check(config)
    assert code == 2
    assert (
        err == "concurrency: expected an integer >= 1, got '2' (a string: write the number without quotes)\n"
    )
