"""Both backends over HTTPS: verification is on by default, ``ca_file`` trusts a private CA."""

from __future__ import annotations

import pytest
from scripted_http import FAST_RETRY, Reply, ScriptedServer, TLSFiles

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig
from shepard_lib.errors import ConsulError, NomadError


def test_consul_trusts_the_configured_ca(tls_server: ScriptedServer, tls_files: TLSFiles) -> None:
    backend = ConsulBackend(ConsulConfig(address=tls_server.address, token="t", ca_file=tls_files.ca))
    tls_server.script(Reply(200, True))
    assert backend.put("k", "v") is True
    assert tls_server.requests[0].headers["x-consul-token"] == "t"
    backend.close()


def test_consul_verifies_certificates_by_default_and_does_not_retry_a_bad_one(
    tls_server: ScriptedServer,
) -> None:
    backend = ConsulBackend(ConsulConfig(address=tls_server.address), retry=FAST_RETRY)
    with pytest.raises(ConsulError, match="TLS failed") as err:
        backend.get("k")
    assert not err.value.transient
    assert tls_server.requests == [], "nothing was sent over the unverified connection"
    backend.close()


def test_nomad_trusts_the_configured_ca(tls_server: ScriptedServer, tls_files: TLSFiles) -> None:
    backend = NomadBackend(NomadConfig(address=tls_server.address, ca_file=tls_files.ca))
    tls_server.script(Reply(200, [{"ID": "web"}]))
    assert backend.jobs() == ["web"]
    backend.close()


def test_nomad_verifies_certificates_by_default(tls_server: ScriptedServer) -> None:
    backend = NomadBackend(NomadConfig(address=tls_server.address), retry=FAST_RETRY)
    with pytest.raises(NomadError, match="TLS failed") as err:
        backend.jobs()
    assert not err.value.transient and tls_server.requests == []
    backend.close()
