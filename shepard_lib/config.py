"""Shepard's configuration: a YAML file, the official CLIs' environment variables, defaults.

Where a setting comes from, highest first: explicit overrides (command-line flags), the file
(``--config`` or ``SHEPARD_CONFIG_PATH``), the environment variables of the ``consul`` and
``nomad`` CLIs (``CONSUL_HTTP_ADDR``, ``NOMAD_TOKEN``, ...), the defaults. The environment fills
in only what the file leaves unsaid.

Everything is validated at once; a bad configuration raises :class:`ConfigError` with one message
per problem, each naming the key path and what was expected. Durations are Go-style strings as in
Nomad (``15s``, ``1m30s``, ``250ms``) and become float seconds. Every key's default and one-line
description live on the dataclass fields below (``metadata["doc"]``); :func:`reference_table`
renders them for ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import voluptuous as vol

from shepard_lib.durations import format_go_duration, parse_go_duration
from shepard_lib.errors import ConfigError
from shepard_lib.yamlfile import read_yaml_mapping

CONFIG_PATH_ENV = "SHEPARD_CONFIG_PATH"
TIME_SCALE_ENV = "SHEPARD_TIME_SCALE"
"""Sets ``time_scale`` where the file does not: what ``shepard sim serve`` tells Shepard to export."""
REDACTED = "<redacted>"
SYSLOG_UDP_MAX_LINE = 56 * 1024
"""The largest ``log_shipping.max_line_bytes`` with syslog over UDP: a datagram holds 65507 bytes,
and about 8 KiB are left for the RFC 5424 header with its tags."""


class LockScope(enum.StrEnum):
    """Which restarts coordinate with each other: all of a task's, or only those on one node."""

    CLUSTER = "cluster"
    NODE = "node"


class RestartMethod(enum.StrEnum):
    """How a task is restarted: a new trigger value (shepard.tpl) or Nomad's restart API."""

    CONSUL_KEY = "consul_key"
    NOMAD_API = "nomad_api"


class HealthSource(enum.StrEnum):
    """Where a restarted task's health is read."""

    CONSUL = "consul"
    NOMAD = "nomad"
    BOTH = "both"


class LogSink(enum.StrEnum):
    """Where shipped task logs go."""

    FILE = "file"
    SYSLOG = "syslog"
    HTTP = "http"


class SyslogProtocol(enum.StrEnum):
    """Transport of the syslog sink."""

    TCP = "tcp"
    UDP = "udp"


class HttpFormat(enum.StrEnum):
    """Body format of the HTTP sink."""

    LOKI = "loki"
    NDJSON = "ndjson"


class StartAt(enum.StrEnum):
    """Where log shipping starts in the log files present on its first run."""

    BEGINNING = "beginning"
    END = "end"


def _docs(text: str) -> dict[str, str]:
    """Field metadata: the one-line description of a setting (see reference_table)."""
    return {"doc": text}


@dataclass(frozen=True)
class ConsulConfig:
    """How to reach Consul."""

    address: str = field(
        default="http://127.0.0.1:8500",
        metadata=_docs("Consul HTTP address; `host:port` means http (https with `CONSUL_HTTP_SSL=true`)."),
    )
    token: str | None = field(
        default=None,
        metadata=_docs("ACL token; or `token_file`, a file holding it. Env: `CONSUL_HTTP_TOKEN`."),
    )
    ca_file: str | None = field(default=None, metadata=_docs("CA certificate (PEM). Env: `CONSUL_CACERT`."))
    cert_file: str | None = field(
        default=None, metadata=_docs("Client certificate (PEM), with `key_file`. Env: `CONSUL_CLIENT_CERT`.")
    )
    key_file: str | None = field(
        default=None, metadata=_docs("Client certificate key (PEM). Env: `CONSUL_CLIENT_KEY`.")
    )
    verify: bool = field(
        default=True, metadata=_docs("Verify the server's TLS certificate. Env: `CONSUL_HTTP_SSL_VERIFY`.")
    )
    datacenter: str | None = field(default=None, metadata=_docs("Datacenter to query; default: the agent's."))


@dataclass(frozen=True)
class NomadConfig:
    """How to reach Nomad."""

    address: str = field(
        default="http://127.0.0.1:4646", metadata=_docs("Nomad HTTP address; `host:port` means http.")
    )
    token: str | None = field(
        default=None, metadata=_docs("ACL token; or `token_file`, a file holding it. Env: `NOMAD_TOKEN`.")
    )
    namespace: str = field(
        default="default", metadata=_docs("Namespace of the jobs. Env: `NOMAD_NAMESPACE`.")
    )
    region: str | None = field(
        default=None, metadata=_docs("Region; default: the agent's. Env: `NOMAD_REGION`.")
    )
    ca_file: str | None = field(default=None, metadata=_docs("CA certificate (PEM). Env: `NOMAD_CACERT`."))
    cert_file: str | None = field(
        default=None, metadata=_docs("Client certificate (PEM), with `key_file`. Env: `NOMAD_CLIENT_CERT`.")
    )
    key_file: str | None = field(
        default=None, metadata=_docs("Client certificate key (PEM). Env: `NOMAD_CLIENT_KEY`.")
    )
    verify: bool = field(
        default=True,
        metadata=_docs("Verify the server's TLS certificate. Env: `NOMAD_SKIP_VERIFY` (inverted)."),
    )


@dataclass(frozen=True)
class LogShippingConfig:
    """Shipping of task logs (``alloc/logs``) to one or more sinks (``shepard_lib.logship``)."""

    enabled: bool = field(default=False, metadata=_docs("Ship the stdout/stderr logs of this node's tasks."))
    sink: tuple[LogSink, ...] = field(
        default=(LogSink.FILE,),
        metadata=_docs("Where to: `file`, `syslog`, `http`, or a list of them (each gets every line)."),
    )
    start_at: StartAt = field(
        default=StartAt.BEGINNING,
        metadata=_docs(
            "First run only: ship the logs already there (`beginning`) or only new lines (`end`);"
            " allocations that appear later ship from their first line."
        ),
    )
    tags: dict[str, str] = field(
        default_factory=dict,
        metadata=_docs("Static tags added to every record (`{env: prod}`); names `[A-Za-z_][A-Za-z0-9_.]*`."),
    )
    checkpoint_path: str = field(
        default="/var/lib/shepard/logship-checkpoints.json",
        metadata=_docs("Where each sink's position in each log stream is kept (rewritten atomically)."),
    )
    max_line_bytes: int = field(
        default=16384,
        metadata=_docs(
            "Longer lines are cut into pieces of at most this size (between UTF-8 characters),"
            f" each marked `log.cut`; at most {SYSLOG_UDP_MAX_LINE} with the `syslog` sink over `udp`"
            " (one datagram)."
        ),
    )
    batch_size: int = field(
        default=5000,
        metadata=_docs(
            "Most records sent in one write or request (at most one batch is shipped twice after a crash)."
        ),
    )
    batch_bytes: int = field(
        default=1048576,
        metadata=_docs(
            "Line bytes after which a batch is sent (the line that reaches them is the batch's last,"
            " so a batch may pass them by less than one line)."
        ),
    )
    buffer_limit: int = field(
        default=0,
        metadata=_docs(
            "Most unshipped bytes a sink may fall behind in a stream before the oldest lines are"
            " dropped (and counted); `0`: never drop, only Nomad's own log rotation bounds the backlog."
        ),
    )
    path: str = field(
        default="/var/log/shepard/tasks.jsonl",
        metadata=_docs("`file` sink: the JSON-lines file to append to."),
    )
    file_max_bytes: int = field(
        default=104857600, metadata=_docs("`file` sink: rotate the file before it grows past this size.")
    )
    file_max_files: int = field(
        default=5, metadata=_docs("`file` sink: rotated files kept (`path.1` ... `path.N`).")
    )
    syslog_address: str = field(
        default="127.0.0.1:514", metadata=_docs("`syslog` sink: `host:port` of the syslog server.")
    )
    syslog_protocol: SyslogProtocol = field(
        default=SyslogProtocol.UDP,
        metadata=_docs("`syslog` sink: `tcp` (octet-counted, RFC 6587) or `udp` (RFC 5424 messages)."),
    )
    syslog_app_name: str = field(default="shepard", metadata=_docs("`syslog` sink: the APP-NAME field."))
    http_url: str | None = field(
        default=None,
        metadata=_docs("`http` sink: URL to POST to (e.g. `http://loki:3100/loki/api/v1/push`)."),
    )
    http_format: HttpFormat = field(
        default=HttpFormat.LOKI, metadata=_docs("`http` sink: `loki` (push API) or `ndjson`.")
    )


@dataclass(frozen=True)
class ShepardConfig:
    """The validated, effective configuration. Durations are float seconds."""

    consul: ConsulConfig = field(default_factory=ConsulConfig, metadata=_docs("Consul connection."))
    nomad: NomadConfig = field(default_factory=NomadConfig, metadata=_docs("Nomad connection."))
    node_name: str | None = field(
        default=None, metadata=_docs("This node's Nomad name; default: the local agent's (`/v1/agent/self`).")
    )
    nomad_data_dir: str = field(
        default="/opt/nomad/data",
        metadata=_docs("The Nomad client's `data_dir` (allocations are under `alloc/`)."),
    )
    key_prefix: str = field(default="shepard", metadata=_docs("Consul KV prefix of every Shepard key."))
    lock_scope: LockScope = field(
        default=LockScope.CLUSTER,
        metadata=_docs(
            "`cluster`: limit restarts of a task cluster-wide; `node`: per node (the seed's paths)."
        ),
    )
    concurrency: int = field(
        default=1,
        metadata=_docs("Instances of a task restarted at once (job meta `shepard_concurrency` overrides)."),
    )
    restart_method: RestartMethod = field(
        default=RestartMethod.CONSUL_KEY,
        metadata=_docs(
            "`consul_key`: write the trigger key shepard.tpl reads; `nomad_api`: Nomad's restart API."
        ),
    )
    health_source: HealthSource = field(
        default=HealthSource.CONSUL,
        metadata=_docs("Health of a restarted task from `consul` checks, `nomad` task state, or `both`."),
    )
    session_ttl: float = field(
        default=15.0, metadata=_docs("TTL of the Consul session holding Shepard's locks (10s to 24h).")
    )
    lock_delay: float = field(
        default=15.0, metadata=_docs("Consul lock-delay after a session is invalidated (0s to 60s).")
    )
    settle_time: float = field(
        default=2.0,
        metadata=_docs("Quiet period after a file change before acting, so one update is one event."),
    )
    min_healthy_time: float = field(
        default=10.0, metadata=_docs("How long a restarted task must stay healthy to count as done.")
    )
    healthy_deadline: float = field(
        default=300.0,
        metadata=_docs("Give up on a restarted task that is not healthy by then (it has failed)."),
    )
    slot_timeout: float = field(
        default=3600.0, metadata=_docs("Longest wait for a free restart slot before giving up.")
    )
    max_failures: int = field(
        default=1,
        metadata=_docs("Failed restarts a rollout tolerates before it stops (0: stop at the first)."),
    )
    watch_secrets: bool = field(
        default=False, metadata=_docs("Also watch each task's `secrets/` directory for changes.")
    )
    gc_interval: float = field(default=300.0, metadata=_docs("How often stale keys are garbage-collected."))
    node_cleanup_timeout: float = field(
        default=86400.0,
        metadata=_docs(
            "Delete the keys of a node down (or disconnected) for this long;"
            " a node gone from Nomad loses its keys at once."
        ),
    )
    gc_plan_retention: float = field(
        default=86400.0, metadata=_docs("Keep a `complete` restart plan this long before it is collected.")
    )
    ship_log_interval: float = field(
        default=60.0, metadata=_docs("How often new task log lines are shipped.")
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata=_docs("Agent: on SIGTERM, how long a restart in flight may finish before the agent exits."),
    )
    log_shipping: LogShippingConfig = field(
        default_factory=LogShippingConfig, metadata=_docs("Log shipping.")
    )
    metrics_address: str | None = field(
        default=None,
        metadata=_docs("`host:port` to serve Prometheus metrics on; unset: no metrics endpoint."),
    )
    log_level: str = field(
        default="INFO", metadata=_docs("`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`.")
    )
    log_format: str = field(
        default="text", metadata=_docs("`text` for people, `json` for one JSON object a line.")
    )
    time_scale: float = field(
        default=1.0, metadata=_docs("Simulator and demo only: run the clock this many times faster.")
    )


def default_config() -> ShepardConfig:
    """The defaults and nothing else (no file, no environment)."""
    return ShepardConfig()


# --- values -------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """Seconds in a duration setting: a Go duration string (``1h30m``, ``1.5s``, ``250ms``) or ``0``.

    Shepard's policy on top of :func:`~shepard_lib.durations.parse_go_duration`, the same for the
    configuration and scenario files: a bare number other than ``0`` is rejected (it would be
    seconds to some readers and nanoseconds to Go), and so is a sign. ValueError otherwise.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and value[:1] not in ("+", "-"):
        try:
            return parse_go_duration(value)
        except ValueError:
            pass
    raise ValueError(f"not a duration: {_shown(value)} (durations look like 15s, 2m, 1h30m)")


def _shown(value: Any) -> str:
    """A value as a problem message quotes it: ``'5'``, ``true``, ``a mapping``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return f"'{value}'"


def _duration(low: float, high: float | None) -> Callable[[Any], float]:
    if high is None:
        span = f"of at least {format_go_duration(low)}"
    else:
        span = f"between {format_go_duration(low)} and {format_go_duration(high)}"
    expected = f"expected a duration {span}"

    def validate(value: Any) -> float:
        try:
            seconds: float | None = parse_duration(value)
        except ValueError:
            seconds = None
        if seconds is None or seconds < low or (high is not None and seconds > high):
            raise vol.Invalid(f"{expected}, got {_shown(value)} (durations look like 15s, 2m, 1h30m)")
        return seconds

    return validate


def _quoted_hint(value: Any, kind: str) -> str:
    """`` (a string: write the number without quotes)`` when ``value`` is a string, else ``""``."""
    return f" (a string: write the {kind} without quotes)" if isinstance(value, str) else ""


def _integer(low: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            hint = _quoted_hint(value, "number")
            raise vol.Invalid(f"expected an integer >= {low}, got {_shown(value)}{hint}")
        return value

    return validate


def _positive_number(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise vol.Invalid(f"expected a number > 0, got {_shown(value)}{_quoted_hint(value, 'number')}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid(f"expected true or false, got {_shown(value)}{_quoted_hint(value, 'boolean')}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise vol.Invalid(f"expected a non-empty string, got {_shown(value)}")
    return value


def _secret(value: Any) -> str:
    """A token: like _text, but the problem never shows the value."""
    if not isinstance(value, str) or not value.strip():
        raise vol.Invalid("expected a non-empty string (value not shown)")
    return value


def _choice(enum_type: type[enum.StrEnum]) -> Callable[[Any], enum.StrEnum]:
    names = [m.value for m in enum_type]

    def validate(value: Any) -> enum.StrEnum:
        if isinstance(value, str) and value in names:
            return enum_type(value)
        raise vol.Invalid(f"expected one of {', '.join(names)}, got {_shown(value)}")

    return validate


def _one_of(*names: str, upper: bool = False) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        if isinstance(value, str):
            candidate = value.upper() if upper else value
            if candidate in names:
                return candidate
        raise vol.Invalid(f"expected one of {', '.join(names)}, got {_shown(value)}")

    return validate


def _file(value: Any) -> str:
    path = _text(value)
    if not Path(path).is_file():
        raise vol.Invalid(f"file not found: {path}")
    return path


def _host_port(value: Any) -> str:
    expected = f"expected host:port, got {_shown(value)}"
    if not isinstance(value, str):
        raise vol.Invalid(expected)
    if any(char.isspace() for char in value):
        raise vol.Invalid(f"{expected}: whitespace inside an address")
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path or parts.username:
        raise vol.Invalid(expected)
    try:
        _check_host(parts.hostname)
    except ValueError as exc:
        raise vol.Invalid(f"{expected}: {exc}") from None
    return value


def _key_prefix(value: Any) -> str:
    from shepard_lib.keyspace import check_prefix  # keyspace imports this module

    if not isinstance(value, str):
        raise vol.Invalid(f"expected a key prefix like 'shepard', got {_shown(value)}")
    try:
        check_prefix(value)
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None
    return value


def _url(value: Any) -> str:
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname:
            return value
        value = redact_url(value)
    raise vol.Invalid(f"expected an http:// or https:// URL, got {_shown(value)}")


def _url_secrets(url: str) -> tuple[str | None, list[str]]:
    """The password of ``url``'s userinfo (None without one) and its query string values, as written."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    password = userinfo.partition(":")[2] if at and ":" in userinfo else None
    values = [item.partition("=")[2] for item in parts.query.split("&")]
    return password, [v for v in values if v]


def redact_url(url: str) -> str:
    """``url`` with the userinfo password and every query string value shown as ``<redacted>``.

    ``https://user:pw@loki.example/push?token=abc`` -> ``https://user:<redacted>@loki.example/push?token=<redacted>``.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    query = "&".join(
        f"{name}={REDACTED}" if eq and value else item
        for item in parts.query.split("&")
        for name, eq, value in [item.partition("=")]
    )
    return parts._replace(netloc=netloc, query=query).geturl()


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name (letters, digits, ``-``, ``_``, dots); else ValueError.

    IPv6 addresses come back in brackets (``[::1]``), ready to be followed by ``:port``.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"{host!r} is not a valid host name") from None
        return host
    return f"[{host}]" if address.version == 6 else host


def normalize_address(value: str) -> str:
    """``scheme://host:port`` for an address given with or without a scheme or port.

    ``127.0.0.1:8500`` -> ``http://127.0.0.1:8500``; ``https://consul.example.com`` ->
    ``https://consul.example.com:443`` (the port the CLIs would use); ``unix:///path`` is kept.
    ValueError, saying why, when it is not an address: another scheme, a path, user info,
    whitespace inside, a host name with characters DNS does not allow, port 0 or past 65535.
    """
    text = value.strip()
    if text.startswith("unix://"):
        if len(text) <= len("unix://"):
            raise ValueError("no socket path")
        return text
    if any(char.isspace() for char in text):
        # urlsplit silently drops tabs and newlines: refuse them here.
        raise ValueError("whitespace inside an address")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise ValueError("no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a path, query or fragment is not part of an address")
    if parts.username is not None:
        raise ValueError("user info is not part of an address")
    port = parts.port  # ValueError past 65535 or not a number
    if port == 0:
        raise ValueError("port 0 is not a port a server listens on")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{_check_host(parts.hostname)}:{port}"


def _address(value: Any) -> str:
    expected = f"expected an address like http://127.0.0.1:8500 or 127.0.0.1:8500, got {_shown(value)}"
    if not isinstance(value, str):
        raise vol.Invalid(expected)
    try:
        return normalize_address(value)
    except ValueError as exc:
        raise vol.Invalid(f"{expected}: {exc}") from None


def _sinks(value: Any) -> tuple[LogSink, ...]:
    """``log_shipping.sink``: one sink name or a list of distinct ones."""
    names = value if isinstance(value, list) else [value]
    sinks = tuple(_choice(LogSink)(name) for name in names)
    if not sinks:
        raise vol.Invalid("expected a sink or a list of sinks, got an empty list")
    if len(set(sinks)) != len(sinks):
        raise vol.Invalid(f"each sink may be listed once, got {', '.join(str(s) for s in sinks)}")
    return sinks  # type: ignore[return-value]


_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,31}")
_RESERVED_TAGS = ("nomad.", "log.", "stream")


def _static_tags(value: Any) -> dict[str, str]:
    """``log_shipping.tags``: a mapping of tag names (syslog SD-PARAM-safe, not Shepard's own) to strings."""
    if not isinstance(value, dict):
        raise vol.Invalid(f"expected a mapping of tag names to strings, got {_shown(value)}")
    for name, text in value.items():
        if not isinstance(name, str) or not _TAG_NAME.fullmatch(name):
            raise vol.Invalid(
                f"tag name {_shown(name)}: expected up to 32 of [A-Za-z0-9_.], not starting with a digit"
            )
        if name.startswith(_RESERVED_TAGS):
            raise vol.Invalid(f"tag name {name!r}: nomad.*, log.* and stream* are Shepard's own tags")
        if not isinstance(text, str):
            raise vol.Invalid(f"tag {name}: expected a string, got {_shown(text)}")
    return dict(value)


# --- schema -------------------------------------------------------------------------------

_TLS = {
    vol.Optional("token"): _secret,
    vol.Optional("token_file"): _file,
    vol.Optional("ca_file"): _file,
    vol.Optional("cert_file"): _file,
    vol.Optional("key_file"): _file,
    vol.Optional("verify"): _boolean,
}
_DURATIONS: dict[str, tuple[float, float | None]] = {
    "session_ttl": (10.0, 86400.0),
    "lock_delay": (0.0, 60.0),
    "settle_time": (0.0, 3600.0),
    "min_healthy_time": (0.0, 86400.0),
    "healthy_deadline": (1.0, 7 * 86400.0),
    "slot_timeout": (1.0, 7 * 86400.0),
    "gc_interval": (1.0, 7 * 86400.0),
    "node_cleanup_timeout": (60.0, None),
    "gc_plan_retention": (0.0, None),
    "ship_log_interval": (1.0, 86400.0),
    "shutdown_timeout": (1.0, 3600.0),
}
SCHEMA = vol.Schema(
    {
        vol.Optional("consul"): {
            vol.Optional("address"): _address,
            vol.Optional("datacenter"): _text,
            **_TLS,
        },
        vol.Optional("nomad"): {
            vol.Optional("address"): _address,
            vol.Optional("namespace"): _text,
            vol.Optional("region"): _text,
            **_TLS,
        },
        vol.Optional("node_name"): _text,
        vol.Optional("nomad_data_dir"): _text,
        vol.Optional("key_prefix"): _key_prefix,
        vol.Optional("lock_scope"): _choice(LockScope),
        vol.Optional("concurrency"): _integer(1),
        vol.Optional("restart_method"): _choice(RestartMethod),
        vol.Optional("health_source"): _choice(HealthSource),
        **{vol.Optional(name): _duration(low, high) for name, (low, high) in _DURATIONS.items()},
        vol.Optional("max_failures"): _integer(0),
        vol.Optional("watch_secrets"): _boolean,
        vol.Optional("log_shipping"): {
            vol.Optional("enabled"): _boolean,
            vol.Optional("sink"): _sinks,
            vol.Optional("start_at"): _choice(StartAt),
            vol.Optional("tags"): _static_tags,
            vol.Optional("checkpoint_path"): _text,
            vol.Optional("max_line_bytes"): _integer(256),
            vol.Optional("batch_size"): _integer(1),
            vol.Optional("batch_bytes"): _integer(1024),
            vol.Optional("buffer_limit"): _integer(0),
            vol.Optional("path"): _text,
            vol.Optional("file_max_bytes"): _integer(4096),
            vol.Optional("file_max_files"): _integer(0),
            vol.Optional("syslog_address"): _host_port,
            vol.Optional("syslog_protocol"): _choice(SyslogProtocol),
            vol.Optional("syslog_app_name"): _text,
            vol.Optional("http_url"): _url,
            vol.Optional("http_format"): _choice(HttpFormat),
        },
        vol.Optional("metrics_address"): _host_port,
        vol.Optional("log_level"): _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", upper=True),
        vol.Optional("log_format"): _one_of("text", "json"),
        vol.Optional("time_scale"): _positive_number,
    }
)
"""The voluptuous schema of a configuration mapping (file, environment and overrides merged)."""


# --- sources ------------------------------------------------------------------------------

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _env_bool(env: Mapping[str, str], name: str, problems: list[str]) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    if raw in _GO_TRUE:
        return True
    if raw in _GO_FALSE:
        return False
    problems.append(f"{name}: expected true or false, got {raw!r}")
    return None


# The CLIs' environment variables, by the key they set.
_ENV_NAMES: dict[tuple[str, ...], str] = {
    ("consul", "address"): "CONSUL_HTTP_ADDR",
    ("consul", "token"): "CONSUL_HTTP_TOKEN",
    ("consul", "ca_file"): "CONSUL_CACERT",
    ("consul", "cert_file"): "CONSUL_CLIENT_CERT",
    ("consul", "key_file"): "CONSUL_CLIENT_KEY",
    ("consul", "verify"): "CONSUL_HTTP_SSL_VERIFY",
    ("nomad", "address"): "NOMAD_ADDR",
    ("nomad", "token"): "NOMAD_TOKEN",
    ("nomad", "ca_file"): "NOMAD_CACERT",
    ("nomad", "cert_file"): "NOMAD_CLIENT_CERT",
    ("nomad", "key_file"): "NOMAD_CLIENT_KEY",
    ("nomad", "namespace"): "NOMAD_NAMESPACE",
    ("nomad", "region"): "NOMAD_REGION",
    ("nomad", "verify"): "NOMAD_SKIP_VERIFY",
}


def _from_env(env: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """The configuration the CLIs' environment variables describe (empty variables are unset)."""
    out: dict[str, dict[str, Any]] = {"consul": {}, "nomad": {}}
    for (section, key), name in _ENV_NAMES.items():
        if key != "verify" and env.get(name):
            out[section][key] = env[name]
    address = out["consul"].get("address")
    if _env_bool(env, "CONSUL_HTTP_SSL", problems):
        # As the consul CLI: https for a scheme-less address, and for the default one.
        if address is None:
            out["consul"]["address"] = "https://127.0.0.1:8500"
        elif "://" not in address:
            out["consul"]["address"] = f"https://{address}"
    verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY", problems)
    if verify is not None:
        out["consul"]["verify"] = verify
    skip = _env_bool(env, "NOMAD_SKIP_VERIFY", problems)
    if skip is not None:
        out["nomad"]["verify"] = not skip
    layer: dict[str, Any] = {section: values for section, values in out.items() if values}
    if env.get(TIME_SCALE_ENV):
        try:
            layer["time_scale"] = float(env[TIME_SCALE_ENV])
        except ValueError:
            problems.append(f"{TIME_SCALE_ENV}: expected a number > 0, got {env[TIME_SCALE_ENV]!r}")
    return layer


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"consul.address": x}`` -> ``{"consul": {"address": x}}``; None values are dropped."""
    out: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        layer: dict[str, Any] = {leaf: _nest(value) if isinstance(value, Mapping) else value}
        for parent in reversed(parents):
            layer = {parent: layer}
        out = _merge(out, layer)
    return out


# Setting one of these in a higher layer silences the other in the lower layers.
_EXCLUSIVE = {"token": "token_file", "token_file": "token"}


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
        if key in _EXCLUSIVE:
            out.pop(_EXCLUSIVE[key], None)
    return out


def _lookup(data: Mapping[str, Any], path: list[str]) -> Any:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# --- assembly -----------------------------------------------------------------------------


def _known_keys(path: list[str]) -> list[str]:
    node: Any = SCHEMA.schema
    for part in path:
        node = next((v for k, v in node.items() if k.schema == part), None)
        if not isinstance(node, dict):
            return []
    return [k.schema for k in node]


def _problem(error: vol.Invalid, env_layer: Mapping[str, Any], merged: Mapping[str, Any]) -> str:
    path = [str(p) for p in error.path]
    where = ".".join(path) or "(top level)"
    if error.error_message == "extra keys not allowed":
        close = difflib.get_close_matches(path[-1], _known_keys(path[:-1]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: unknown key{hint}"
    message = error.error_message
    if message.startswith("expected a dictionary"):
        message = f"expected a mapping of settings, got {_shown(_lookup(merged, path))}"
    value = _lookup(env_layer, path)
    if value is not None and value is _lookup(merged, path):
        message += f" (from {_ENV_NAMES.get(tuple(path), TIME_SCALE_ENV)})"
    return f"{where}: {message}"


def _cross_checks(data: Mapping[str, Any]) -> Iterator[str]:
    for section in ("consul", "nomad"):
        tls = data.get(section, {})
        for have, need in (("cert_file", "key_file"), ("key_file", "cert_file")):
            if have in tls and need not in tls:
                yield f"{section}.{need}: required when {section}.{have} is set"
    deadline = data.get("healthy_deadline", ShepardConfig.healthy_deadline)
    min_healthy = data.get("min_healthy_time", ShepardConfig.min_healthy_time)
    if deadline <= min_healthy:
        yield (
            f"healthy_deadline: expected more than min_healthy_time ({format_go_duration(min_healthy)}), "
            f"got {format_go_duration(deadline)}"
        )
    shipping = data.get("log_shipping", {})
    if LogSink.HTTP in shipping.get("sink", ()) and "http_url" not in shipping:
        yield "log_shipping.http_url: required when log_shipping.sink includes http"
    max_line = shipping.get("max_line_bytes", LogShippingConfig.max_line_bytes)
    udp = shipping.get("syslog_protocol", LogShippingConfig.syslog_protocol) is SyslogProtocol.UDP
    if LogSink.SYSLOG in shipping.get("sink", ()) and udp and max_line > SYSLOG_UDP_MAX_LINE:
        yield (
            f"log_shipping.max_line_bytes: at most {SYSLOG_UDP_MAX_LINE} with the syslog sink over udp"
            f" (a message is one datagram of at most 65507 bytes, header included), got {max_line};"
            " or set log_shipping.syslog_protocol: tcp"
        )


def _both_tokens(path: str | None, file_layer: Mapping[str, Any]) -> Iterator[str]:
    """A problem for each section of the file that sets both ``token`` and ``token_file``."""
    for section in ("consul", "nomad"):
        values = file_layer.get(section)
        if isinstance(values, Mapping) and "token" in values and "token_file" in values:
            yield f"{section}.token and {section}.token_file: both set in {path}; keep one"


def _read_token(section: str, data: dict[str, Any], problems: list[str]) -> None:
    path = data.pop("token_file", None)
    if path is None:
        return
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{section}.token_file: cannot read {path}: {exc.strerror}")
        return
    except UnicodeDecodeError:
        problems.append(f"{section}.token_file: {path} is not a UTF-8 text file")
        return
    if not token:
        problems.append(f"{section}.token_file: {path} is empty")
        return
    data["token"] = token


def load_config(
    path: str | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ShepardConfig:
    """Load, merge and validate the configuration.

    ``path`` (else ``SHEPARD_CONFIG_PATH`` from ``env``) names the YAML file; without either, only
    the environment and defaults apply. ``env`` defaults to ``os.environ``. ``overrides`` (CLI flags)
    win over everything; keys may be nested mappings or dotted (``"consul.address"``), and None
    values are ignored. Raises :class:`ConfigError` listing every problem.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_PATH_ENV) or None
    problems: list[str] = []
    env_layer = _from_env(env, problems)
    merged = env_layer
    file_layer: dict[str, Any] = {}
    if path is not None:
        file_layer = read_yaml_mapping(path)
        merged = _merge(merged, file_layer)
    if overrides:
        merged = _merge(merged, _nest(overrides))
    try:
        data = SCHEMA(merged)
    except vol.MultipleInvalid as exc:
        problems.extend(sorted({_problem(e, env_layer, merged) for e in exc.errors}))
        raise ConfigError(problems) from None
    problems.extend(_cross_checks(data))
    problems.extend(_both_tokens(path, file_layer))
    consul = dict(data.pop("consul", {}))
    nomad = dict(data.pop("nomad", {}))
    _read_token("consul", consul, problems)
    _read_token("nomad", nomad, problems)
    if problems:
        raise ConfigError(problems)
    shipping = LogShippingConfig(**data.pop("log_shipping", {}))
    return ShepardConfig(
        consul=ConsulConfig(**consul), nomad=NomadConfig(**nomad), log_shipping=shipping, **data
    )


def secret_values(cfg: ShepardConfig) -> list[str]:
    """The secret values in ``cfg``, for log redaction: tokens, and the password and query string
    values of ``log_shipping.http_url`` (as written and percent-decoded)."""
    secrets = [t for t in (cfg.consul.token, cfg.nomad.token) if t]
    if cfg.log_shipping.http_url:
        password, values = _url_secrets(cfg.log_shipping.http_url)
        for value in ([password] if password else []) + values:
            secrets += dict.fromkeys([value, unquote_plus(value)])
    return list(dict.fromkeys(secrets))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def redacted(cfg: ShepardConfig) -> dict[str, Any]:
    """``cfg`` as plain data (enums as strings), with tokens shown as ``"<redacted>"``, and so the
    password and query string values of ``log_shipping.http_url``."""
    data: dict[str, Any] = _plain(dataclasses.asdict(cfg))
    for section in ("consul", "nomad"):
        if data[section]["token"] is not None:
            data[section]["token"] = REDACTED
    if cfg.log_shipping.http_url:
        data["log_shipping"]["http_url"] = redact_url(cfg.log_shipping.http_url)
    return data


def file_form(cfg: ShepardConfig) -> dict[str, Any]:
    """:func:`redacted` as a config file writes it, so it can be pasted back: durations as Go
    durations (``15s``), unset keys left out."""

    def clean(data: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                value = clean(value)
            elif key in _DURATIONS and isinstance(value, int | float):
                value = format_go_duration(value)
            if value is not None:
                out[key] = value
        return out

    return clean(redacted(cfg))


def _default_text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, tuple):
        return ", ".join(_default_text(v) for v in value)
    return f"`{value}`"


def _rows(cls: type, prefix: str) -> Iterator[tuple[str, str, str]]:
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _rows(type(value), f"{prefix}{f.name}.")
            continue
        shown = f"`{format_go_duration(value)}`" if f.name in _DURATIONS else _default_text(value)
        yield f"{prefix}{f.name}", shown, f.metadata["doc"]
        if f.name == "token":
            yield f"{prefix}token_file", "(unset)", "File whose content is the token (instead of `token`)."


def reference_table() -> str:
    """Markdown table of every key: key, default, description (for docs/configuration.md)."""
    lines = ["| key | default | description |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {doc} |" for key, default, doc in _rows(ShepardConfig, "")]
    return "\n".join(lines) + "\n"
