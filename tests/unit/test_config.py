"""Configuration: defaults, environment, file precedence, and one clear message per problem."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from shepard_lib.config import (
    HealthSource,
    HttpFormat,
    LockScope,
    LogSink,
    RestartMethod,
    ShepardConfig,
    SyslogProtocol,
    default_config,
    load_config,
    normalize_address,
    parse_duration,
    redacted,
    reference_table,
    secret_values,
)
from shepard_lib.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "shepard.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems(**kwargs: Any) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value.problems


# --- defaults ------------------------------------------------------------------------------

EXPECTED_DEFAULTS: dict[str, Any] = {
    "node_name": None,
    "nomad_data_dir": "/opt/nomad/data",
    "key_prefix": "shepard",
    "lock_scope": LockScope.CLUSTER,
    "concurrency": 1,
    "restart_method": RestartMethod.CONSUL_KEY,
    "health_source": HealthSource.CONSUL,
    "session_ttl": 15.0,
    "lock_delay": 15.0,
    "settle_time": 2.0,
    "min_healthy_time": 10.0,
    "healthy_deadline": 300.0,
    "slot_timeout": 3600.0,
    "max_failures": 1,
    "watch_secrets": False,
    "gc_interval": 300.0,
    "node_cleanup_timeout": 86400.0,
    "gc_plan_retention": 86400.0,
    "ship_log_interval": 60.0,
    "shutdown_timeout": 30.0,
    "metrics_address": None,
    "log_level": "INFO",
    "log_format": "text",
    "time_scale": 1.0,
}


@pytest.mark.parametrize(("key", "value"), EXPECTED_DEFAULTS.items())
def test_every_top_level_default(key: str, value: Any) -> None:
    assert getattr(load_config(env={}), key) == value
    assert getattr(default_config(), key) == value


def test_connection_and_log_shipping_defaults() -> None:
    cfg = load_config(env={})
    assert dataclasses.asdict(cfg.consul) == {
        "address": "http://127.0.0.1:8500",
        "token": None,
        "ca_file": None,
        "cert_file": None,
        "key_file": None,
        "verify": True,
        "datacenter": None,
    }
    assert dataclasses.asdict(cfg.nomad) == {
        "address": "http://127.0.0.1:4646",
        "token": None,
        "namespace": "default",
        "region": None,
        "ca_file": None,
        "cert_file": None,
        "key_file": None,
        "verify": True,
    }
    shipping = cfg.log_shipping
    assert (shipping.enabled, shipping.sink, shipping.path) == (
        False,
        (LogSink.FILE,),
        "/var/log/shepard/tasks.jsonl",
    )
    assert (shipping.syslog_address, shipping.syslog_protocol, shipping.syslog_app_name) == (
        "127.0.0.1:514",
        SyslogProtocol.UDP,
        "shepard",
    )
    assert (shipping.http_url, shipping.http_format, shipping.batch_size) == (None, HttpFormat.LOKI, 5000)


def test_every_key_is_tested_for_its_default() -> None:
    top = {f.name for f in dataclasses.fields(ShepardConfig)} - {"consul", "nomad", "log_shipping"}
    assert top == set(EXPECTED_DEFAULTS)


def test_config_is_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.concurrency = 2  # type: ignore[misc]


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == default_config()


# --- the file --------------------------------------------------------------------------------


def test_file_settings_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
consul: {address: "127.0.0.1:8500", token: c-tok, datacenter: dc2}
nomad: {address: "https://nomad.example.com", namespace: apps, region: eu}
node_name: web-03
lock_scope: node
concurrency: 3
restart_method: nomad_api
health_source: both
session_ttl: 1m30s
lock_delay: 250ms
settle_time: 1.5s
min_healthy_time: "0"
healthy_deadline: 1h
max_failures: 0
watch_secrets: true
log_shipping: {enabled: true, sink: http, http_url: "http://loki:3100/loki/api/v1/push", http_format: ndjson}
metrics_address: "0.0.0.0:9464"
log_level: debug
log_format: json
time_scale: 50
""",
    )
    cfg = load_config(path, env={})
    assert cfg.consul.address == "http://127.0.0.1:8500"
    assert cfg.consul.token == "c-tok"
    assert cfg.consul.datacenter == "dc2"
    assert cfg.nomad.address == "https://nomad.example.com:443"
    assert (cfg.nomad.namespace, cfg.nomad.region) == ("apps", "eu")
    assert cfg.node_name == "web-03"
    assert cfg.lock_scope is LockScope.NODE
    assert cfg.concurrency == 3
    assert cfg.restart_method is RestartMethod.NOMAD_API
    assert cfg.health_source is HealthSource.BOTH
    assert (cfg.session_ttl, cfg.lock_delay, cfg.settle_time) == (90.0, 0.25, 1.5)
    assert (cfg.min_healthy_time, cfg.healthy_deadline, cfg.max_failures) == (0.0, 3600.0, 0)
    assert cfg.watch_secrets is True
    assert cfg.log_shipping.sink == (LogSink.HTTP,)
    assert cfg.log_shipping.http_format is HttpFormat.NDJSON
    assert cfg.metrics_address == "0.0.0.0:9464"
    assert (cfg.log_level, cfg.log_format, cfg.time_scale) == ("DEBUG", "json", 50.0)


def test_config_path_comes_from_shepard_config_path(tmp_path: Path) -> None:
    path = write(tmp_path, "concurrency: 4\n")
    assert load_config(env={"SHEPARD_CONFIG_PATH": path}).concurrency == 4


def test_explicit_path_wins_over_shepard_config_path(tmp_path: Path) -> None:
    explicit = write(tmp_path, "concurrency: 5\n", "a.yaml")
    from_env = write(tmp_path, "concurrency: 6\n", "b.yaml")
    assert load_config(explicit, env={"SHEPARD_CONFIG_PATH": from_env}).concurrency == 5


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    token = write(tmp_path, "s3cret-token\n", "consul.token")
    path = write(tmp_path, f"consul: {{token_file: {token}}}\nnomad: {{token_file: {token}}}\n")
    cfg = load_config(path, env={})
    assert cfg.consul.token == "s3cret-token"
    assert cfg.nomad.token == "s3cret-token"


def test_tls_files_are_checked_and_kept(tmp_path: Path) -> None:
    ca, cert, key = (write(tmp_path, "PEM", name) for name in ("ca.pem", "c.pem", "k.pem"))
    path = write(tmp_path, f"consul: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}, verify: false}}\n")
    cfg = load_config(path, env={})
    assert (cfg.consul.ca_file, cfg.consul.cert_file, cfg.consul.key_file) == (ca, cert, key)
    assert cfg.consul.verify is False


# --- the environment -------------------------------------------------------------------------

ENV_CASES: list[tuple[str, str, str, Any]] = [
    ("CONSUL_HTTP_ADDR", "10.0.0.5:8500", "consul.address", "http://10.0.0.5:8500"),
    (
        "CONSUL_HTTP_ADDR",
        "https://consul.example.com:8501",
        "consul.address",
        "https://consul.example.com:8501",
    ),
    ("CONSUL_HTTP_TOKEN", "env-consul-token", "consul.token", "env-consul-token"),
    ("CONSUL_HTTP_SSL_VERIFY", "false", "consul.verify", False),
    ("CONSUL_HTTP_SSL_VERIFY", "1", "consul.verify", True),
    ("NOMAD_ADDR", "http://10.0.0.6:4646", "nomad.address", "http://10.0.0.6:4646"),
    ("NOMAD_ADDR", "10.0.0.6:4646", "nomad.address", "http://10.0.0.6:4646"),
    ("NOMAD_TOKEN", "env-nomad-token", "nomad.token", "env-nomad-token"),
    ("NOMAD_NAMESPACE", "apps", "nomad.namespace", "apps"),
    ("NOMAD_REGION", "eu", "nomad.region", "eu"),
    ("NOMAD_SKIP_VERIFY", "true", "nomad.verify", False),
    ("NOMAD_SKIP_VERIFY", "0", "nomad.verify", True),
]


def dotted(cfg: ShepardConfig, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("var", "raw", "key", "expected"), ENV_CASES)
def test_environment_variable_sets_its_key(var: str, raw: str, key: str, expected: Any) -> None:
    assert dotted(load_config(env={var: raw}), key) == expected


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("CONSUL_CACERT", "consul.ca_file"),
        ("NOMAD_CACERT", "nomad.ca_file"),
    ],
)
def test_environment_ca_file(tmp_path: Path, var: str, key: str) -> None:
    ca = write(tmp_path, "PEM", "ca.pem")
    assert dotted(load_config(env={var: ca}), key) == ca


@pytest.mark.parametrize("section", ["CONSUL", "NOMAD"])
def test_environment_client_certificate(tmp_path: Path, section: str) -> None:
    cert, key = write(tmp_path, "PEM", "c.pem"), write(tmp_path, "PEM", "k.pem")
    cfg = load_config(env={f"{section}_CLIENT_CERT": cert, f"{section}_CLIENT_KEY": key})
    tls = cfg.consul if section == "CONSUL" else cfg.nomad
    assert (tls.cert_file, tls.key_file) == (cert, key)


def test_consul_http_ssl_means_https_for_a_scheme_less_address() -> None:
    env = {"CONSUL_HTTP_ADDR": "consul.service:8501", "CONSUL_HTTP_SSL": "true"}
    assert load_config(env=env).consul.address == "https://consul.service:8501"
    assert load_config(env={"CONSUL_HTTP_SSL": "true"}).consul.address == "https://127.0.0.1:8500"
    explicit = {"CONSUL_HTTP_ADDR": "http://consul.service:8500", "CONSUL_HTTP_SSL": "true"}
    assert load_config(env=explicit).consul.address == "http://consul.service:8500"


def test_empty_environment_variables_are_unset() -> None:
    assert load_config(env={"CONSUL_HTTP_ADDR": "", "NOMAD_TOKEN": ""}) == default_config()


def test_file_wins_over_environment_and_environment_fills_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "consul: {address: 'http://file:8500'}\nnomad: {namespace: from-file}\n")
    env = {
        "CONSUL_HTTP_ADDR": "env:8500",
        "CONSUL_HTTP_TOKEN": "env-token",
        "NOMAD_NAMESPACE": "from-env",
        "NOMAD_REGION": "env-region",
    }
    cfg = load_config(path, env=env)
    assert cfg.consul.address == "http://file:8500"
    assert cfg.consul.token == "env-token"
    assert cfg.nomad.namespace == "from-file"
    assert cfg.nomad.region == "env-region"


def test_token_file_in_the_file_wins_over_token_from_environment(tmp_path: Path) -> None:
    token = write(tmp_path, "file-token", "t")
    path = write(tmp_path, f"consul: {{token_file: {token}}}\n")
    assert load_config(path, env={"CONSUL_HTTP_TOKEN": "env-token"}).consul.token == "file-token"


def test_overrides_win_over_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: WARNING\nconsul: {address: 'http://file:8500'}\n")
    cfg = load_config(
        path,
        env={"CONSUL_HTTP_ADDR": "env:1"},
        overrides={"log_level": "debug", "consul.address": "http://flag:8500", "log_format": None},
    )
    assert cfg.log_level == "DEBUG"
    assert cfg.consul.address == "http://flag:8500"
    assert cfg.log_format == "text"


# --- problems --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "session_ttl: 5",
            "session_ttl: expected a duration between 10s and 24h, got '5'",
        ),
        (
            "session_ttl: '5'",
            "session_ttl: expected a duration between 10s and 24h, got '5'",
        ),
        (
            "session_ttl: 5s",
            "session_ttl: expected a duration between 10s and 24h, got '5s'",
        ),
        (
            "session_ttl: 25h",
            "session_ttl: expected a duration between 10s and 24h, got '25h'",
        ),
        (
            "lock_delay: 61s",
            "lock_delay: expected a duration between 0s and 1m, got '61s'",
        ),
        (
            "lock_delay: -1s",
            "lock_delay: expected a duration between 0s and 1m, got '-1s'",
        ),
        (
            "settle_time: 2 s",
            "settle_time: expected a duration between 0s and 1h, got '2 s'",
        ),
        (
            "gc_interval: 1d",
            "gc_interval: expected a duration between 1s and 168h, got '1d'",
        ),
        ("gc_plan_retention: -1s", "gc_plan_retention: expected a duration of at least 0s"),
        ("node_cleanup_timeout: 30s", "node_cleanup_timeout: expected a duration of at least 1m"),
        ("concurrency: 0", "concurrency: expected an integer >= 1, got '0'"),
        ("concurrency: two", "concurrency: expected an integer >= 1, got 'two'"),
        ("concurrency: true", "concurrency: expected an integer >= 1, got true"),
        ("concurrency: 1.5", "concurrency: expected an integer >= 1, got '1.5'"),
        ("max_failures: -1", "max_failures: expected an integer >= 0, got '-1'"),
        ("watch_secrets: maybe", "watch_secrets: expected true or false, got 'maybe'"),
        ("lock_scope: nodes", "lock_scope: expected one of cluster, node, got 'nodes'"),
        ("restart_method: api", "restart_method: expected one of consul_key, nomad_api, got 'api'"),
        ("health_source: [consul]", "health_source: expected one of consul, nomad, both, got a list"),
        ("log_level: LOUD", "log_level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
        ("log_format: xml", "log_format: expected one of text, json, got 'xml'"),
        ("time_scale: 0", "time_scale: expected a number > 0, got '0'"),
        ("key_prefix: /shepard", "key_prefix: expected segments of letters"),
        ("metrics_address: 9464", "metrics_address: expected host:port, got '9464'"),
        ("metrics_address: 'a b:9464'", "metrics_address: expected host:port, got 'a b:9464': whitespace"),
        ("metrics_address: 'a!b:9464'", "metrics_address: expected host:port, got 'a!b:9464': 'a!b' is not"),
        (
            "consul: {address: 'http://h:8500/v1'}",
            "consul.address: expected an address like http://127.0.0.1:8500 "
            "or 127.0.0.1:8500, got 'http://h:8500/v1': a path, query or fragment is not part of an address",
        ),
        ("consul: {address: 'ftp://x'}", "consul.address: expected an address like http://127.0.0.1:8500"),
        ("consul: {verify: 'no'}", "consul.verify: expected true or false, got 'no'"),
        ("consul: {token: ''}", "consul.token: expected a non-empty string (value not shown)"),
        ("consul: {ca_file: /nonexistent/ca.pem}", "consul.ca_file: file not found: /nonexistent/ca.pem"),
        ("nomad: 5", "nomad: expected a mapping of settings, got '5'"),
        ("log_shipping: {sink: kafka}", "log_shipping.sink: expected one of file, syslog, http, got 'kafka'"),
        ("log_shipping: {syslog_protocol: sctp}", "log_shipping.syslog_protocol: expected one of tcp, udp"),
        (
            "log_shipping: {http_url: 'loki:3100'}",
            "log_shipping.http_url: expected an http:// or https:// URL",
        ),
        ("log_shipping: {batch_size: 0}", "log_shipping.batch_size: expected an integer >= 1, got '0'"),
    ],
)
def test_bad_value_names_key_and_expectation(tmp_path: Path, text: str, message: str) -> None:
    found = problems(path=write(tmp_path, text + "\n"))
    assert len(found) == 1, found
    assert found[0].startswith(message), found[0]


def test_bare_number_duration_message_in_full(tmp_path: Path) -> None:
    assert problems(path=write(tmp_path, "session_ttl: 5\n")) == [
        "session_ttl: expected a duration between 10s and 24h, got '5' (durations look like 15s, 2m, 1h30m)"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concurency: 2", "concurency: unknown key (did you mean 'concurrency'?)"),
        ("consul: {adress: x}", "consul.adress: unknown key (did you mean 'address'?)"),
        ("log_shipping: {sinks: file}", "log_shipping.sinks: unknown key (did you mean 'sink'?)"),
        ("frobnicate: 1", "frobnicate: unknown key"),
    ],
)
def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path, text: str, message: str) -> None:
    assert problems(path=write(tmp_path, text + "\n")) == [message]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(path=write(tmp_path, "concurrency: 0\nsession_ttl: 1s\nbogus: 1\nlog_format: xml\n"))
    assert [p.split(":")[0] for p in found] == ["bogus", "concurrency", "log_format", "session_ttl"]


def test_cross_field_problems(tmp_path: Path) -> None:
    cert = write(tmp_path, "PEM", "c.pem")
    text = (
        f"nomad: {{cert_file: {cert}}}\nhealthy_deadline: 5s\nlog_shipping: {{enabled: true, sink: http}}\n"
    )
    assert problems(path=write(tmp_path, text)) == [
        "nomad.key_file: required when nomad.cert_file is set",
        "healthy_deadline: expected more than min_healthy_time (10s), got 5s",
        "log_shipping.http_url: required when log_shipping.sink includes http",
    ]


def test_bad_environment_value_names_the_variable() -> None:
    found = problems(env={"CONSUL_HTTP_ADDR": "http://", "NOMAD_SKIP_VERIFY": "yes"})
    assert found == [
        "NOMAD_SKIP_VERIFY: expected true or false, got 'yes'",
        "consul.address: expected an address like http://127.0.0.1:8500 or 127.0.0.1:8500, got 'http://': "
        "no host (from CONSUL_HTTP_ADDR)",
    ]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "concurrency: 1\nconsul:\n  address: [unclosed\n")
    (message,) = problems(path=path)
    assert message.startswith(f"{path}:4:1: YAML syntax error: "), message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert problems(path=path) == [f"{path}: expected a mapping of settings at the top level, got list"]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert problems(path=missing) == [f"config file not found: {missing}"]
    assert problems(env={"SHEPARD_CONFIG_PATH": missing}) == [f"config file not found: {missing}"]


def test_token_and_token_file_problems(tmp_path: Path) -> None:
    empty = write(tmp_path, "\n", "empty.token")
    path = write(tmp_path, f"consul: {{token_file: {empty}}}\nnomad: {{token_file: /nonexistent/t}}\n")
    assert problems(path=path) == ["nomad.token_file: file not found: /nonexistent/t"]
    path = write(tmp_path, f"consul: {{token_file: {empty}}}\n")
    assert problems(path=path) == [f"consul.token_file: {empty} is empty"]


def test_problem_messages_never_contain_a_token(tmp_path: Path) -> None:
    found = problems(
        path=write(tmp_path, "consul: {token: tok-abcdef, verify: 3}\n"), env={"NOMAD_TOKEN": "tok-xyz"}
    )
    assert found == ["consul.verify: expected true or false, got '3'"]


# --- helpers and output ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15s", 15.0),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (".5s", 0.5),
        ("0", 0.0),
        ("1h1m1s", 3661.0),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("100ns", 1e-7),
    ],
)
def test_parse_duration_accepts_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "5", "1.5", "s", "5x", "1h 30m", "-5s", "+5s", "1d", "5S", "1..5s", " 15s", "-0s", "٣s"]
)
def test_parse_duration_rejects_everything_else(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [0, 0.0])
def test_parse_duration_takes_a_bare_zero(value: float) -> None:
    assert parse_duration(value) == 0.0


@pytest.mark.parametrize("value", [5, 1.5, -1, True, None, math.nan, math.inf, [1]])
def test_parse_duration_rejects_other_non_strings(value: Any) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("address", "normalized"),
    [
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("consul.local", "http://consul.local:80"),
        ("https://consul.local", "https://consul.local:443"),
        ("https://consul.local:8501/", "https://consul.local:8501"),
        ("[::1]:8500", "http://[::1]:8500"),
        ("unix:///var/run/consul.sock", "unix:///var/run/consul.sock"),
    ],
)
def test_normalize_address(address: str, normalized: str) -> None:
    assert normalize_address(address) == normalized


@pytest.mark.parametrize(
    "address",
    [
        "",
        "http://",
        "ftp://x:1",
        "http://x:1/v1",
        "http://x:99999",
        "unix://",
        "http://a b",
        "a b:8500",
        "http://a\tb:8500",
        "http://consul\n:8500",
        "http://h:0",
        "h:0",
        "http://a!b:1",
        "http://-a:1",
        "http://a..b:1",
        "http://é.example:1",
    ],
)
def test_normalize_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        normalize_address(address)


@pytest.mark.parametrize(
    ("address", "normalized"),
    [
        ("http://h", "http://h:80"),
        ("https://h", "https://h:443"),
        ("h:1", "http://h:1"),
        ("my_host.", "http://my_host.:80"),
    ],
)
def test_normalize_address_defaults_only_a_missing_port(address: str, normalized: str) -> None:
    assert normalize_address(address) == normalized


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("http://a b", "whitespace inside an address"),
        ("http://h:0", "port 0 is not a port a server listens on"),
        ("http://a!b:8500", "'a!b' is not a valid host name"),
    ],
)
def test_bad_address_from_environment_names_key_variable_and_reason(value: str, reason: str) -> None:
    assert problems(env={"CONSUL_HTTP_ADDR": value}) == [
        "consul.address: expected an address like http://127.0.0.1:8500 or 127.0.0.1:8500, "
        f"got {value!r}: {reason} (from CONSUL_HTTP_ADDR)"
    ]


@pytest.mark.parametrize(
    "text", ["consul: {token: 12345}", "consul: {token: [tok-abc]}", "consul: {token: ' '}"]
)
def test_bad_token_problem_never_shows_the_value(tmp_path: Path, text: str) -> None:
    assert problems(path=write(tmp_path, text + "\n")) == [
        "consul.token: expected a non-empty string (value not shown)"
    ]


def test_bad_token_from_environment_is_not_shown_either() -> None:
    assert problems(env={"NOMAD_TOKEN": "   "}) == [
        "nomad.token: expected a non-empty string (value not shown) (from NOMAD_TOKEN)"
    ]


SECRET_URL = "https://user:pw-9z@loki.example/loki/api/v1/push?token=abc-7q&tenant=t%2F1&flag"


def test_redacted_hides_the_password_and_query_values_of_the_http_url(tmp_path: Path) -> None:
    cfg = load_config(path=write(tmp_path, f"log_shipping: {{http_url: '{SECRET_URL}'}}\n"), env={})
    assert redacted(cfg)["log_shipping"]["http_url"] == (
        "https://user:<redacted>@loki.example/loki/api/v1/push?token=<redacted>&tenant=<redacted>&flag"
    )
    assert secret_values(cfg) == ["pw-9z", "abc-7q", "t%2F1", "t/1"]
    assert cfg.log_shipping.http_url == SECRET_URL  # the effective value is untouched


def test_http_url_without_secrets_is_shown_as_given(tmp_path: Path) -> None:
    url = "http://loki:3100/loki/api/v1/push"
    cfg = load_config(path=write(tmp_path, f"log_shipping: {{http_url: '{url}'}}\n"), env={})
    assert redacted(cfg)["log_shipping"]["http_url"] == url
    assert secret_values(cfg) == []


def test_invalid_http_url_problem_does_not_show_its_secrets(tmp_path: Path) -> None:
    text = "log_shipping: {http_url: 'ftp://u:pw-5k@h/x?key=k-8m'}\n"
    assert problems(path=write(tmp_path, text)) == [
        "log_shipping.http_url: expected an http:// or https:// URL, got 'ftp://u:<redacted>@h/x?key=<redacted>'"
    ]


def test_redacted_hides_tokens_and_keeps_the_rest(tmp_path: Path) -> None:
    cfg = load_config(env={"CONSUL_HTTP_TOKEN": "tok-consul-1", "NOMAD_TOKEN": "tok-nomad-2"})
    data = redacted(cfg)
    assert data["consul"]["token"] == "<redacted>"
    assert data["nomad"]["token"] == "<redacted>"
    assert "tok-consul-1" not in repr(data) and "tok-nomad-2" not in repr(data)
    assert data["lock_scope"] == "cluster" and type(data["lock_scope"]) is str
    assert data["log_shipping"]["sink"] == ["file"]
    assert redacted(default_config())["consul"]["token"] is None
    assert secret_values(cfg) == ["tok-consul-1", "tok-nomad-2"]


def test_docs_list_every_key_with_its_default() -> None:
    table = reference_table()
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert table in doc, "docs/configuration.md is out of date: paste config.reference_table() into it"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert table in readme, (
        "README.md's configuration table is out of date: paste config.reference_table() into it"
    )
    for line in table.splitlines()[2:]:
        key, default, description = (cell.strip() for cell in line.strip("|").split(" | "))
        assert key and default and description, line
    assert "| `session_ttl` | `15s` |" in table
    assert "| `consul.token_file` | (unset) |" in table


def test_example_config_is_valid_and_complete() -> None:
    example = REPO / "examples" / "shepard.yaml"
    cfg = load_config(str(example), env={})
    assert cfg == default_config(), "examples/shepard.yaml should show the defaults"
    text = example.read_text(encoding="utf-8")
    for line in reference_table().splitlines()[2:]:
        leaf = line.split("`")[1].split(".")[-1]
        assert f"{leaf}:" in text, f"examples/shepard.yaml does not mention {leaf}"
