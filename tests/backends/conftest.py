"""Fixtures of the backend tests (helpers live in ``scripted_http``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from scripted_http import CONSUL_ENV, NOMAD_ENV, ScriptedServer, TLSFiles, make_tls_files


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A scripted HTTP server on a free loopback port."""
    srv = ScriptedServer()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend tests say their address and token explicitly; nothing comes from the environment."""
    for name in CONSUL_ENV + NOMAD_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and a server certificate for 127.0.0.1 (skips when there is no ``openssl`` command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests need the openssl command to make certificates")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(tls_files: TLSFiles) -> Iterator[ScriptedServer]:
    """A scripted HTTPS server whose certificate ``tls_files.ca`` signed."""
    srv = ScriptedServer(tls=tls_files)
    yield srv
    srv.stop()
