"""Where shipped lines go: :class:`Sink` and the sinks built from ``log_shipping``.

A sink's :meth:`Sink.send` returns only once the batch is delivered as far as the transport can
tell (written and fsynced, accepted by TCP, answered 2xx), raises :class:`SinkError` when it
should be retried later, and :class:`SinkRejected` when the receiver refused it for good.
"""

from __future__ import annotations

from typing import Protocol

from shepard_lib.config import LogShippingConfig, LogSink
from shepard_lib.logship.records import Batch, SinkError, SinkRejected

__all__ = ["Sink", "SinkError", "SinkRejected", "build_sinks"]


class Sink(Protocol):
    """One destination of shipped lines."""

    name: str
    """The sink's name in checkpoints and metrics (``file``, ``syslog``, ``http``)."""

    def send(self, batch: Batch) -> None:
        """Deliver ``batch``; SinkError to retry later, SinkRejected when refused for good."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


def build_sinks(cfg: LogShippingConfig) -> list[Sink]:
    """The configured sinks, in the order of ``log_shipping.sink``."""
    from shepard_lib.logship.sinks.file import FileSink
    from shepard_lib.logship.sinks.http import HttpSink
    from shepard_lib.logship.sinks.syslog import SyslogSink

    sinks: list[Sink] = []
    for kind in cfg.sink:
        if kind is LogSink.FILE:
            sinks.append(FileSink(cfg.path, cfg.file_max_bytes, cfg.file_max_files))
        elif kind is LogSink.SYSLOG:
            sinks.append(SyslogSink(cfg.syslog_address, cfg.syslog_protocol, cfg.syslog_app_name))
        else:
            assert cfg.http_url is not None  # the config requires it with the http sink
            sinks.append(HttpSink(cfg.http_url, cfg.http_format))
    return sinks
