"""Counters and gauges of log shipping, for the agent to expose (e.g. with prometheus_client).

:meth:`ShipperMetrics.samples` returns plain :class:`MetricSample` values, so this module needs
no metrics library; a Prometheus collector turns each into a ``CounterMetricFamily`` or
``GaugeMetricFamily`` (counter names already end in ``_total``). Thread-safe: the agent's
metrics endpoint reads while a shipping round writes. A collector for a registry::

    class LogShippingCollector:
        def __init__(self, metrics: ShipperMetrics) -> None:
            self.metrics = metrics

        def collect(self):
            families = {}  # one family per name, a sample per sink
            for s in self.metrics.samples():
                if s.name not in families:
                    kind = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                    families[s.name] = kind(s.name.removesuffix("_total"), s.help, labels=list(s.labels))
                families[s.name].add_metric(list(s.labels.values()), s.value)
            yield from families.values()
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["COUNTERS", "GAUGES", "MetricSample", "ShipperMetrics"]

PREFIX = "shepard_logship_"

COUNTERS = {
    "lines_shipped": "Lines a sink acknowledged.",
    "bytes_shipped": "Line bytes (without newlines) a sink acknowledged.",
    "errors": "Failed attempts to send a batch to a sink (each retry counts).",
    "rejected_lines": "Lines a sink refused for good (HTTP 400/422); they are not retried.",
    "dropped_lines": "Lines skipped because a stream's backlog exceeded log_shipping.buffer_limit.",
    "fell_behind": (
        "Log files lost before a sink had shipped them to their end: deleted or replaced by Nomad's"
        " log rotation, or gone with their allocation's directory."
    ),
    "stream_errors": (
        "Times a stream was skipped for a round because it could not be read (or its checkpoint was"
        " invalid and reset to its file's start)."
    ),
}
"""Counter names (without prefix and ``_total``) and their help, each labelled by ``sink``."""

GAUGES = {
    "lag_bytes": "Bytes of task logs a sink has not shipped yet (as listed at the last round).",
}
"""Gauge names and their help, each labelled by ``sink``."""


@dataclass(frozen=True)
class MetricSample:
    """One value: ``name`` is the full metric name, ``kind`` is ``counter`` or ``gauge``."""

    name: str
    kind: str
    help: str
    labels: dict[str, str]
    value: float


class ShipperMetrics:
    """The counters and gauges of one :class:`~shepard_lib.logship.shipper.LogShipper`, per sink."""

    def __init__(self, sinks: list[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], float] = {
            (name, sink): 0.0 for sink in sinks for name in (*COUNTERS, *GAUGES)
        }

    def add(self, name: str, sink: str, amount: float = 1) -> None:
        """Increase counter ``name`` of ``sink``."""
        assert name in COUNTERS, name
        with self._lock:
            self._values[(name, sink)] = self._values.get((name, sink), 0.0) + amount

    def set(self, name: str, sink: str, value: float) -> None:
        """Set gauge ``name`` of ``sink``."""
        assert name in GAUGES, name
        with self._lock:
            self._values[(name, sink)] = value

    def value(self, name: str, sink: str) -> float:
        """The current value of ``name`` for ``sink`` (0 when never set)."""
        with self._lock:
            return self._values.get((name, sink), 0.0)

    def samples(self) -> list[MetricSample]:
        """Every value, named as Prometheus would (``shepard_logship_lines_shipped_total{sink="file"}``)."""
        with self._lock:
            values = dict(self._values)
        out = []
        for (name, sink), value in sorted(values.items()):
            labels = {"sink": sink}
            if name in COUNTERS:
                out.append(MetricSample(f"{PREFIX}{name}_total", "counter", COUNTERS[name], labels, value))
            else:
                out.append(MetricSample(f"{PREFIX}{name}", "gauge", GAUGES[name], labels, value))
        return out
