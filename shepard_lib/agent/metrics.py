"""The agent's Prometheus metrics (one registry per agent) and its HTTP endpoint.

:class:`AgentMetrics` owns a :class:`prometheus_client.CollectorRegistry` of its own, so several
agents can run in one process (the demo runs one per simulated node). :class:`MetricsServer`
serves ``/metrics`` (the Prometheus text format), ``/health`` (liveness: the agent's threads are
running) and ``/ready`` (the Consul session is held and Nomad answers), each ``200`` or ``503``.
:func:`counted` wraps a backend so that every failed call is counted by name. Garbage collection
passes (``shepard_gc_*``) and the log shipper's per-sink counters (``shepard_logship_*``) are
exposed in the same registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from shepard_lib.errors import Cancelled, ShepardError
from shepard_lib.gc import GCReport
from shepard_lib.logship.metrics import ShipperMetrics

__all__ = ["AgentMetrics", "MetricsServer", "counted"]

T = TypeVar("T")

_TASK = ("job", "group", "task")
_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class AgentMetrics:
    """Every metric of one agent, in its own registry. Durations are cluster seconds."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.restarts_started = Counter(
            "shepard_restarts_started", "Restarts this agent triggered (or took over).", _TASK, registry=r
        )
        self.restarts_succeeded = Counter(
            "shepard_restarts_succeeded", "Restarts this agent saw through to healthy.", _TASK, registry=r
        )
        self.restarts_failed = Counter(
            "shepard_restarts_failed",
            "Restarts this agent saw fail (or not be healthy in time).",
            _TASK,
            registry=r,
        )
        self.slot_wait = Histogram(
            "shepard_slot_wait_seconds",
            "Time from asking for a restart slot to restarting.",
            registry=r,
            buckets=_BUCKETS,
        )
        self.restart_to_healthy = Histogram(
            "shepard_restart_to_healthy_seconds",
            "Time from a restart to its task counting as healthy.",
            registry=r,
            buckets=_BUCKETS,
        )
        self.watched_allocations = Gauge(
            "shepard_watched_allocations", "Allocations of this node with a managed task.", registry=r
        )
        self.watched_tasks = Gauge("shepard_watched_tasks", "Managed tasks watched for changes.", registry=r)
        self.change_events = Counter(
            "shepard_change_events",
            "Content changes seen (one per task per settled burst).",
            _TASK,
            registry=r,
        )
        self.request_errors = Counter(
            "shepard_request_errors",
            "Failed Consul and Nomad calls, after retries.",
            ("backend", "call"),
            registry=r,
        )
        self.session_renew_failures = Counter(
            "shepard_session_renew_failures",
            "Session renewals that failed or found the session gone.",
            registry=r,
        )
        self.sessions_lost = Counter("shepard_sessions_lost", "Consul sessions this agent lost.", registry=r)
        self.inotify_fallback = Gauge(
            "shepard_inotify_fallback_tasks",
            "Tasks on periodic scans because inotify watches ran out.",
            registry=r,
        )
        self.periodic_failures = Counter(
            "shepard_periodic_job_failures", "Runs of a periodic job that raised.", ("name",), registry=r
        )
        self.gc_deleted = Counter(
            "shepard_gc_deleted", "Shepard keys garbage collection deleted, by rule.", ("rule",), registry=r
        )
        self.gc_skipped = Counter(
            "shepard_gc_skipped",
            "Stale-looking keys garbage collection spared, by reason.",
            ("reason",),
            registry=r,
        )

    def count_gc(self, report: GCReport) -> None:
        """Add one garbage collection pass to ``shepard_gc_deleted_total`` / ``shepard_gc_skipped_total``."""
        for rule, count in report.deleted_by_rule().items():
            self.gc_deleted.labels(rule).inc(count)
        for reason, count in report.skipped_by_reason().items():
            self.gc_skipped.labels(reason).inc(count)

    def add_log_shipping(self, metrics: ShipperMetrics) -> None:
        """Expose a log shipper's per-sink counters (``shepard_logship_*``) in this registry."""
        self.registry.register(_LogShippingCollector(metrics))

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _LogShippingCollector(Collector):
    """The samples of a :class:`ShipperMetrics` as Prometheus metric families, one per name."""

    def __init__(self, metrics: ShipperMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for sample in self._metrics.samples():
            if sample.name not in families:
                kind = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                families[sample.name] = kind(
                    sample.name.removesuffix("_total"), sample.help, labels=list(sample.labels)
                )
            families[sample.name].add_metric(list(sample.labels.values()), sample.value)
        yield from families.values()


class _Counted:
    """Forwards every call to ``inner``; a ShepardError (and a False session renew) is counted."""

    def __init__(self, inner: Any, backend: str, metrics: AgentMetrics) -> None:
        self._inner = inner
        self._backend = backend
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = attr(*args, **kwargs)
            except Cancelled:
                raise  # the agent stops: not a failed call
            except ShepardError:
                self._metrics.request_errors.labels(self._backend, name).inc()
                if name == "session_renew":
                    self._metrics.session_renew_failures.inc()
                raise
            if name == "session_renew" and result is False:
                self._metrics.session_renew_failures.inc()
            return result

        return call


def counted(api: T, backend: str, metrics: AgentMetrics) -> T:
    """``api`` (a ConsulAPI or NomadAPI) with its failed calls counted in ``metrics``."""
    return cast(T, _Counted(api, backend, metrics))


class MetricsServer:
    """``/metrics``, ``/health`` and ``/ready`` on ``host:port`` (port 0: any free port)."""

    def __init__(
        self, address: str, metrics: AgentMetrics, healthy: Callable[[], bool], ready: Callable[[], bool]
    ) -> None:
        host, _, port = address.rpartition(":")
        handler = _handler(metrics, healthy, ready)
        self._httpd = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="shepard-metrics", daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` actually bound."""
        host, port = self._httpd.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(
    metrics: AgentMetrics, healthy: Callable[[], bool], ready: Callable[[], bool]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path in ("/health", "/ready"):
                ok = healthy() if path == "/health" else ready()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not ok\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics, /health or /ready\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
