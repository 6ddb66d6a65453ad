"""The agent's periodic log-shipping job, without a cluster: what it logs of an incomplete round."""

from __future__ import annotations

import logging

import pytest

from shepard_lib.agent.periodic import ShipLogsJob
from shepard_lib.logship.shipper import ShipReport, SinkReport


class StubShipper:
    """A shipper whose round ends with ``report``."""

    def __init__(self, report: ShipReport) -> None:
        self.report = report

    def ship_once(self) -> ShipReport:
        return self.report


def run_round(report: ShipReport) -> None:
    job = ShipLogsJob()
    job._shipper = StubShipper(report)  # type: ignore[assignment]
    job(agent=None)  # type: ignore[arg-type]  # the agent is only used to build the first shipper


def test_an_incomplete_round_names_every_problem_sinks_source_and_streams(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = SinkReport(name="file", error="disk full")
    report = ShipReport(
        sinks=[sink], source_error="Nomad answered 500", stream_errors=["file: /a/b.stdout.0: bad offset"]
    )
    with caplog.at_level(logging.WARNING, logger="shepard_lib.agent.periodic"):
        run_round(report)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "file: disk full" in line
    assert "Nomad answered 500" in line
    assert "file: /a/b.stdout.0: bad offset" in line


def test_a_round_that_only_skipped_a_stream_names_it(caplog: pytest.LogCaptureFixture) -> None:
    report = ShipReport(sinks=[SinkReport(name="file")], stream_errors=["file: /x.stderr.1: unreadable"])
    with caplog.at_level(logging.WARNING, logger="shepard_lib.agent.periodic"):
        run_round(report)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "(file: /x.stderr.1: unreadable)" in line
    assert "None" not in line


def test_a_complete_round_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shepard_lib.agent.periodic"):
        run_round(ShipReport(sinks=[SinkReport(name="file")]))
    assert caplog.records == []
