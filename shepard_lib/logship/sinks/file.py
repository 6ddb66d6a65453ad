"""The ``file`` sink: JSON lines appended to a file, rotated by size."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

from shepard_lib.logship.records import Batch, JsonEncoder, SinkError

__all__ = ["FileSink"]


class FileSink:
    """Appends each batch as JSON lines to ``path`` and fsyncs it before the batch counts as shipped.

    When a batch would take the file past ``max_bytes``, the file is rotated first, as logrotate
    does: ``path`` becomes ``path.1``, ``path.1`` becomes ``path.2``, ..., keeping ``max_files``
    rotated files. A batch is never split, so a file exceeds ``max_bytes`` only by a batch
    larger than ``max_bytes`` on its own.
    """

    name = "file"

    def __init__(self, path: str, max_bytes: int, max_files: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._encoder = JsonEncoder()
        self._file: BinaryIO | None = None

    def send(self, batch: Batch) -> None:
        """Append, rotating first when needed; SinkError when the file cannot be written."""
        data = self._encoder.encode(batch)
        try:
            f = self._open()
            if f.tell() and f.tell() + len(data) > self.max_bytes:
                self._rotate()
                f = self._open()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            self.close()
            raise SinkError(f"file sink: cannot write {self.path}: {exc.strerror or exc}") from None

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115  # kept open across batches
        return self._file

    def _rotate(self) -> None:
        self.close()
        for i in range(self.max_files - 1, 0, -1):
            older = Path(f"{self.path}.{i}")
            if older.exists():
                os.replace(older, f"{self.path}.{i + 1}")
        if self.max_files:
            os.replace(self.path, f"{self.path}.1")
        else:
            self.path.unlink()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
