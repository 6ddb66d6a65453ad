"""The one small interface the watcher needs of the kernel's file events, and its pyinotify implementation.

A :class:`DirWatcher` watches single directories (not recursively: the watcher decides which
subdirectories to follow, so that ``alloc/logs/`` is never watched) and reports, on its own
thread, each event as an :class:`FsEvent`. :class:`PyInotifyWatcher` is the real one (pyinotify,
with ``pyasyncore`` on Python 3.12+). Running out of inotify watches (``ENOSPC``: the
``fs.inotify.max_user_watches`` sysctl) raises :class:`WatchLimitReached`, so the caller can fall
back to scanning instead of going blind.
"""

from __future__ import annotations

import enum
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

with warnings.catch_warnings():
    # pyinotify imports asyncore, deprecated on 3.11 (and provided by pyasyncore on 3.12+).
    warnings.filterwarnings("ignore", "The asyncore module is deprecated", DeprecationWarning)
    import pyinotify

__all__ = ["DirWatcher", "EventKind", "FsEvent", "PyInotifyWatcher", "WatchError", "WatchLimitReached"]

# pyinotify logs its own errors to stderr through a handler of its own; Shepard reports them itself.
logging.getLogger("pyinotify").setLevel(logging.CRITICAL)

_MASK = (
    pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_CREATE
    | pyinotify.IN_DELETE
    | pyinotify.IN_DELETE_SELF
    | pyinotify.IN_ATTRIB
)
_POLL_MS = 500  # real milliseconds between looks at the stop flag while no event arrives


class WatchError(Exception):
    """A directory could not be watched (it vanished, or permission was denied)."""


class WatchLimitReached(WatchError):
    """The kernel refused a watch with ENOSPC: ``fs.inotify.max_user_watches`` is exhausted."""


class EventKind(enum.Enum):
    """What happened to a path."""

    WRITTEN = "written"  # a file was closed after writing, or moved in, or its attributes changed
    REMOVED = "removed"  # a file was deleted or moved away
    DIR_CREATED = "dir_created"  # a directory appeared (created or moved in): watch it too
    DIR_GONE = "dir_gone"  # a watched directory itself was deleted
    OVERFLOW = "overflow"  # the kernel queue overflowed: events were lost, rescan everything


@dataclass(frozen=True)
class FsEvent:
    """One file event: ``path`` is absolute (the watched directory for DIR_GONE, empty for OVERFLOW)."""

    kind: EventKind
    path: Path


class DirWatcher(Protocol):
    """Watches directories and calls ``on_event`` (given at construction) from its own thread."""

    def add(self, directory: Path) -> None:
        """Watch ``directory`` (not its subdirectories); WatchLimitReached / WatchError when refused."""
        ...

    def remove(self, directory: Path) -> None:
        """Stop watching ``directory`` (no error if it was not watched or is gone)."""
        ...

    def count(self) -> int:
        """Directories watched now."""
        ...

    def close(self) -> None:
        """Stop the event thread and release every watch."""
        ...


class PyInotifyWatcher:
    """:class:`DirWatcher` over pyinotify: one inotify instance and one reader thread."""

    def __init__(self, on_event: Callable[[FsEvent], None], name: str = "shepard-inotify") -> None:
        self._on_event = on_event
        self._wm = pyinotify.WatchManager()
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._process, timeout=_POLL_MS)
        self._wds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, directory: Path) -> None:
        """Watch ``directory``; WatchLimitReached on ENOSPC, WatchError otherwise."""
        with self._lock:
            if directory in self._wds:
                return
            try:
                result = self._wm.add_watch(str(directory), _MASK, quiet=False)
            except pyinotify.WatchManagerError as exc:
                if "ENOSPC" in str(exc):
                    raise WatchLimitReached(f"inotify watch limit reached watching {directory}") from None
                raise WatchError(f"cannot watch {directory}: {exc}") from None
            wd = result.get(str(directory), -1)
            if wd < 0:
                raise WatchError(f"cannot watch {directory}")
            self._wds[directory] = wd

    def remove(self, directory: Path) -> None:
        """Stop watching ``directory``."""
        with self._lock:
            wd = self._wds.pop(directory, None)
            if wd is not None and self._wm.get_path(wd) is not None:
                self._wm.rm_watch(wd, quiet=True)

    def count(self) -> int:
        """Directories watched now."""
        with self._lock:
            return len(self._wds)

    def close(self) -> None:
        """Stop the reader thread and close the inotify instance."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._notifier.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._notifier.check_events():
                    self._notifier.read_events()
                    self._notifier.process_events()
            except Exception:  # the reader must survive anything, or the agent goes blind
                logging.getLogger(__name__).exception("inotify reader failed; rescanning")
                self._on_event(FsEvent(EventKind.OVERFLOW, Path()))

    def _process(self, event: pyinotify.Event) -> None:
        mask = event.mask
        path = Path(event.pathname)
        if mask & pyinotify.IN_Q_OVERFLOW:
            self._on_event(FsEvent(EventKind.OVERFLOW, Path()))
            return
        if mask & pyinotify.IN_IGNORED:
            with self._lock:
                gone = [d for d, wd in self._wds.items() if wd == event.wd]
                for d in gone:
                    del self._wds[d]
            return
        if mask & pyinotify.IN_DELETE_SELF:
            self._on_event(FsEvent(EventKind.DIR_GONE, path))
            return
        if mask & pyinotify.IN_ISDIR:
            if mask & (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO):
                self._on_event(FsEvent(EventKind.DIR_CREATED, path))
            elif mask & pyinotify.IN_MOVED_FROM:
                self._on_event(FsEvent(EventKind.DIR_GONE, path))
            return
        if mask & (pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM):
            self._on_event(FsEvent(EventKind.REMOVED, path))
        elif mask & (pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO | pyinotify.IN_ATTRIB):
            self._on_event(FsEvent(EventKind.WRITTEN, path))
