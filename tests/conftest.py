"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest

CLIENT_ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE")


@pytest.fixture
def no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear the official CLIs' variables for a sim-only test.

    python-consul2 and python-nomad read them over their arguments, and ``load_config`` lets them
    fill in the defaults: a test meant for the simulator must not reach a cluster named there.
    """
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
