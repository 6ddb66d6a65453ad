"""On-disk allocation directories laid out like a Nomad client's ``<data_dir>/alloc/<alloc_id>/``.

::

    alloc/<alloc_id>/alloc/{logs,data,tmp}          shared by the group's tasks
    alloc/<alloc_id>/<task>/{local,secrets,tmp}     per task
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["AllocDir", "write_if_changed"]


class AllocDir:
    """One allocation's directory tree under a node's data dir."""

    def __init__(self, node_data_dir: Path, alloc_id: str) -> None:
        self.root = node_data_dir / "alloc" / alloc_id

    @property
    def shared_dir(self) -> Path:
        """``alloc/<id>/alloc``: the group's shared dir (``NOMAD_ALLOC_DIR`` on the host)."""
        return self.root / "alloc"

    @property
    def logs_dir(self) -> Path:
        """``alloc/<id>/alloc/logs``: task log files."""
        return self.shared_dir / "logs"

    def task_dir(self, task: str) -> Path:
        """``alloc/<id>/<task>``: the task's dir (its ``local/`` is ``NOMAD_TASK_DIR``)."""
        return self.root / task

    def build(self, tasks: Iterable[str]) -> None:
        """Create the shared and per-task directories (idempotent)."""
        for sub in ("logs", "data", "tmp"):
            (self.shared_dir / sub).mkdir(parents=True, exist_ok=True)
        for task in tasks:
            for sub in ("local", "secrets", "tmp"):
                (self.task_dir(task) / sub).mkdir(parents=True, exist_ok=True)
            (self.task_dir(task) / "secrets").chmod(0o700)

    def resolve(self, task: str, destination: str) -> Path:
        """A template destination (``local/x.conf``, ``secrets/y``, ``../alloc/z``) as a host path.

        Raises ValueError for a destination that escapes the allocation dir, as Nomad does.
        """
        path = (self.task_dir(task) / destination).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"template destination {destination!r} escapes the allocation directory")
        return path


def write_if_changed(path: Path, content: bytes, mode: int = 0o644) -> bool:
    """Write ``content`` atomically (temp file + rename) unless the file already holds it.

    Returns True when the file was written. Like consul-template, an identical render leaves the
    file (and its mtime) untouched.
    """
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
