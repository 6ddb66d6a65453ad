"""Fixtures shared by every test directory."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from shepard_lib.logsetup import ShepardHandler

CLIENT_ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE")


@pytest.fixture
def no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear the official CLIs' variables for a sim-only test.

    python-consul2 and python-nomad read them over their arguments, and ``load_config`` lets them
    fill in the defaults: a test meant for the simulator must not reach a cluster named there.
    """
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Afterwards, take off the root logger the handlers ``setup_logging`` (the CLI) put on it, and
    give it back its level: the next test starts with the logging pytest set up."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, ShepardHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)
