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
from urllib.parse import urlsplit

import voluptuous as vol
import yaml

from shepard_lib.errors import ConfigError

CONFIG_PATH_ENV = "SHEPARD_CONFIG_PATH"
REDACTED = "<redacted>"


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
    """Shipping of task logs (``alloc/logs``) to a sink."""

    enabled: bool = field(default=False, metadata=_docs("Ship the stdout/stderr logs of this node's tasks."))
    sink: LogSink = field(default=LogSink.FILE, metadata=_docs("Where to: `file`, `syslog` or `http`."))
    path: str = field(
        default="/var/log/shepard/tasks.jsonl",
        metadata=_docs("`file` sink: the JSON-lines file to append to."),
    )
    syslog_address: str = field(
        default="127.0.0.1:514", metadata=_docs("`syslog` sink: `host:port` of the syslog server.")
    )
    syslog_protocol: SyslogProtocol = field(
        default=SyslogProtocol.UDP, metadata=_docs("`syslog` sink: `tcp` or `udp` (RFC 5424 messages).")
    )
    syslog_app_name: str = field(default="shepard", metadata=_docs("`syslog` sink: the APP-NAME field."))
    http_url: str | None = field(
        default=None,
        metadata=_docs("`http` sink: URL to POST to (e.g. `http://loki:3100/loki/api/v1/push`)."),
    )
    http_format: HttpFormat = field(
        default=HttpFormat.LOKI, metadata=_docs("`http` sink: `loki` (push API) or `ndjson`.")
    )
    batch_size: int = field(default=500, metadata=_docs("Most records sent in one write or request."))


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
        default=86400.0, metadata=_docs("Delete the keys of a node that is gone or down for this long.")
    )
    ship_log_interval: float = field(
        default=60.0, metadata=_docs("How often new task log lines are shipped.")
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

_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string (``1h30m``, ``1.5s``, ``250ms``, ``0``); ValueError otherwise.

    A bare number other than ``0`` is rejected: it would be seconds to some readers and
    nanoseconds to Go.
    """
    text = text.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """A Go-style duration string for ``seconds`` (``90`` -> ``1m30s``, ``0.25`` -> ``250ms``)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = f"{int(hours)}h" if hours else ""
    out += f"{int(minutes)}m" if minutes else ""
    out += f"{secs:g}s" if secs else ""
    return out


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
        span = f"of at least {format_duration(low)}"
    else:
        span = f"between {format_duration(low)} and {format_duration(high)}"
    expected = f"expected a duration {span}"

    def validate(value: Any) -> float:
        seconds: float | None = None
        if isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError:
                seconds = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            seconds = 0.0
        if seconds is None or seconds < low or (high is not None and seconds > high):
            raise vol.Invalid(f"{expected}, got {_shown(value)} (durations look like 15s, 2m, 1h30m)")
        return seconds

    return validate


def _integer(low: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise vol.Invalid(f"expected an integer >= {low}, got {_shown(value)}")
        return value

    return validate


def _positive_number(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise vol.Invalid(f"expected a number > 0, got {_shown(value)}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid(f"expected true or false, got {_shown(value)}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise vol.Invalid(f"expected a non-empty string, got {_shown(value)}")
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
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path or parts.username:
        raise vol.Invalid(expected)
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
    raise vol.Invalid(f"expected an http:// or https:// URL, got {_shown(value)}")


def normalize_address(value: str) -> str:
    """``scheme://host:port`` for an address given with or without a scheme or port.

    ``127.0.0.1:8500`` -> ``http://127.0.0.1:8500``; ``https://consul.example.com`` ->
    ``https://consul.example.com:443`` (the port the CLIs would use); ``unix:///path`` is kept.
    ValueError when it is not an address.
    """
    text = value.strip()
    if text.startswith("unix://"):
        if len(text) <= len("unix://"):
            raise ValueError(value)
        return text
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(value)
    if parts.query or parts.fragment or parts.username:
        raise ValueError(value)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{parts.scheme}://{host}:{port}"


def _address(value: Any) -> str:
    expected = f"expected an address like http://127.0.0.1:8500 or 127.0.0.1:8500, got {_shown(value)}"
    if not isinstance(value, str):
        raise vol.Invalid(expected)
    try:
        return normalize_address(value)
    except ValueError:
        raise vol.Invalid(expected) from None


# --- schema -------------------------------------------------------------------------------

_TLS = {
    vol.Optional("token"): _text,
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
    "ship_log_interval": (1.0, 86400.0),
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
            vol.Optional("sink"): _choice(LogSink),
            vol.Optional("path"): _text,
            vol.Optional("syslog_address"): _host_port,
            vol.Optional("syslog_protocol"): _choice(SyslogProtocol),
            vol.Optional("syslog_app_name"): _text,
            vol.Optional("http_url"): _url,
            vol.Optional("http_format"): _choice(HttpFormat),
            vol.Optional("batch_size"): _integer(1),
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
    return {section: values for section, values in out.items() if values}


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    return data


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
        message += f" (from {_ENV_NAMES[tuple(path)]})"
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
            f"healthy_deadline: expected more than min_healthy_time ({format_duration(min_healthy)}), "
            f"got {format_duration(deadline)}"
        )
    shipping = data.get("log_shipping", {})
    if shipping.get("enabled") and shipping.get("sink") is LogSink.HTTP and "http_url" not in shipping:
        yield "log_shipping.http_url: required when log_shipping.sink is http"


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
    if path is not None:
        merged = _merge(merged, _read_file(path))
    if overrides:
        merged = _merge(merged, _nest(overrides))
    try:
        data = SCHEMA(merged)
    except vol.MultipleInvalid as exc:
        problems.extend(sorted({_problem(e, env_layer, merged) for e in exc.errors}))
        raise ConfigError(problems) from None
    problems.extend(_cross_checks(data))
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
    """The secret values in ``cfg`` (tokens), for log redaction."""
    return [t for t in (cfg.consul.token, cfg.nomad.token) if t]


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def redacted(cfg: ShepardConfig) -> dict[str, Any]:
    """``cfg`` as plain data (enums as strings), with tokens shown as ``"<redacted>"``."""
    data: dict[str, Any] = _plain(dataclasses.asdict(cfg))
    for section in ("consul", "nomad"):
        if data[section]["token"] is not None:
            data[section]["token"] = REDACTED
    return data


def _default_text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    return f"`{value}`"


def _rows(cls: type, prefix: str) -> Iterator[tuple[str, str, str]]:
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _rows(type(value), f"{prefix}{f.name}.")
            continue
        shown = f"`{format_duration(value)}`" if f.name in _DURATIONS else _default_text(value)
        yield f"{prefix}{f.name}", shown, f.metadata["doc"]
        if f.name == "token":
            yield f"{prefix}token_file", "(unset)", "File whose content is the token (instead of `token`)."


def reference_table() -> str:
    """Markdown table of every key: key, default, description (for docs/configuration.md)."""
    lines = ["| key | default | description |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {doc} |" for key, default, doc in _rows(ShepardConfig, "")]
    return "\n".join(lines) + "\n"
