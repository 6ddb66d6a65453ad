"""Helpers of the Nomad HTTP contract tests: the target, the scenario, python-nomad construction.

``nomad_target`` is parametrised ``["sim", "real"]``. The real variant runs when ``NOMAD_ADDR``
(and, with ACLs, ``NOMAD_TOKEN``) is set and is skipped otherwise; it only reads, and skips a test
when the cluster has nothing to read (no job with allocations). ``sim_target`` is the sim alone,
for tests that restart tasks or use the sim's fault controls and record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nomad
import pytest
import requests

from shepard_lib.sim import SimCluster

REAL_SKIP_REASON = "set NOMAD_ADDR (and NOMAD_TOKEN) to run against a real Nomad"
SIM_SCALE = 50.0
SIM_TOKEN = "sim-nomad-management-token"

CONTRACT_SCENARIO: dict[str, Any] = {
    "seed": 3,
    "nodes": [{"name": "n1", "class": "web", "meta": {"rack": "r1"}}, "n2"],
    "jobs": [
        {
            "name": "web",
            "meta": {"owner": "team-a"},
            "groups": [
                {
                    "name": "app",
                    "count": 3,
                    "tasks": [
                        {
                            "name": "server",
                            "shepard": True,
                            "templates": [{"key": "config/web", "destination": "local/app.conf"}],
                            "service": "web",
                        },
                        {"name": "sidecar", "driver": "raw_exec"},
                    ],
                }
            ],
        },
        {
            "name": "reports",
            "namespace": "batch",
            "groups": [{"name": "gen", "count": 1, "tasks": [{"name": "run"}]}],
        },
    ],
    "timing": {"restart": "1s", "healthy_after": "500ms"},
    "keys": {"config/web": "v1"},
}


@dataclass
class NomadTarget:
    """A Nomad to test: ``client`` is python-nomad, ``sim`` the cluster when it is the sim."""

    kind: str
    address: str
    token: str | None
    client: nomad.Nomad
    sim: SimCluster | None = None

    def get(self, path: str, **params: Any) -> requests.Response:
        """A raw GET (for headers python-nomad hides)."""
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        return requests.get(self.address + path, params=params, headers=headers, timeout=30)

    def post(self, path: str, body: Any = None) -> requests.Response:
        """A raw POST with an optional JSON body."""
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        return requests.post(self.address + path, json=body, headers=headers, timeout=30)

    def cluster(self) -> SimCluster:
        """The sim cluster (only for sim targets)."""
        assert self.sim is not None, "this test needs the sim"
        return self.sim

    def some_job_with_allocs(self) -> tuple[str, list[dict[str, Any]]]:
        """A job ID and its allocation stubs; skips when the cluster has none."""
        for stub in self.client.jobs.get_jobs():
            allocs = self.client.job.get_allocations(stub["ID"])
            if allocs:
                return stub["ID"], allocs
        pytest.skip("the cluster has no job with allocations")


def real_target() -> NomadTarget:
    """The real Nomad named by ``NOMAD_ADDR`` (and ``NOMAD_TOKEN``); skips the test when it is not set."""
    address = os.environ.get("NOMAD_ADDR")
    if not address:
        pytest.skip(REAL_SKIP_REASON)
    token = os.environ.get("NOMAD_TOKEN")
    client = nomad.Nomad(address=address, token=token, timeout=30)
    return NomadTarget("real", address.rstrip("/"), token, client)


def python_nomad(address: str, token: str | None) -> nomad.Nomad:
    """python-nomad for ``address`` (``http://host:port``)."""
    parts = urlsplit(address)
    return nomad.Nomad(host=parts.hostname or "127.0.0.1", port=parts.port or 4646, token=token, timeout=30)
