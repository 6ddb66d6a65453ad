"""Go duration text as Consul parses (``?wait=``, ``TTL``, ``LockDelay``) and prints it."""

from __future__ import annotations

import pytest

from shepard_lib.durations import format_go_duration, parse_go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("15s", 15.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("10us", 1e-5),
        ("-2s", -2.0),
        ("1h0m0s", 3600.0),
    ],
)
def test_parse_duration_accepts_go_syntax(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "missing unit"),
        ("ten", "invalid duration"),
        ("", "invalid duration"),
        ("5x", "unknown unit"),
    ],
)
def test_parse_duration_rejects_what_go_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(10.0, "10s"), (86400.0, "24h0m0s"), (90.0, "1m30s"), (1.5, "1.5s"), (0.25, "250ms"), (0.0, "0s")],
)
def test_format_duration_matches_go_string(seconds: float, text: str) -> None:
    assert format_go_duration(seconds, go_string=True) == text
