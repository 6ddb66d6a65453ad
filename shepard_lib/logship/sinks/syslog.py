"""The ``syslog`` sink: RFC 5424 messages over UDP, or TCP with octet-counting framing (RFC 6587).

Each line becomes one message::

    <14>1 2026-11-30T04:30:00.123456Z web-03 shepard - stdout [nomad@32473 nomad.allocation.id="..." ...] line

PRI is facility ``user`` with severity ``info`` for stdout and ``err`` for stderr; HOSTNAME is the
node; MSGID the stream; the tags (file and offset included) are the structured data element
``nomad@32473`` (32473 is the private enterprise number RFC 5612 reserves for examples); MSG is
the line's bytes as they are. Over TCP a message is ``<length> <message>``. UDP has no
acknowledgement, and a TCP connection that breaks may lose what the kernel had accepted: the
syslog transports are at-most-once past the socket (rsyslog's RELP would close that gap).
A UDP message is one datagram, at most :data:`UDP_MAX_MESSAGE` bytes: the configuration keeps
``max_line_bytes`` well below it, and a message that is still longer (huge tags) is not sent but
rejected (counted), so that it never holds the sink up.
"""

from __future__ import annotations

import socket

from shepard_lib.config import SyslogProtocol
from shepard_lib.logship.records import Batch, SinkError, SinkRejected, rfc3339
from shepard_lib.logship.tags import CUT, FILE_PATH, NODE, OFFSET, STREAM
from shepard_lib.logship.tailer import Stream

__all__ = ["SD_ID", "UDP_MAX_MESSAGE", "SyslogSink", "format_message"]

SD_ID = "nomad@32473"
_USER = 1
_SEVERITY = {"stdout": 6, "stderr": 3}
_TIMEOUT = 10.0
UDP_MAX_MESSAGE = 65507
"""The largest UDP payload over IPv4 (65535 minus the IP and UDP headers); IPv6 allows 20 more."""


def _escape(value: str) -> str:
    """An SD-PARAM value: ``\\``, ``"`` and ``]`` escaped with a backslash (RFC 5424 6.3.3)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A HOSTNAME/APP-NAME field: printable US-ASCII without spaces, at most ``limit`` chars, else ``-``."""
    if value and len(value) <= limit and all(33 <= ord(c) <= 126 for c in value):
        return value
    return "-"


class _Head:
    """The part of a message that is the same for every line of a stream."""

    def __init__(self, stream: Stream, app_name: str) -> None:
        tags = stream.tags
        pri = _USER * 8 + _SEVERITY[stream.name]
        host = _header_field(tags.get(NODE, ""), 255)
        self.start = f"<{pri}>1 "
        self.middle = f" {host} {_header_field(app_name, 48)} - {_header_field(tags[STREAM], 32)} [{SD_ID}"
        self.params = "".join(f' {name}="{_escape(value)}"' for name, value in tags.items())
        self.path = f' {FILE_PATH}="{_escape(stream.prefix)}'


def format_message(head: _Head, stamp: str, index: int, offset: int, data: bytes, cut: bool) -> bytes:
    """One RFC 5424 message."""
    cut_param = f' {CUT}="true"' if cut else ""
    params = f'{head.params}{head.path}{index}" {OFFSET}="{offset}"{cut_param}'
    text = f"{head.start}{stamp}{head.middle}{params}] "
    return text.encode("utf-8") + data


class SyslogSink:
    """Sends each line of a batch to ``address`` (``host:port``) over ``protocol``."""

    name = "syslog"

    def __init__(self, address: str, protocol: SyslogProtocol, app_name: str) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.protocol = protocol
        self.app_name = app_name
        self._sock: socket.socket | None = None
        self._heads: dict[Stream, _Head] = {}

    def _head(self, stream: Stream) -> _Head:
        head = self._heads.get(stream)
        if head is None:
            if len(self._heads) > 4096:
                self._heads.clear()
            head = self._heads[stream] = _Head(stream, self.app_name)
        return head

    def messages(self, batch: Batch) -> list[bytes]:
        """The batch's lines as RFC 5424 messages."""
        stamp = rfc3339(batch.time)
        return [
            format_message(self._head(line.stream), stamp, line.file, line.offset, line.data, line.cut)
            for line in batch.lines
        ]

    def send(self, batch: Batch) -> None:
        """Send every line; SinkError (the connection is dropped) when the socket fails."""
        messages = self.messages(batch)
        refused = []
        try:
            sock = self._connect()
            if self.protocol is SyslogProtocol.TCP:
                sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
            else:
                for line, message in zip(batch.lines, messages, strict=True):
                    if len(message) > UDP_MAX_MESSAGE:
                        refused.append(line)
                    else:
                        sock.send(message)
        except OSError as exc:
            self.close()
            raise SinkError(
                f"syslog sink: cannot send to {self.host}:{self.port} over {self.protocol}: {exc}"
            ) from None
        if refused:
            raise SinkRejected(
                f"syslog sink: {len(refused)} messages longer than a UDP datagram ({UDP_MAX_MESSAGE} bytes)"
                " were not sent; lower log_shipping.max_line_bytes or use syslog_protocol: tcp",
                refused,
            )

    def _connect(self) -> socket.socket:
        if self._sock is None:
            kind = socket.SOCK_STREAM if self.protocol is SyslogProtocol.TCP else socket.SOCK_DGRAM
            family, _, _, _, addr = socket.getaddrinfo(self.host, self.port, type=kind)[0]
            sock = socket.socket(family, kind)
            sock.settimeout(_TIMEOUT)
            try:
                sock.connect(addr)  # UDP too: a refused port then fails the next send
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
