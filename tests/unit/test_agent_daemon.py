"""``shepard agent``'s SIGHUP reload, without a cluster: what it does with the agent and the logs."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest

from shepard_lib.agent.daemon import _reload
from shepard_lib.config import ShepardConfig, default_config, secret_values
from shepard_lib.errors import ConfigError
from shepard_lib.logsetup import setup_logging

OLD = "old-consul-token-1234"
NEW = "new-consul-token-5678"


class StubAgent:
    """What ``_reload`` uses of an agent: its config, and ``reload`` (which keeps ``consul``)."""

    def __init__(self, cfg: ShepardConfig) -> None:
        self.config = cfg
        self.reloaded: list[ShepardConfig] = []

    def reload(self, cfg: ShepardConfig) -> list[str]:
        self.reloaded.append(cfg)
        self.config = dataclasses.replace(cfg, consul=self.config.consul)
        return ["consul"]


def with_token(token: str) -> ShepardConfig:
    cfg = default_config()
    return dataclasses.replace(cfg, consul=dataclasses.replace(cfg.consul, token=token))


def test_after_a_reload_the_running_and_the_new_tokens_are_both_redacted(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = StubAgent(with_token(OLD))
    new = with_token(NEW)
    args = argparse.Namespace(config=None, log_level=None, log_format=None)
    calls = []

    def load(given: argparse.Namespace) -> ShepardConfig:
        calls.append(given)
        setup_logging("INFO", "text", secrets=secret_values(new))  # as the CLI's loader does
        return new

    _reload(agent, args, load)  # type: ignore[arg-type]
    assert calls == [args] and agent.reloaded == [new]
    logging.getLogger("shepard_lib.test").warning("tokens %s and %s", OLD, NEW)
    err = capsys.readouterr().err
    assert "tokens <redacted> and <redacted>" in err, err
    assert OLD not in err and NEW not in err


def test_a_bad_config_on_reload_is_logged_and_the_agent_keeps_its_config(
    restore_logging: None, caplog: pytest.LogCaptureFixture
) -> None:
    agent = StubAgent(with_token(OLD))

    def load(given: argparse.Namespace) -> ShepardConfig:
        raise ConfigError(["concurrency: expected an integer >= 1, got 'many'"])

    _reload(agent, argparse.Namespace(), load)  # type: ignore[arg-type]
    assert agent.reloaded == []
    assert "config reload failed, keeping the running config: concurrency: expected" in caplog.text
