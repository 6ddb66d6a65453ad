"""Stand-ins for a faulty participant, shared by the integration and chaos tests.

Imported as ``fault_support``: ``tests/conftest.py`` puts this folder on ``sys.path`` (pytest's default
import mode), as each test folder's own helpers (``support``, ``chaos_support``) are put there by its tests.
"""

from __future__ import annotations

from typing import Any

from shepard_lib.backends import ConsulAPI, NomadAPI
from shepard_lib.clock import Clock


class ConsulProxy:
    """A ConsulAPI that passes every call to ``inner``; a test's subclass overrides the calls it disturbs."""

    def __init__(self, inner: ConsulAPI) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class NomadProxy:
    """A NomadAPI that passes every call to ``inner``; a test's subclass overrides the calls it disturbs."""

    def __init__(self, inner: NomadAPI) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SkewedClock(Clock):
    """The cluster clock as read on a host whose wall clock is ``skew`` seconds off."""

    def __init__(self, base: Clock, skew: float) -> None:
        super().__init__(base.scale)
        self._base = base
        self._skew = skew

    def time(self) -> float:
        return self._base.time() + self._skew

    def monotonic(self) -> float:
        return self._base.monotonic()
