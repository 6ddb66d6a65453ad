"""Shipping checkpoints: per sink and stream, the position of the first line not yet shipped.

One JSON file, rewritten atomically (write a temporary file, fsync it, rename it over the old one,
fsync the directory) after each shipment a sink acknowledged. A crash or a power loss therefore
loses nothing and re-ships at most the batch in flight (at-least-once): once :meth:`Checkpoints.save`
returns, the new positions are on disk. Each allocation's tags are kept beside its positions, so the
last lines of an allocation Nomad has already forgotten still ship with its tags, and so is the end
of each stream as last listed, so that forgetting an allocation whose files went away before every
line was shipped is known (and counted as falling behind).

Format (``version`` 1; ``listed`` may be absent)::

    {"version": 1,
     "allocations": {"<alloc id>": {"alloc": {...AllocationLogs...},
                                    "positions": {"<task>": {"stdout": {"<sink>": [N, offset, inode]}}},
                                    "listed": {"<task>": {"stdout": [N, size]}}}}}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shepard_lib.errors import ShepardError
from shepard_lib.logship.tags import AllocationLogs
from shepard_lib.logship.tailer import Position

__all__ = ["CheckpointError", "Checkpoints"]

VERSION = 1


class CheckpointError(ShepardError):
    """The checkpoint file cannot be read or written."""


class Checkpoints:
    """The checkpoint file at ``path``, loaded on construction (missing: nothing shipped yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._allocs: dict[str, AllocationLogs] = {}
        self._positions: dict[tuple[str, str, str], dict[str, Position]] = {}
        self._listed: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.reload()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's lock (``<path>.lock``, ``flock``): one shipping round at a time on these
        checkpoints, across threads and processes (the agent and a ``shepard logs ship --once``)."""
        lock_path = self.path.with_name(f"{self.path.name}.lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot open the lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def reload(self) -> None:
        """Read the file again (another process may have moved the positions); nothing if absent."""
        if not self.path.exists():
            return
        self._allocs.clear()
        self._positions.clear()
        self._listed.clear()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            for alloc_id, entry in data["allocations"].items():
                self._allocs[alloc_id] = AllocationLogs.from_json(entry["alloc"])
                for task, streams in entry["positions"].items():
                    for stream, sinks in streams.items():
                        self._positions[(alloc_id, task, stream)] = {
                            sink: Position(int(n), int(offset), int(inode))
                            for sink, (n, offset, inode) in sinks.items()
                        }
                for task, streams in entry.get("listed", {}).items():
                    for stream, (n, size) in streams.items():
                        self._listed[(alloc_id, task, stream)] = (int(n), int(size))
        except OSError as exc:
            raise CheckpointError(f"cannot read the checkpoint file {self.path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"the checkpoint file {self.path} is damaged ({exc}); move it away to start over"
            ) from None

    # --- reading --------------------------------------------------------------------------

    def allocations(self) -> list[AllocationLogs]:
        """Every allocation with a checkpoint."""
        return list(self._allocs.values())

    def position(self, sink: str, key: tuple[str, str, str]) -> Position | None:
        """Where ``sink`` is in the stream ``key`` = (alloc id, task, stream), or None."""
        return self._positions.get(key, {}).get(sink)

    def unshipped(self, alloc_id: str, sink: str) -> int:
        """How many files of ``alloc_id``, as last listed, ``sink`` has not shipped to their end."""
        files = 0
        for key, (index, size) in self._listed.items():
            if key[0] != alloc_id:
                continue
            position = self.position(sink, key)
            if position is not None and (position.index, position.offset) < (index, size):
                files += index - position.index + 1
        return files

    def known(self, key: tuple[str, str, str]) -> bool:
        """Whether any sink has a position in the stream ``key``."""
        return bool(self._positions.get(key))

    # --- changing (in memory; :meth:`save` persists) ---------------------------------------

    def remember(self, alloc: AllocationLogs) -> None:
        """Keep (or refresh) the tags of ``alloc``."""
        self._allocs[alloc.alloc_id] = alloc

    def set(self, sink: str, key: tuple[str, str, str], position: Position) -> None:
        """``sink`` has shipped the stream ``key`` up to ``position``."""
        self._positions.setdefault(key, {})[sink] = position

    def listed(self, key: tuple[str, str, str], index: int, size: int) -> None:
        """The stream ``key`` was listed with its newest file ``index`` of ``size`` bytes."""
        self._listed[key] = (index, size)

    def forget(self, alloc_id: str) -> None:
        """Drop an allocation, its positions and its listed ends."""
        self._allocs.pop(alloc_id, None)
        for table in (self._positions, self._listed):
            for key in [k for k in table if k[0] == alloc_id]:
                del table[key]

    def save(self) -> None:
        """Persist atomically and durably: temporary file, fsync, rename, fsync of the directory."""
        allocations: dict[str, Any] = {
            alloc_id: {"alloc": alloc.to_json(), "positions": {}, "listed": {}}
            for alloc_id, alloc in self._allocs.items()
        }
        for (alloc_id, task, stream), sinks in self._positions.items():
            if alloc_id in allocations:
                allocations[alloc_id]["positions"].setdefault(task, {})[stream] = {
                    sink: [p.index, p.offset, p.inode] for sink, p in sinks.items()
                }
        for (alloc_id, task, stream), (index, size) in self._listed.items():
            if alloc_id in allocations:
                allocations[alloc_id]["listed"].setdefault(task, {})[stream] = [index, size]
        text = json.dumps({"version": VERSION, "allocations": allocations}, sort_keys=True)
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_directory(directory)
        except OSError as exc:
            raise CheckpointError(f"cannot write the checkpoint file {self.path}: {exc.strerror}") from None


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (without it a power loss may bring the old file back)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
