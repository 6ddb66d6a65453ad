"""Reading Nomad task log files the way logmon writes them.

logmon appends to ``<task>.<stream>.<N>`` with the highest ``N``, opens ``N+1`` when the file
reaches ``max_file_size`` (a long line may be split across the two), deletes the lowest ``N`` past
``max_files``, and never renames or truncates; a restarted logmon keeps appending to the highest
``N``. So a :class:`Position` (file index, byte offset), guarded by the file's inode, is exact.
The same directory holds logmon's FIFOs (``.<task>.stdout.fifo``): only regular files are ever
opened, because opening a FIFO for reading blocks until a writer comes.

:class:`StreamReader` yields complete lines only: a file that is not the newest of its stream is
finished (logmon flushed and closed it before creating the next), so a line it ends without a
newline continues in the next file; the newest file's unterminated last line waits for the next
round (logmon flushes its 64 KiB buffer every 100 ms, so a partial line is normal). A line longer
than ``max_line`` bytes is cut into pieces of at most ``max_line`` bytes (never inside a UTF-8
character), each marked ``cut``; every piece keeps the file and offset of its first byte, also when
it starts in the tail of an earlier file. When files are lost between two (logmon deleted them
before they were read), a tail is never joined to a file that does not continue it: it ships as a
cut line of its own.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

__all__ = ["Line", "LogFile", "Position", "Stream", "StreamReader", "end_position", "list_streams"]

log = logging.getLogger(__name__)

_LOG_FILE = re.compile(r"^(?P<task>.+)\.(?P<stream>stdout|stderr)\.(?P<index>\d+)$")
READ_SIZE = 256 * 1024
"""Bytes read from a log file at a time."""


@dataclass(frozen=True)
class LogFile:
    """One rotation file of a stream, as listed at the start of a round."""

    index: int
    path: str
    inode: int
    size: int


@dataclass(frozen=True)
class Position:
    """Where the first unshipped byte of a stream is: file ``index`` at ``offset``, of that ``inode``."""

    index: int
    offset: int
    inode: int


class Stream:
    """A task's stdout or stderr in one allocation: its files, oldest first (never empty), and the
    tags of its records (set by the shipper, static tags included)."""

    __slots__ = ("alloc_id", "files", "name", "prefix", "tags", "task")

    def __init__(self, alloc_id: str, logs_dir: Path, task: str, name: str, files: list[LogFile]) -> None:
        self.alloc_id = alloc_id
        self.task = task
        self.name = name
        self.files = files
        self.prefix = f"{logs_dir}/{task}.{name}."
        self.tags: dict[str, str] = {}

    def path(self, index: int) -> str:
        """The path of the file with rotation ``index``."""
        return f"{self.prefix}{index}"

    @property
    def key(self) -> tuple[str, str, str]:
        """``(alloc id, task, stream)``: the stream's identity in checkpoints."""
        return (self.alloc_id, self.task, self.name)

    def file(self, index: int) -> LogFile | None:
        """The listed file with rotation ``index``, or None."""
        return next((f for f in self.files if f.index == index), None)

    def lag(self, position: Position) -> int:
        """Bytes listed past ``position`` (what is left to ship)."""
        return sum(
            f.size - (position.offset if f.index == position.index else 0)
            for f in self.files
            if f.index >= position.index
        )


def list_streams(alloc_id: str, logs_dir: Path) -> list[Stream]:
    """The streams in ``logs_dir``, from its regular files only (FIFOs and the rest are skipped).

    An empty list when the directory does not exist (yet, or any more).
    """
    found: dict[tuple[str, str], list[LogFile]] = {}
    try:
        entries = list(os.scandir(logs_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _LOG_FILE.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue  # a FIFO, a directory, a symlink: never opened
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted by logmon since the listing
        key = (match["task"], match["stream"])
        found.setdefault(key, []).append(
            LogFile(int(match["index"]), entry.path, stat.st_ino, stat.st_size)
        )
    return [
        Stream(alloc_id, logs_dir, task, name, sorted(files, key=lambda f: f.index))
        for (task, name), files in sorted(found.items())
    ]


def end_position(stream: Stream, max_line: int) -> Position:
    """Just after the last complete line of the newest file (``start_at: end``)."""
    last = stream.files[-1]
    start = max(0, last.size - max_line)
    try:
        with open(last.path, "rb") as f:
            f.seek(start)
            tail = f.read(last.size - start)
    except FileNotFoundError:
        return Position(last.index, last.size, last.inode)
    newline = tail.rfind(b"\n")
    offset = start + newline + 1 if newline >= 0 else last.size
    return Position(last.index, offset, last.inode)


class Line(NamedTuple):
    """One record of a stream: ``data`` without its newline, read in rotation file ``file`` at ``offset``."""

    stream: Stream
    file: int
    offset: int
    data: bytes
    cut: bool


_new = tuple.__new__  # builds a Line without the Python-level __new__ of NamedTuple (hot path)


class StreamReader:
    """Complete lines of ``stream`` from ``position`` (a listed file) on, as far as the listed files go.

    :attr:`position` is always the first byte not yet taken. Holds at most one read of
    :data:`READ_SIZE` plus one partial line of at most ``max_line`` bytes. :attr:`lost_files` counts
    the files it had to skip: deleted by logmon since the listing, or missing between two listed ones.
    """

    def __init__(self, stream: Stream, position: Position, max_line: int) -> None:
        file = stream.file(position.index)
        if file is None:
            raise ValueError(f"{stream.prefix}{position.index} is not a listed file")
        self.stream = stream
        self.position = position
        self.max_line = max_line
        self.lost_files = 0
        self._file = file
        self._handle = _open(file.path)
        if self._handle is not None:
            try:
                self._handle.seek(position.offset)
            except OSError:
                self.close()
                raise
        # The untaken bytes: _buf[0] is at self.position; _buf[_carry:] is the current file from
        # offset _base; _buf[:_carry] is the unterminated tail of finished earlier file(s), which
        # holds no newline, so no line starts inside it but at 0, or where a cut piece ended.
        # _carried says where each carried part came from: (its start in _buf, its position).
        self._buf = b""
        self._carry = 0
        self._carried: list[tuple[int, Position]] = []
        self._base = position.offset
        self._eof = self._handle is None
        self._flush = False  # the carried tail is a record of its own: what followed it is lost

    def close(self) -> None:
        """Close the open file (the reader must not be used afterwards)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def take(self, max_lines: int, max_bytes: int, out: list[Line]) -> tuple[int, int]:
        """Append complete lines to ``out``: up to ``max_lines``, stopping once ``max_bytes`` are taken.

        Returns (lines, bytes) taken; (0, 0) means nothing more until logmon writes again.
        """
        lines = size = 0
        max_line, stream = self.max_line, self.stream
        while lines < max_lines and size < max_bytes and self._fill():
            buf, carry, base, current = self._buf, self._carry, self._base, self._file.index
            start = 0
            if not carry:  # fast path: split the complete lines at once (offsets are base + i)
                last = buf.rfind(b"\n")
                for piece in buf[:last].split(b"\n") if last > 0 else ():
                    length = len(piece)
                    if length > max_line or lines >= max_lines or size >= max_bytes:
                        break
                    out.append(_new(Line, (stream, current, base + start, piece, False)))
                    lines += 1
                    size += length
                    start += length + 1
            # one line at a time: a line carried over from earlier files, cut lines, the rest
            while lines < max_lines and size < max_bytes:
                if start < carry:
                    at = self._carried_at(start)
                    index, offset = at.index, at.offset
                else:
                    index, offset = current, base + start - carry
                if self._flush and start < carry:
                    end = nxt = carry
                    cut = True
                else:
                    end = buf.find(b"\n", start, start + max_line + 1)
                    if end >= 0:
                        nxt, cut = end + 1, False
                    elif len(buf) - start > max_line:
                        end = nxt = _utf8_cut(buf, start + max_line)
                        cut = True
                    else:
                        break
                out.append(_new(Line, (stream, index, offset, buf[start:end], cut)))
                lines += 1
                size += end - start
                start = nxt
            self._drop(start)
        return lines, size

    def _carried_at(self, at: int) -> Position:
        """The position of ``_buf[at]``, inside the carried tail (``at < _carry``)."""
        begin, position = next((b, p) for b, p in reversed(self._carried) if b <= at)
        return Position(position.index, position.offset + at - begin, position.inode)

    def _drop(self, taken: int) -> None:
        """Forget the first ``taken`` bytes of the buffer (they were taken) and move :attr:`position`."""
        if taken < self._carry:  # a cut piece ended inside the carried tail
            self.position = self._carried_at(taken)
            self._carried = [(0, self.position)] + [(b - taken, p) for b, p in self._carried if b > taken]
            self._carry -= taken
        else:
            self._base += taken - self._carry
            self._carry = 0
            self._carried = []
            self._flush = False
            self.position = Position(self._file.index, self._base, self._file.inode)
        self._buf = self._buf[taken:]

    def _ready(self) -> bool:
        return self._flush or b"\n" in self._buf or len(self._buf) > self.max_line

    def _fill(self) -> bool:
        """Read until the buffer starts with a line to take; False when the listed files hold none."""
        while not self._ready():
            if not self._eof:
                assert self._handle is not None
                chunk = self._handle.read(READ_SIZE)
                if chunk:
                    self._buf += chunk
                    continue
                self._eof = True
            nxt = self._next_file()
            if nxt is None:
                return False
            self._advance(nxt)
        return True

    def _next_file(self) -> LogFile | None:
        """The listed file after the current one (whose existence means the current one is finished)."""
        return next((f for f in self.stream.files if f.index > self._file.index), None)

    def _advance(self, nxt: LogFile) -> None:
        """Go on with ``nxt``, carrying the finished file's unterminated tail over, unless files
        between them are lost (deleted before they were read): then that tail is a cut line."""
        lost = nxt.index - self._file.index - 1 + int(self._handle is None)
        if nxt.index != self._file.index + 1:
            log.warning(
                "log files %s%d to %d are missing: their lines are lost",
                self.stream.prefix, self._file.index + 1, nxt.index - 1,
            )
        self.lost_files += lost
        self.close()
        if len(self._buf) > self._carry:
            self._carried.append((self._carry, Position(self._file.index, self._base, self._file.inode)))
            self._carry = len(self._buf)
        if not self._buf:
            self.position = Position(nxt.index, 0, nxt.inode)
        elif lost:
            self._flush = True
        self._file = nxt
        self._base = 0
        self._eof = True  # until it is open: an error opening it leaves nothing to read
        self._handle = _open(nxt.path)
        self._eof = self._handle is None


def _utf8_cut(buf: bytes, limit: int) -> int:
    """Where to cut ``buf`` at or before ``limit`` so that no UTF-8 character is split (at most 3
    bytes earlier); ``limit`` itself when the bytes there are not UTF-8."""
    for cut in range(limit, limit - 4, -1):
        if buf[cut] & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            return cut
    return limit


def _open(path: str) -> BinaryIO | None:
    """``path`` opened for reading, or None (with a warning) when logmon deleted it meanwhile."""
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        log.warning("log file %s was deleted before it could be read: its lines are lost", path)
        return None
