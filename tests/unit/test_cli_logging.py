"""Logging setup: text and JSON lines, extras, and tokens redacted from every part of a record."""

from __future__ import annotations

import io
import json
import logging

import pytest

from shepard_lib.logsetup import RedactingFilter, setup_logging

TOKEN = "b3c1e5d2-0000-4f00-9e00-5ec7e7000000"


pytestmark = pytest.mark.usefixtures("restore_logging")


def test_json_lines_have_the_standard_fields_and_extras() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    log = logging.getLogger("shepard.rollout")
    log.info(
        "restarted %s", "server", extra={"job": "web", "group": "app", "task": "server", "alloc": "1b2c"}
    )
    log.debug("not shown at INFO")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == "shepard.rollout"
    assert record["message"] == "restarted server"
    assert record["ts"].endswith("Z") and record["ts"][10] == "T"
    assert {k: record[k] for k in ("job", "group", "task", "alloc")} == {
        "job": "web",
        "group": "app",
        "task": "server",
        "alloc": "1b2c",
    }


def test_json_includes_the_traceback_on_one_line() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("shepard").exception("failed")
    (line,) = stream.getvalue().splitlines()
    assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_text_format_appends_extras() -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", "text", stream=stream)
    logging.getLogger("shepard.x").debug("waiting", extra={"job": "web"})
    line = stream.getvalue().rstrip("\n")
    assert line.endswith(" DEBUG shepard.x: waiting job=web")


def test_tokens_are_redacted_from_message_args_extras_and_traceback() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", secrets=[TOKEN], stream=stream)
    log = logging.getLogger("shepard.backend")
    log.info("calling with token %s", TOKEN, extra={"header": f"X-Consul-Token: {TOKEN}"})
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        log.exception("request for %s failed", TOKEN)
    output = stream.getvalue()
    assert TOKEN not in output
    assert output.count("<redacted>") == 4


def test_text_format_redacts_too() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "text", secrets=[TOKEN], stream=stream)
    logging.getLogger("shepard").warning(f"leaked {TOKEN}")
    assert stream.getvalue().rstrip().endswith("leaked <redacted>")


def test_setup_replaces_its_previous_handler_only() -> None:
    other = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(other)
    try:
        first = setup_logging("INFO", "text", stream=io.StringIO())
        second = setup_logging("INFO", "json", stream=io.StringIO())
        assert first not in root.handlers
        assert second in root.handlers
        assert other in root.handlers
    finally:
        root.removeHandler(other)


def test_short_secrets_are_ignored() -> None:
    assert RedactingFilter(["", "ab", "abcd"]).secrets == ["abcd"]


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="text or json"):
        setup_logging("INFO", "xml")


def test_urllib3_pool_warnings_never_reach_the_user_unless_debugging() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "text", stream=stream)
    pool = logging.getLogger("urllib3.connectionpool")
    pool.warning("Connection pool is full, discarding connection: %s. Connection pool size: %s", "h", 10)
    logging.getLogger("shepard_lib.backends").warning("cannot reach Consul at http://h:1: connection refused")
    assert "Connection pool is full" not in stream.getvalue()
    assert "cannot reach Consul" in stream.getvalue()

    setup_logging("DEBUG", "text", stream=stream)
    pool.warning("Connection pool is full, discarding connection: %s. Connection pool size: %s", "h", 10)
    assert "Connection pool is full" in stream.getvalue(), "--log-level DEBUG shows the libraries too"
