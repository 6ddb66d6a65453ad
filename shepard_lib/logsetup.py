"""Logging setup: human-readable text or JSON lines, with secrets redacted.

Shepard logs through the standard :mod:`logging` module. Context such as the task being
restarted goes in ``extra`` (``log.info("restarted", extra={"job": "web", "alloc": "1b2c"})``):
the text format appends it as ``key=value``, the JSON format adds it as fields.

:class:`RedactingFilter` replaces any configured secret (ACL tokens) that reaches a log record,
in the message, its arguments, extras or the formatted traceback: tokens are kept out of messages
on purpose, and this is the second line of defence.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from shepard_lib.config import REDACTED

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed to a log call with ``extra=``, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Replaces every occurrence of the given secrets in a record with ``<redacted>``.

    It formats the message (``msg % args``) and the traceback into the record, so handlers see
    only redacted text. Secrets shorter than 4 characters are ignored (they would match
    everywhere and protect nothing).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; never drops it."""
        if not self.secrets:
            return True
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in record_extras(record).items():
            if isinstance(value, str):
                setattr(record, key, self.redact(value))
        return True


class TextFormatter(logging.Formatter):
    """``2026-01-02 03:04:05,678 INFO shepard.rollout: message job=web alloc=1b2c``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The standard line plus the record's extras as ``key=value``."""
        line = super().format(record)
        extras = record_extras(record)
        if not extras:
            return line
        first, newline, rest = line.partition("\n")
        context = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{first} {context}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single-line JSON object."""
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        data: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            data.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, default=str, ensure_ascii=False)


class QuietLibraries(logging.Filter):
    """Drops the HTTP libraries' own records (urllib3's "Connection pool is full", its retry notes)
    unless Shepard logs at DEBUG: the backends report connection trouble in Shepard's words."""

    LIBRARIES = ("urllib3", "requests")

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it comes from an HTTP library and the root level is above DEBUG."""
        if not record.name.startswith(self.LIBRARIES):
            return True
        return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


class ShepardHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`setup_logging` installs (and replaces on the next call)."""


def logs_json() -> bool:
    """Whether the handler :func:`setup_logging` installed writes JSON lines (then every stderr line must)."""
    return any(
        isinstance(h, ShepardHandler) and isinstance(h.formatter, JsonFormatter)
        for h in logging.getLogger().handlers
    )


def setup_logging(
    level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = (), stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger: one handler on ``stream`` (stderr) in ``fmt`` (text|json).

    Replaces the handler a previous call installed (so the CLI can reconfigure once the config
    is loaded) and leaves other handlers alone. Returns the handler.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ShepardHandler)]:
        root.removeHandler(old)
    handler = ShepardHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(QuietLibraries())
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
