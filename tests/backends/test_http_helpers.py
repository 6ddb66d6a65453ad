"""The helpers both backends share: durations, timeouts, error classification, redaction, retries."""

from __future__ import annotations

import logging

import pytest

from shepard_lib.backends._http import (
    REDACTED,
    RetryPolicy,
    blocking_timeout,
    call_with_retry,
    go_duration,
    redact,
    tls_settings,
    transient_status,
)
from shepard_lib.clock import Clock
from shepard_lib.errors import ConsulError


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (0.3, "300ms"), (15.0, "15s"), (1.5, "1.5s"), (0, "1ms"), (0.0004, "1ms"), (300, "5m")],
)
def test_go_duration_is_compact_to_the_millisecond_and_never_zero(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_blocking_timeout_is_real_seconds_of_wait_plus_jitter_plus_margin() -> None:
    assert blocking_timeout(16.0, Clock(), margin=10.0) == pytest.approx(27.0)
    # At scale 50 a 16 cluster-second wait is 0.32 real seconds (plus 1/16 jitter).
    assert blocking_timeout(16.0, Clock(scale=50), margin=1.0) == pytest.approx(16 * 17 / 16 / 50 + 1.0)


@pytest.mark.parametrize(
    ("status", "body", "transient"),
    [
        (429, "Too Many Requests", True),
        (500, "No cluster leader", True),
        (500, "rpc error making call: EOF", True),
        (502, "", True),
        (503, "Service Unavailable", True),
        (500, 'invalid session "abc"', False),
        (500, "Missing check 'serfHealth' registration", False),
        (500, "Unknown allocation", False),
        (400, "bad request", False),
        (403, "Permission denied", False),
        (404, "", False),
        (409, "txn rolled back", False),
    ],
)
def test_only_outages_are_transient(status: int, body: str, transient: bool) -> None:
    assert transient_status(status, body) is transient


@pytest.mark.parametrize(
    ("status", "body", "transient"),
    [
        (429, "Too Many Requests", True),
        (503, "Service Unavailable", True),
        (500, "No cluster leader", True),
        (500, "rpc error making call: EOF", False),
        (502, "", False),
        (504, "Gateway Timeout", False),
    ],
)
def test_a_write_that_must_not_repeat_is_retried_only_when_nothing_was_applied(
    status: int, body: str, transient: bool
) -> None:
    assert transient_status(status, body, repeatable=False) is transient


def test_redact_removes_secrets_and_token_parameters() -> None:
    text = "GET http://c:8500/v1/kv/x?token=s3cr3t&dc=a failed; X-Consul-Token: other-secret; mine=abc123"
    out = redact(text, ["abc123"])
    assert "s3cr3t" not in out and "other-secret" not in out and "abc123" not in out
    assert out.count(REDACTED) == 3
    assert "dc=a" in out


def test_tls_settings_verify_by_default_and_use_the_ca_file() -> None:
    assert tls_settings(True, None, None, None) == (True, None)
    assert tls_settings(True, "/ca.pem", "/c.pem", "/k.pem") == ("/ca.pem", ("/c.pem", "/k.pem"))
    assert tls_settings(False, "/ca.pem", "/c.pem", None) == (False, "/c.pem")


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial=-1)


def test_call_with_retry_retries_transient_errors_through_the_clock(caplog: pytest.LogCaptureFixture) -> None:
    slept: list[float] = []

    class RecordingClock(Clock):
        def sleep(self, seconds: float) -> None:
            slept.append(seconds)

    error = ConsulError("kv.get a", "x", 503, transient=True)
    outcomes: list[Exception | str] = [error, error, "ok"]

    def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    policy = RetryPolicy(attempts=5, initial=1.0, maximum=3.0, jitter=0.0)
    with caplog.at_level(logging.WARNING, logger="shepard_lib.backends"):
        assert call_with_retry(flaky, call="kv.get a", policy=policy, clock=RecordingClock()) == "ok"
    assert slept == [1.0, 2.0], "exponential backoff in cluster seconds, slept on the given clock"
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    assert all("kv.get a" in r.getMessage() for r in caplog.records)


def test_call_with_retry_gives_up_after_the_attempts_and_reraises_the_last_error() -> None:
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise ConsulError("kv.get a", f"down {calls}", 503, transient=True)

    with pytest.raises(ConsulError, match="down 3"):
        call_with_retry(
            down, call="kv.get a", policy=RetryPolicy(attempts=3, initial=0), clock=Clock(scale=1000)
        )
    assert calls == 3


def test_call_with_retry_does_not_retry_a_permanent_error() -> None:
    calls = 0

    def forbidden() -> None:
        nonlocal calls
        calls += 1
        raise ConsulError("kv.get a", "Permission denied", 403)

    with pytest.raises(ConsulError):
        call_with_retry(forbidden, call="kv.get a", policy=RetryPolicy(), clock=Clock(scale=1000))
    assert calls == 1
