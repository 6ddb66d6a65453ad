"""Go duration text: parsed exactly as Go's time.ParseDuration, formatted so Go parses it back."""

from __future__ import annotations

import math

import pytest

from shepard_lib.durations import format_go_duration, parse_go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("-0", 0.0),
        ("+0", 0.0),
        ("0s", 0.0),
        ("15s", 15.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("250ms", 0.25),
        ("10us", 1e-5),
        ("10µs", 1e-5),  # micro sign
        ("10μs", 1e-5),  # Greek mu
        ("100ns", 1e-7),
        ("-2s", -2.0),
        ("+5s", 5.0),
        ("-1.5h", -5400.0),
        ("1h0m0s", 3600.0),
        ("1s1s", 2.0),  # Go sums repeated units
        ("2562047h47m16.854775807s", 9223372036.854775807),  # the largest Duration
        ("-2562047h47m16.854775808s", -9223372036.854775808),  # the smallest
    ],
)
def test_parse_accepts_what_go_accepts(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-15)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'time: invalid duration ""'),
        ("-", 'time: invalid duration "-"'),
        ("ten", 'time: invalid duration "ten"'),
        ("s15", 'time: invalid duration "s15"'),
        (".s", 'time: invalid duration ".s"'),
        ("--5s", 'time: invalid duration "--5s"'),
        (" 5s", 'time: invalid duration " 5s"'),
        ("5", 'time: missing unit in duration "5"'),
        ("-10", 'time: missing unit in duration "-10"'),
        ("1..5s", 'time: missing unit in duration "1..5s"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("5S", 'time: unknown unit "S" in duration "5S"'),
        ("5 s", 'time: unknown unit " s" in duration "5 s"'),
        ("1h 30m", 'time: unknown unit "h " in duration "1h 30m"'),
        ("5µx", r'time: unknown unit "\xc2\xb5x" in duration "5\xc2\xb5x"'),
        ("٣s", r'time: invalid duration "\xd9\xa3s"'),  # only ASCII digits are digits
        ('"5"s', r'time: invalid duration "\"5\"s"'),
        ("9223372036854775808ns", 'time: invalid duration "9223372036854775808ns"'),
        ("2562048h", 'time: invalid duration "2562048h"'),
        ("99999999999999999999s", 'time: invalid duration "99999999999999999999s"'),
    ],
)
def test_parse_rejects_what_go_rejects_with_gos_message(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_go_duration(text)
    assert str(err.value) == message


def test_parse_keeps_nanosecond_precision_of_long_fractions() -> None:
    assert parse_go_duration("0.000000001s") == pytest.approx(1e-9)
    # Go stops gaining precision after 19 fraction digits instead of failing.
    assert parse_go_duration("1.00000000000000000000000001s") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("seconds", "compact", "go_string"),
    [
        (0, "0s", "0s"),
        (15, "15s", "15s"),
        (1.5, "1.5s", "1.5s"),
        (0.25, "250ms", "250ms"),
        (0.3, "300ms", "300ms"),
        (1.5e-6, "1.5µs", "1.5µs"),
        (42e-9, "42ns", "42ns"),
        (90, "1m30s", "1m30s"),
        (120, "2m", "2m0s"),
        (3600, "1h", "1h0m0s"),
        (3605, "1h5s", "1h0m5s"),
        (5400, "1h30m", "1h30m0s"),
        (86400, "24h", "24h0m0s"),
        (1.23456789, "1.23456789s", "1.23456789s"),
        (-2, "-2s", "-2s"),
        (-90.5, "-1m30.5s", "-1m30.5s"),
    ],
)
def test_format_is_compact_or_gos_own_string(seconds: float, compact: str, go_string: str) -> None:
    assert format_go_duration(seconds) == compact
    assert format_go_duration(seconds, go_string=True) == go_string


@pytest.mark.parametrize("seconds", [0.001, 0.1 + 0.2, 59.999, 61, 3599.5, 86399.000000001, 7 * 86400, 1e-9])
def test_format_round_trips_through_parse(seconds: float) -> None:
    for go_string in (False, True):
        assert parse_go_duration(format_go_duration(seconds, go_string=go_string)) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf])
def test_format_rejects_non_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match="not a finite duration"):
        format_go_duration(seconds)
