"""Task log files as Nomad's logmon writes them: ``alloc/logs/<task>.<stream>.<n>``.

Like Nomad's file rotator, a file is filled up to ``max_file_size`` bytes (a write may be split
across two files, mid-line), the next index is opened, and only the ``max_files`` newest files of
a stream are kept. As on a real client, the directory also holds the FIFOs the task writes into
and logmon reads from, ``.<task>.stdout.fifo`` and ``.<task>.stderr.fifo`` (Nomad's
``logmon_hook.go``); the simulator never opens them, and neither may anything that reads the logs.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

__all__ = ["TaskLogs"]


class TaskLogs:
    """The stdout and stderr files of one task of one allocation."""

    def __init__(self, logs_dir: Path, task: str, max_file_size: int, max_files: int) -> None:
        self.logs_dir = logs_dir
        self.task = task
        self.max_file_size = max_file_size
        self.max_files = max_files
        self._index = {stream: self._last_index(stream) for stream in ("stdout", "stderr")}
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for stream in ("stdout", "stderr"):
            with contextlib.suppress(FileExistsError):
                os.mkfifo(self.fifo(stream))

    def fifo(self, stream: str) -> Path:
        """The FIFO of ``stream``: ``.<task>.<stream>.fifo``, as logmon names it."""
        return self.logs_dir / f".{self.task}.{stream}.fifo"

    def path(self, stream: str, index: int) -> Path:
        """The file of ``stream`` (``stdout``/``stderr``) with rotation ``index``."""
        return self.logs_dir / f"{self.task}.{stream}.{index}"

    def _last_index(self, stream: str) -> int:
        pattern = re.compile(rf"^{re.escape(self.task)}\.{stream}\.(\d+)$")
        found = [
            int(m.group(1))
            for p in self.logs_dir.glob(f"{self.task}.{stream}.*")
            if (m := pattern.match(p.name))
        ]
        return max(found, default=0)

    def write(self, stream: str, text: str) -> None:
        """Append ``text`` to ``stream``, rotating and purging as needed."""
        data = text.encode("utf-8")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        while data:
            path = self.path(stream, self._index[stream])
            size = path.stat().st_size if path.exists() else 0
            room = self.max_file_size - size
            if room <= 0:
                self._index[stream] += 1
                self._purge(stream)
                continue
            with path.open("ab") as f:
                f.write(data[:room])
            data = data[room:]

    def _purge(self, stream: str) -> None:
        oldest_kept = self._index[stream] - self.max_files + 1
        for p in self.logs_dir.glob(f"{self.task}.{stream}.*"):
            suffix = p.name.rsplit(".", 1)[-1]
            if suffix.isdigit() and int(suffix) < oldest_kept:
                p.unlink(missing_ok=True)
