"""Helpers shared by the integration tests, imported as ``support`` (as tests/backends imports its own)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

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


SHEPARD = str(Path(sys.executable).with_name("shepard"))
"""The ``shepard`` console script of the environment running the tests (what a user runs)."""


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment without the Consul/Nomad/Shepard variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_", "SHEPARD_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Console:
    """``shepard ARGS`` as a subprocess; its stderr is read line by line for the test to wait on."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [SHEPARD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env() if env is None else env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._out: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.lines.put), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], put: Callable[[str], object]) -> None:
        for line in stream:
            put(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first stderr line (from here on) containing ``text``; fails after ``timeout`` real seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                self.proc.kill()
                self.finish()
                raise AssertionError(f"no stderr line with {text!r} in {timeout}s; saw {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Wait for the exit: (code, stdout, all of stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self._readers:  # the pipes are at their end once the process exited
            reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return self.proc.returncode, "".join(self._out), "".join(self.seen)
