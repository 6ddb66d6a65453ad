"""Batches of lines and the record encodings the sinks share (JSON lines, RFC 3339 time)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from shepard_lib.errors import ShepardError
from shepard_lib.logship.tags import CUT, FILE_PATH, OFFSET
from shepard_lib.logship.tailer import Line, Stream

__all__ = ["Batch", "JsonEncoder", "SinkError", "SinkRejected", "rfc3339"]

_encode_string = json.encoder.encode_basestring  # the C encoder when present


_CUT = f', "{CUT}": true}}'


class SinkError(ShepardError):
    """A sink could not take a batch now (down, timeout, 5xx): retried, then reading pauses."""


class SinkRejected(ShepardError):
    """A sink refused a batch for good (HTTP 400/422), or only the lines ``refused`` of it (it
    delivered the others): they are counted as rejected and skipped."""

    def __init__(self, message: str, refused: list[Line] | None = None) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class Batch:
    """Lines read for one sink, from one or more streams; ``time`` is when reading began;
    ``lost_files``: files found deleted while reading them (counted once the batch is shipped)."""

    time: float = field(default_factory=time.time)
    lines: list[Line] = field(default_factory=list)
    size: int = 0
    lost_files: int = 0


def rfc3339(seconds: float) -> str:
    """``2026-11-30T04:30:00.123456Z``: RFC 3339 in UTC with microseconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1e6):06d}Z"


class JsonEncoder:
    """One JSON object per line: ``@timestamp``, ``message``, the stream's tags, file and offset."""

    def __init__(self) -> None:
        self._heads: dict[Stream, str] = {}
        self._paths: dict[tuple[Stream, int], str] = {}

    def _head(self, stream: Stream) -> str:
        head = self._heads.get(stream)
        if head is None:
            head = json.dumps(stream.tags, ensure_ascii=False)[1:-1] + f', "{FILE_PATH}": '
            self._heads[stream] = head
        return head

    def _path(self, stream: Stream, index: int) -> str:
        path = self._paths.get((stream, index))
        if path is None:
            path = _encode_string(stream.path(index))
            self._paths[(stream, index)] = path
        return path

    def encode(self, batch: Batch) -> bytes:
        """The batch as JSON lines, UTF-8 (undecodable bytes of a message become U+FFFD)."""
        stamp = f'{{"@timestamp": "{rfc3339(batch.time)}", '
        prefixes: dict[tuple[Stream, int], str] = {}  # everything before the offset, per file
        parts: list[str] = []
        append, encode_string = parts.append, _encode_string
        for stream, file, offset, data, cut in batch.lines:
            prefix = prefixes.get((stream, file))
            if prefix is None:
                prefix = f'{stamp}{self._head(stream)}{self._path(stream, file)}, "{OFFSET}": '
                prefixes[(stream, file)] = prefix
            message = encode_string(data.decode("utf-8", "replace"))
            append(f'{prefix}{offset}, "message": {message}{_CUT if cut else "}"}\n')
        if len(self._heads) > 4096:  # streams of gone allocations: keep the caches small
            self._heads.clear()
            self._paths.clear()
        return "".join(parts).encode("utf-8")
