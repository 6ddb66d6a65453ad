"""Fixtures for the Nomad HTTP contract: the same tests run against the sim and a real Nomad.

``nomad_target`` is parametrised ``["sim", "real"]``. The real variant runs when ``NOMAD_ADDR``
(and, with ACLs, ``NOMAD_TOKEN``) is set and is skipped otherwise; it only reads, and skips a test
when the cluster has nothing to read (no job with allocations). ``sim_target`` is the sim alone,
for tests that restart tasks or use the sim's fault controls and record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nomad_contract import (
    CONTRACT_SCENARIO,
    SIM_SCALE,
    SIM_TOKEN,
    NomadTarget,
    python_nomad,
    real_target,
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
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, acl_token: str | None = None
) -> Iterator[NomadTarget]:
    _clear_env(monkeypatch)
    with SimCluster.from_scenario(
        CONTRACT_SCENARIO, data_dir=tmp_path, time_scale=SIM_SCALE, acl_token=acl_token
    ) as sim:
        yield NomadTarget("sim", sim.nomad_addr, acl_token, python_nomad(sim.nomad_addr, acl_token), sim)


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_cluster)])
def nomad_target(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[NomadTarget]:
    """The Nomad under test: the sim, or the real one named by NOMAD_ADDR."""
    if request.param == "sim":
        yield from _sim(monkeypatch, tmp_path)
        return
    yield real_target()


@pytest.fixture
def sim_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[NomadTarget]:
    """The sim alone (restarts, fault controls, the restart record)."""
    yield from _sim(monkeypatch, tmp_path)


@pytest.fixture
def sim_acl_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[NomadTarget]:
    """The sim with ACLs on; ``target.token`` is the token it accepts."""
    yield from _sim(monkeypatch, tmp_path, acl_token=SIM_TOKEN)
