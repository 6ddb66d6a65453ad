"""State shared by everything in a process that talks to the same backend object.

Plans last seen (:mod:`shepard_lib.plan`) and sessions found alive (:mod:`shepard_lib.recovery`)
are remembered per Consul backend: every coordinator on that backend sees them, and they go
with the backend.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["PerBackend"]


class PerBackend(Generic[T]):
    """One ``T`` per backend object, made by ``factory`` on first use and dropped with the backend.

    A backend that cannot be weakly referenced gets a fresh ``T`` on every call (nothing shared).
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._by_backend: weakref.WeakKeyDictionary[object, T] = weakref.WeakKeyDictionary()

    def __call__(self, backend: object) -> T:
        with self._lock:
            try:
                found = self._by_backend.get(backend)
                if found is None:
                    found = self._by_backend[backend] = self._factory()
                return found
            except TypeError:
                return self._factory()
