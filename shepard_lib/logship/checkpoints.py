"""Shipping checkpoints: per sink and stream, the position of the first line not yet shipped.

One JSON file, rewritten atomically (write a temporary file, fsync it, rename it over the old one)
after each shipment a sink acknowledged. A crash therefore loses nothing and re-ships at most the
batch in flight (at-least-once). The directory is not fsynced after the rename: a power loss can
then only bring back the previous checkpoint, which means one batch shipped twice, never a loss,
and it saves a third fsync per batch. Each allocation's tags are kept beside its
positions, so the last lines of an allocation Nomad has already forgotten still ship with its tags.

Format (``version`` 1)::

    {"version": 1,
     "allocations": {"<alloc id>": {"alloc": {...AllocationLogs...},
                                    "positions": {"<task>": {"stdout": {"<sink>": [N, offset, inode]}}}}}}
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

    def forget(self, alloc_id: str) -> None:
        """Drop an allocation and all its positions."""
        self._allocs.pop(alloc_id, None)
        for key in [k for k in self._positions if k[0] == alloc_id]:
            del self._positions[key]

    def save(self) -> None:
        """Persist atomically: temporary file, fsync, rename."""
        allocations: dict[str, Any] = {
            alloc_id: {"alloc": alloc.to_json(), "positions": {}} for alloc_id, alloc in self._allocs.items()
        }
        for (alloc_id, task, stream), sinks in self._positions.items():
            if alloc_id in allocations:
                allocations[alloc_id]["positions"].setdefault(task, {})[stream] = {
                    sink: [p.index, p.offset, p.inode] for sink, p in sinks.items()
                }
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
        except OSError as exc:
            raise CheckpointError(f"cannot write the checkpoint file {self.path}: {exc.strerror}") from None
