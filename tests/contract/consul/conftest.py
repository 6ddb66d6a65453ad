"""Fixtures for the Consul HTTP contract: the same tests run against the sim and a real Consul.

``consul_target`` is parametrised ``["sim", "real"]``; the real variant runs when
``CONSUL_HTTP_ADDR`` (and, with ACLs, ``CONSUL_HTTP_TOKEN``) is set and is skipped otherwise.
``sim_consul`` is the sim alone, for tests of its fault controls, in-process state and time-scaled
TTLs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from consul_contract import REAL_SKIP_REASON, SIM_SCALE, ConsulTarget

from shepard_lib.clock import Clock
from shepard_lib.sim.consul import ConsulServer, ConsulState


def _sim_target(monkeypatch: pytest.MonkeyPatch, acl_token: str | None = None) -> Iterator[ConsulTarget]:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    clock = Clock(scale=SIM_SCALE)
    server = ConsulServer(ConsulState(clock, seed=7), acl_token=acl_token, seed=7).start()
    target = ConsulTarget("sim", server.address, acl_token, clock, server)
    try:
        yield target
        server.faults.reset()
        target.cleanup()
    finally:
        server.stop()


@pytest.fixture(params=["sim", "real"])
def consul_target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulTarget]:
    """The Consul under test: the sim, or the real one named by CONSUL_HTTP_ADDR."""
    if request.param == "sim":
        yield from _sim_target(monkeypatch)
        return
    address = os.environ.get("CONSUL_HTTP_ADDR")
    if not address:
        pytest.skip(REAL_SKIP_REASON)
    if "://" not in address:
        address = ("https://" if os.environ.get("CONSUL_HTTP_SSL") == "true" else "http://") + address
    target = ConsulTarget("real", address, os.environ.get("CONSUL_HTTP_TOKEN"), Clock())
    try:
        yield target
    finally:
        target.cleanup()


@pytest.fixture
def sim_consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulTarget]:
    """The sim alone (fault controls, in-process state, time-scaled TTLs)."""
    yield from _sim_target(monkeypatch)


@pytest.fixture
def sim_consul_acl(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulTarget]:
    """The sim with ACLs on; ``target.token`` is its management token."""
    yield from _sim_target(monkeypatch, acl_token="sim-management-token")
