"""Helpers shared by the integration tests, imported as ``support`` (as tests/backends imports its own)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shepard_lib.backends._http import RetryPolicy
from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.config import ConsulConfig, NomadConfig
from shepard_lib.sim import SimCluster


@contextmanager
def connected(sim: SimCluster) -> Iterator[tuple[ConsulBackend, NomadBackend]]:
    """Backends for ``sim`` on its clock, retrying once; closed on exit."""
    retry = RetryPolicy(attempts=2)
    consul = ConsulBackend(ConsulConfig(address=sim.consul_addr), sim.clock, retry=retry)
    nomad = NomadBackend(NomadConfig(address=sim.nomad_addr), sim.clock, retry=retry)
    try:
        yield consul, nomad
    finally:
        consul.close()
        nomad.close()


class Background:
    """Runs ``fn`` in a thread and keeps its result or exception for the test to inspect."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the call; fail the test if it is still running after ``timeout`` real seconds."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background call did not finish"
