"""Fixtures for the Nomad HTTP contract: the same tests run against the sim and a real Nomad.

``nomad_target`` is parametrised ``["sim", "real"]``. The real variant runs when ``NOMAD_ADDR``
(and, with ACLs, ``NOMAD_TOKEN``) is set and is skipped otherwise; it only reads, and skips a test
when the cluster has nothing to read (no job with allocations). ``sim_target`` is the sim alone,
for tests that restart tasks or use the sim's fault controls and record.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import nomad
import pytest
from nomad_contract import (
    CONTRACT_SCENARIO,
    REAL_SKIP_REASON,
    SIM_SCALE,
    SIM_TOKEN,
    NomadTarget,
    python_nomad,
)

from shepard_lib.sim import SimCluster


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "NOMAD_ADDR",
        "NOMAD_TOKEN",
        "NOMAD_NAMESPACE",
        "NOMAD_REGION",
        "NOMAD_CLIENT_CERT",
        "NOMAD_CLIENT_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


def _sim(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    acl_token: str | None = None,
    scenario: dict[str, Any] = CONTRACT_SCENARIO,
) -> Iterator[NomadTarget]:
    _clear_env(monkeypatch)
    with SimCluster.from_scenario(
        scenario, data_dir=tmp_path, time_scale=SIM_SCALE, acl_token=acl_token
    ) as sim:
        yield NomadTarget("sim", sim.nomad_addr, acl_token, python_nomad(sim.nomad_addr, acl_token), sim)


@pytest.fixture(params=["sim", "real"])
def nomad_target(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[NomadTarget]:
    """The Nomad under test: the sim, or the real one named by NOMAD_ADDR."""
    if request.param == "sim":
        yield from _sim(monkeypatch, tmp_path)
        return
    address = os.environ.get("NOMAD_ADDR")
    if not address:
        pytest.skip(REAL_SKIP_REASON)
    token = os.environ.get("NOMAD_TOKEN")
    yield NomadTarget(
        "real", address.rstrip("/"), token, nomad.Nomad(address=address, token=token, timeout=30)
    )


@pytest.fixture
def sim_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[NomadTarget]:
    """The sim alone (restarts, fault controls, the restart record)."""
    yield from _sim(monkeypatch, tmp_path)


@pytest.fixture
def slow_restart_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[NomadTarget]:
    """The sim whose tasks stay down for an hour (cluster time) once restarted: "not running" is a
    state a test can rely on, however slowly a loaded machine runs it."""
    scenario = {**CONTRACT_SCENARIO, "timing": {**CONTRACT_SCENARIO["timing"], "restart": "1h"}}
    yield from _sim(monkeypatch, tmp_path, scenario=scenario)


@pytest.fixture
def sim_acl_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[NomadTarget]:
    """The sim with ACLs on; ``target.token`` is the token it accepts."""
    yield from _sim(monkeypatch, tmp_path, acl_token=SIM_TOKEN)
