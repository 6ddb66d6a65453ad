"""The target of the Consul contract tests: a sim or a real Consul, with per-test isolation.

Every test works under its own key prefix (``target.key(...)``), deleted afterwards, and every
session it creates through ``target.session(...)`` is destroyed afterwards.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import requests

from shepard_lib.clock import Clock
from shepard_lib.sim.consul import ConsulServer, ConsulState

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import consul
    from consul import ConsulException

__all__ = [
    "REAL_SKIP_REASON",
    "SIM_SCALE",
    "ConsulException",
    "ConsulTarget",
    "anonymous_client",
    "make_client",
]

REAL_SKIP_REASON = "set CONSUL_HTTP_ADDR (and CONSUL_HTTP_TOKEN) to run against a real Consul"
SIM_SCALE = 50.0
"""The sim's clock runs 50x: a 10 s TTL passes in 0.2 real seconds."""


def make_client(address: str, token: str | None = None) -> Any:
    """A python-consul2 client for ``http://host:port`` (its construction warning silenced)."""
    scheme, _, hostport = address.partition("://")
    host, _, port = hostport.rpartition(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return consul.Consul(host=host, port=int(port), token=token, scheme=scheme)


def anonymous_client(address: str) -> Any:
    """A python-consul2 client that sends no token at all, whatever the environment says.

    python-consul2 takes ``CONSUL_HTTP_TOKEN`` over ``token=None``, so a client built while the
    variable is set (as for a real cluster) would send the management token: build it without it.
    """
    with mock.patch.dict(os.environ):
        os.environ.pop("CONSUL_HTTP_TOKEN", None)
        client = make_client(address)
    assert getattr(client, "token", None) is None, "the anonymous client has a token"
    return client


@dataclass
class ConsulTarget:
    """A Consul to test against: its address, token, clock, and the sim when it is one."""

    kind: str
    address: str
    token: str | None
    clock: Clock
    sim: ConsulServer | None = None
    prefix: str = field(default_factory=lambda: f"shepard-contract-{uuid.uuid4().hex[:12]}/")
    _sessions: list[str] = field(default_factory=list)
    _http: requests.Session | None = None

    @property
    def state(self) -> ConsulState:
        """The sim's state (sim-only tests)."""
        assert self.sim is not None, "sim-only"
        return self.sim.state

    def client(self) -> Any:
        """A python-consul2 client with the target's token."""
        return make_client(self.address, self.token)

    def key(self, name: str = "") -> str:
        """A key under this test's private prefix."""
        return self.prefix + name

    def session(self, **kwargs: Any) -> str:
        """Create a session through python-consul2; it is destroyed when the test ends."""
        session_id: str = self.client().session.create(**kwargs)
        self._sessions.append(session_id)
        return session_id

    def http(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A raw request on a keep-alive connection, with the token header."""
        if self._http is None:
            self._http = requests.Session()
            if self.token:
                self._http.headers["X-Consul-Token"] = self.token
        return self._http.request(method, self.address + path, timeout=30, **kwargs)

    def node_name(self) -> str:
        """The Consul node name of the agent, read with the target's token.

        Not through the client: py-consul 1.8.0's ``agent.self()`` sends no token header.
        """
        resp = self.http("GET", "/v1/agent/self")
        resp.raise_for_status()
        return str(resp.json()["Config"]["NodeName"])

    def requests_count(self, endpoint: str, method: str) -> int:
        """How many requests the sim has counted for ``endpoint`` and ``method``."""
        counts = requests.get(self.address + "/_sim/requests", timeout=5).json()
        return int(counts.get(endpoint, {}).get(method, 0))

    def cleanup(self) -> None:
        """Destroy the test's sessions and delete its keys."""
        c = self.client()
        for session_id in self._sessions:
            c.session.destroy(session_id)
        c.kv.delete(self.prefix, recurse=True)
        if self._http is not None:
            self._http.close()
