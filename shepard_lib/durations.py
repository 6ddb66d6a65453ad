"""Go ``time.Duration`` text: the one parser and formatter of durations in Shepard.

:func:`parse_go_duration` is Go's ``time.ParseDuration`` rule for rule (an optional sign, a
sequence of decimal numbers with optional fractions and a unit each, the bare ``"0"``, Go's
error messages), as Consul and Nomad apply it to ``?wait=``, ``TTL`` and the like.
:func:`format_go_duration` writes what those servers parse back. Policy (no bare numbers, no
negative durations, ranges) belongs to the callers: see :func:`shepard_lib.config.parse_duration`.
"""

from __future__ import annotations

import math

__all__ = ["format_go_duration", "parse_go_duration"]

_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_LIMIT = 1 << 63
_UINT64 = (1 << 64) - 1
_DIGITS = "0123456789"


def _quote(text: str) -> str:
    """Go's ``time.quote``: double quotes, bytes outside printable ASCII as ``\\xNN``."""
    out = ['"']
    for char in text:
        if char < " " or ord(char) >= 0x80:
            out += [f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogatepass")]
        elif char in '"\\':
            out.append("\\" + char)
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _leading_int(s: str) -> tuple[int, str] | None:
    """Go's ``leadingInt``: the leading ASCII digits as an integer, None on overflow past 2**63."""
    i, x = 0, 0
    while i < len(s) and s[i] in _DIGITS:
        if x > _LIMIT // 10:
            return None
        x = x * 10 + int(s[i])
        if x > _LIMIT:
            return None
        i += 1
    return x, s[i:]


def _leading_fraction(s: str) -> tuple[int, float, str]:
    """Go's ``leadingFraction``: digits, their scale; stops gaining precision on overflow."""
    i, x, scale, overflow = 0, 0, 1.0, False
    while i < len(s) and s[i] in _DIGITS:
        if not overflow:
            y = x * 10 + int(s[i])
            if x > (_LIMIT - 1) // 10 or y > _LIMIT:
                overflow = True
            else:
                x, scale = y, scale * 10
        i += 1
    return x, scale, s[i:]


def _parse_ns(text: str) -> int:
    invalid = ValueError(f"time: invalid duration {_quote(text)}")
    s, neg = text, False
    if s[:1] in ("-", "+"):
        neg, s = s[0] == "-", s[1:]
    if s == "0":
        return 0
    if not s:
        raise invalid
    total = 0
    while s:
        if not (s[0] == "." or s[0] in _DIGITS):
            raise invalid
        before = len(s)
        leading = _leading_int(s)
        if leading is None:
            raise invalid
        whole, s = leading
        pre = len(s) != before
        fraction, scale, post = 0, 1.0, False
        if s[:1] == ".":
            s = s[1:]
            before = len(s)
            fraction, scale, s = _leading_fraction(s)
            post = len(s) != before
        if not pre and not post:
            raise invalid
        end = 0
        while end < len(s) and not (s[end] == "." or s[end] in _DIGITS):
            end += 1
        if end == 0:
            raise ValueError(f"time: missing unit in duration {_quote(text)}")
        unit_name, s = s[:end], s[end:]
        unit = _NS.get(unit_name)
        if unit is None:
            raise ValueError(f"time: unknown unit {_quote(unit_name)} in duration {_quote(text)}")
        if whole > _LIMIT // unit:
            raise invalid
        value = whole * unit
        if fraction > 0:
            value += int(float(fraction) * (float(unit) / scale))
            if value > _LIMIT:
                raise invalid
        total = (total + value) & _UINT64  # Go adds in uint64
        if total > _LIMIT:
            raise invalid
    if neg:
        return -total
    if total > _LIMIT - 1:
        raise invalid
    return total


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string, exactly as Go's ``time.ParseDuration`` reads it.

    ``"1h30m"``, ``"1.5s"``, ``"250ms"``, ``"-2s"``, ``"+5s"``, ``"0"``; ``"5"`` (no unit),
    ``" 5s"`` (whitespace) and ``"1d"`` (no such unit) are errors. Raises ValueError with Go's
    message, which quotes the input: ``time: missing unit in duration "5"``.
    """
    return _parse_ns(text) / 1e9


def format_go_duration(seconds: float, *, go_string: bool = False) -> str:
    """``seconds`` as a duration string Go parses back, to the nanosecond.

    By default the compact form (``"15s"``, ``"1.5s"``, ``"250ms"``, ``"2m"``, ``"1h30m"``,
    ``"24h"``, ``"0s"``): Go's ``Duration.String()`` without its zero minutes and seconds.
    ``go_string=True`` gives ``Duration.String()`` itself (``"2m0s"``, ``"24h0m0s"``), the text
    Consul and Nomad print in their messages. ValueError for NaN or infinity.
    """
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {seconds!r}")
    ns = round(seconds * 1e9)
    sign, ns = ("-" if ns < 0 else ""), abs(ns)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 6)}ms"
    whole, fraction = divmod(ns, 1_000_000_000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h" if hours else ""
    if minutes or (hours and go_string):
        text += f"{minutes}m"
    if secs or fraction or go_string or not text:
        text += _decimal(secs * 1_000_000_000 + fraction, 9) + "s"
    return sign + text


def _decimal(value: int, places: int) -> str:
    """``value / 10**places`` without trailing zeros (Go's ``fmtFrac`` then ``fmtInt``)."""
    whole, fraction = divmod(value, 10**places)
    digits = f"{fraction:0{places}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)
