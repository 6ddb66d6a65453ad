"""Watches the files of managed tasks and reports real content changes, one event per task per burst.

For each managed task (an allocation's task with ``local/shepard.tpl``) the watcher follows,
recursively, the task's ``local/`` (and ``secrets/`` with ``watch_secrets``) and the allocation's
shared ``alloc/`` directory, **never** ``alloc/logs/``. It ignores ``local/shepard.tpl`` (the
trigger itself) and editor and temporary files (dot files, ``~`` backups, ``.swp``, ``.tmp``,
and the all-digit names consul-template writes before it renames a render into place), and it
reads only files that were closed after writing or moved in, never half-written content.

A change counts only when a file's SHA-256 differs from the digest recorded for it: an identical
re-render, or the task's own restart, is no change. Events are coalesced per task: once nothing
has happened for ``settle_time`` (or ``10 x settle_time`` after the first event, whichever comes
first) the dirty files are digested and, if any changed, one :class:`ChangeEvent` is handed to
``on_change``.

When the kernel refuses a watch (``ENOSPC``: ``fs.inotify.max_user_watches``) the watcher logs it
once, with the sysctl to raise, and that task falls back to periodic digest scans every
``scan_interval``; it is never left blind.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shepard_lib.agent.inotify import DirWatcher, EventKind, FsEvent, WatchError, WatchLimitReached
from shepard_lib.clock import Clock
from shepard_lib.keyspace import TEMPLATE_DESTINATION

__all__ = ["ChangeEvent", "FileWatcher", "TaskKey", "is_ignored"]

log = logging.getLogger(__name__)

_TEMP_NAME = re.compile(r"\A(\..*|.*~|.*\.(swp|swx|swo|tmp|part)|\d+|4913)\Z")
SETTLE_CAP = 10
"""A burst that never goes quiet is still reported ``SETTLE_CAP x settle_time`` after its first event."""


def is_ignored(name: str) -> bool:
    """True for editor and temporary file names (see the module docs)."""
    return bool(_TEMP_NAME.match(name))


@dataclass(frozen=True, order=True)
class TaskKey:
    """One managed task of one allocation."""

    alloc_id: str
    task: str


@dataclass(frozen=True)
class ChangeEvent:
    """The files of ``key`` changed (``files`` relative to the allocation dir)."""

    key: TaskKey
    files: tuple[str, ...]


@dataclass
class _TaskState:
    digests: dict[Path, str] = field(default_factory=dict)
    dirty: set[Path] = field(default_factory=set)
    first_event: float | None = None
    last_event: float | None = None
    scanning: bool = False  # fallen back to periodic scans (no inotify watch)
    next_scan: float = 0.0


class FileWatcher:
    """Watches the managed tasks under ``data_dir`` (a Nomad client's ``data_dir``).

    ``watcher_factory`` builds the :class:`DirWatcher` given the event callback (pyinotify by
    default); ``on_change`` is called from the watcher's own thread and must not block for long.
    """

    def __init__(
        self,
        data_dir: Path,
        on_change: Callable[[ChangeEvent], None],
        watcher_factory: Callable[[Callable[[FsEvent], None]], DirWatcher],
        *,
        on_gone: Callable[[TaskKey], None] | None = None,
        clock: Clock,
        settle_time: float,
        watch_secrets: bool = False,
        scan_interval: float = 10.0,
    ) -> None:
        self.alloc_root = data_dir / "alloc"
        self.settle_time = settle_time
        self.watch_secrets = watch_secrets
        self.scan_interval = scan_interval
        self._on_change = on_change
        self._on_gone = on_gone
        self._clock = clock
        self._cond = threading.Condition()
        self._tasks: dict[TaskKey, _TaskState] = {}
        self._stopped = False
        self._limit_logged = False
        self._dirs = watcher_factory(self._event)
        self._thread = threading.Thread(target=self._loop, name="shepard-watcher", daemon=True)
        self._thread.start()

    # --- what is watched ---------------------------------------------------------------------------

    def watch(self, key: TaskKey) -> None:
        """Start watching ``key``'s directories; its current files are the baseline (no event)."""
        with self._cond:
            if key in self._tasks:
                return
            state = _TaskState()
            self._tasks[key] = state
            for root in self._roots(key):
                if not state.scanning:
                    self._add_tree(root, key)
            state.digests = {path: digest for path in self._files(key) if (digest := _digest(path))}
            state.next_scan = self._clock.monotonic() + self.scan_interval
        log.info("watching alloc %s task %s%s", key.alloc_id, key.task, self._mode(key))

    def unwatch(self, key: TaskKey) -> None:
        """Stop watching ``key`` (its directories stay watched while another task of the alloc needs them)."""
        with self._cond:
            if self._tasks.pop(key, None) is None:
                return
            for root in self._roots(key):
                if not any(root in self._roots(k) for k in self._tasks):
                    for directory in self._tree(root):
                        self._dirs.remove(directory)
        log.info("no longer watching alloc %s task %s", key.alloc_id, key.task)

    def watched(self) -> set[TaskKey]:
        """The tasks watched now."""
        with self._cond:
            return set(self._tasks)

    def fallback_count(self) -> int:
        """Tasks on periodic scans because inotify refused a watch."""
        with self._cond:
            return sum(1 for s in self._tasks.values() if s.scanning)

    def close(self) -> None:
        """Stop watching everything."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._dirs.close()

    # --- paths ---------------------------------------------------------------------------------------

    def _roots(self, key: TaskKey) -> list[Path]:
        base = self.alloc_root / key.alloc_id
        roots = [base / key.task / "local", base / "alloc"]
        if self.watch_secrets:
            roots.append(base / key.task / "secrets")
        return roots

    def _excluded(self, path: Path) -> bool:
        """``alloc/<id>/alloc/logs`` and everything under it."""
        try:
            parts = path.relative_to(self.alloc_root).parts
        except ValueError:
            return True
        return len(parts) >= 3 and parts[1] == "alloc" and parts[2] == "logs"

    def _owners(self, path: Path) -> list[TaskKey]:
        """The watched tasks a file under ``path`` belongs to."""
        try:
            parts = path.relative_to(self.alloc_root).parts
        except ValueError:
            return []
        if len(parts) < 3 or self._excluded(path):
            return []
        alloc_id, area = parts[0], parts[1]
        if area == "alloc":
            return [k for k in self._tasks if k.alloc_id == alloc_id]
        if parts[2] == "local" or (parts[2] == "secrets" and self.watch_secrets):
            key = TaskKey(alloc_id, area)
            return [key] if key in self._tasks else []
        return []

    def _relevant(self, key: TaskKey, path: Path) -> bool:
        if is_ignored(path.name) or self._excluded(path):
            return False
        return path != self.alloc_root / key.alloc_id / key.task / TEMPLATE_DESTINATION

    def _tree(self, root: Path) -> Iterator[Path]:
        """``root`` and its subdirectories, without ``alloc/logs``."""
        if not root.is_dir() or self._excluded(root):
            return
        yield root
        try:
            children = sorted(root.iterdir())
        except OSError:
            return
        for child in children:
            if child.is_dir() and not child.is_symlink():
                yield from self._tree(child)

    def _files(self, key: TaskKey) -> Iterator[Path]:
        for root in self._roots(key):
            for directory in self._tree(root):
                try:
                    entries = list(directory.iterdir())
                except OSError:
                    continue
                for path in entries:
                    if path.is_file() and self._relevant(key, path):
                        yield path

    def _add_tree(self, root: Path, key: TaskKey) -> None:
        """Watch ``root`` recursively; on a refused watch fall back to scans for ``key``."""
        for directory in self._tree(root):
            try:
                self._dirs.add(directory)
            except WatchLimitReached:
                self._fall_back(key, directory)
                return
            except WatchError as exc:
                log.debug("not watching %s: %s", directory, exc)

    def _fall_back(self, key: TaskKey, directory: Path) -> None:
        if not self._limit_logged:
            self._limit_logged = True
            log.error(
                "inotify watch limit reached at %s: falling back to scanning every %gs for the tasks "
                "affected; raise it with: sysctl -w fs.inotify.max_user_watches=524288 "
                "(and in /etc/sysctl.d/ to keep it)",
                directory,
                self.scan_interval,
            )
        for owner in [key, *self._owners(directory / "_")]:
            state = self._tasks.get(owner)
            if state is not None and not state.scanning:
                state.scanning = True
                log.warning(
                    "alloc %s task %s: scanning every %gs", owner.alloc_id, owner.task, self.scan_interval
                )

    def _mode(self, key: TaskKey) -> str:
        return " (periodic scans: inotify watch limit reached)" if self._tasks[key].scanning else ""

    # --- events ----------------------------------------------------------------------------------------

    def _event(self, event: FsEvent) -> None:
        """Called on the DirWatcher's thread."""
        gone: list[TaskKey] = []
        with self._cond:
            now = self._clock.monotonic()
            if event.kind is EventKind.OVERFLOW:
                log.warning("inotify queue overflowed: rescanning every watched task")
                for key in self._tasks:
                    self._mark(key, set(self._files(key)) | set(self._tasks[key].digests), now)
            elif event.kind is EventKind.DIR_CREATED:
                for key in self._owners(event.path / "_"):
                    self._add_tree(event.path, key)
                    self._mark(key, {p for p in self._files(key) if p.is_relative_to(event.path)}, now)
            elif event.kind is EventKind.DIR_GONE:
                self._dirs.remove(event.path)
                gone = [k for k in self._tasks if event.path in self._roots(k)[:1]]
                for key in self._owners(event.path / "_"):
                    lost = {p for p in self._tasks[key].digests if p.is_relative_to(event.path)}
                    self._mark(key, lost, now)
            else:
                for key in self._owners(event.path):
                    if self._relevant(key, event.path):
                        self._mark(key, {event.path}, now)
            self._cond.notify_all()
        for key in gone:
            log.info("alloc %s task %s: its directory is gone", key.alloc_id, key.task)
            self.unwatch(key)
            if self._on_gone is not None:
                self._on_gone(key)

    def _mark(self, key: TaskKey, paths: set[Path], now: float) -> None:
        if not paths:
            return
        state = self._tasks[key]
        state.dirty |= paths
        state.last_event = now
        if state.first_event is None:
            state.first_event = now

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = self._clock.monotonic()
                events = [e for key in list(self._tasks) if (e := self._due(key, now)) is not None]
                if events:
                    self._cond.release()
                    try:
                        for event in events:
                            self._emit(event)
                    finally:
                        self._cond.acquire()
                    continue
                wake = self._next_wake(now)
                self._cond.wait(None if wake is None else self._clock.real(wake))

    def _due(self, key: TaskKey, now: float) -> ChangeEvent | None:
        """The change event of ``key`` if its burst has settled (or its scan is due), else None."""
        state = self._tasks[key]
        if state.scanning and now >= state.next_scan:
            state.next_scan = now + self.scan_interval
            state.dirty |= set(self._files(key)) | set(state.digests)
            state.first_event = state.first_event if state.first_event is not None else now
            state.last_event = now - self.settle_time
        if state.first_event is None or state.last_event is None:
            return None
        quiet = now - state.last_event >= self.settle_time
        capped = now - state.first_event >= SETTLE_CAP * self.settle_time
        if not (quiet or capped):
            return None
        if not self._roots(key)[0].is_dir():
            # The task's directory is gone (its allocation was collected): nothing to restart.
            state.dirty.clear()
            state.first_event = state.last_event = None
            return None
        changed = []
        for path in sorted(state.dirty):
            digest = _digest(path) if path.is_file() else None
            if digest != state.digests.get(path):
                changed.append(path)
                if digest is None:
                    state.digests.pop(path, None)
                else:
                    state.digests[path] = digest
        state.dirty.clear()
        state.first_event = state.last_event = None
        if not changed:
            return None
        base = self.alloc_root / key.alloc_id
        return ChangeEvent(key, tuple(str(p.relative_to(base)) for p in changed))

    def _next_wake(self, now: float) -> float | None:
        wakes = []
        for state in self._tasks.values():
            if state.first_event is not None and state.last_event is not None:
                wakes.append(
                    min(
                        state.last_event + self.settle_time, state.first_event + SETTLE_CAP * self.settle_time
                    )
                )
            if state.scanning:
                wakes.append(state.next_scan)
        return max(0.0, min(wakes) - now) if wakes else None

    def _emit(self, event: ChangeEvent) -> None:
        try:
            self._on_change(event)
        except Exception:
            log.exception("change handler failed for alloc %s task %s", event.key.alloc_id, event.key.task)


def _digest(path: Path) -> str | None:
    """SHA-256 of the file's content, or None when it cannot be read (gone, or not a file)."""
    sha = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                sha.update(chunk)
    except OSError:
        return None
    return sha.hexdigest()
