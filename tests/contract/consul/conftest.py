"""Fixtures for the Consul HTTP contract: the same tests run against the sim and a real Consul.

``consul_target`` is parametrised ``["sim", "real"]``; the real variant runs when
``CONSUL_HTTP_ADDR`` (and, with ACLs, ``CONSUL_HTTP_TOKEN``) is set and is skipped otherwise.
``sim_consul`` is the sim alone, for tests of its fault controls, in-process state and time-scaled
TTLs. ``acl_consul`` is a Consul with ACLs on and ``default_policy = deny``: the sim with its
management token, or the real one when ``CONSUL_HTTP_TOKEN`` is set and the anonymous token may
not read the test's keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
from consul_contract import REAL_SKIP_REASON, SIM_SCALE, ConsulTarget

from shepard_lib.clock import Clock
from shepard_lib.sim.consul import ConsulServer, ConsulState

SIM_ACL_TOKEN = "sim-management-token"


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


def _real_target() -> ConsulTarget:
    address = os.environ.get("CONSUL_HTTP_ADDR")
    if not address:
        pytest.skip(REAL_SKIP_REASON)
    if "://" not in address:
        address = ("https://" if os.environ.get("CONSUL_HTTP_SSL") == "true" else "http://") + address
    return ConsulTarget("real", address, os.environ.get("CONSUL_HTTP_TOKEN"), Clock())


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def consul_target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulTarget]:
    """The Consul under test: the sim, or the real one named by CONSUL_HTTP_ADDR."""
    if request.param == "sim":
        yield from _sim_target(monkeypatch)
        return
    target = _real_target()
    try:
        yield target
    finally:
        target.cleanup()


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def acl_consul(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulTarget]:
    """A Consul with ACLs on whose anonymous token may not touch the test's keys."""
    if request.param == "sim":
        yield from _sim_target(monkeypatch, acl_token=SIM_ACL_TOKEN)
        return
    target = _real_target()
    if not target.token:
        pytest.skip("set CONSUL_HTTP_TOKEN (a token that may write KV) for the ACL contract on a real Consul")
    probe = requests.get(f"{target.address}/v1/kv/{target.key('acl-probe')}", timeout=10)
    if probe.status_code != 403:
        pytest.skip("the real Consul lets the anonymous token read KV (ACLs off or a permissive policy)")
    try:
        yield target
    finally:
        target.cleanup()


@pytest.fixture
def sim_consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulTarget]:
    """The sim alone (fault controls, in-process state, time-scaled TTLs)."""
    yield from _sim_target(monkeypatch)
