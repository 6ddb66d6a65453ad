"""Log shipping's pure parts: record encodings (JSON, RFC 5424, Loki), the file sink's rotation,
checkpoint files, configuration, metrics (``shepard_lib.logship``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from shepard_lib.config import HttpFormat, LogSink, SyslogProtocol, load_config
from shepard_lib.errors import ConfigError
from shepard_lib.logship.checkpoints import CheckpointError, Checkpoints
from shepard_lib.logship.metrics import ShipperMetrics
from shepard_lib.logship.records import Batch, JsonEncoder, rfc3339
from shepard_lib.logship.sinks.file import FileSink
from shepard_lib.logship.sinks.http import HttpSink, loki_label
from shepard_lib.logship.sinks.syslog import SyslogSink
from shepard_lib.logship.tags import AllocationLogs
from shepard_lib.logship.tailer import Line, LogFile, Position, Stream

LOGS = Path("/d/alloc/a-1/alloc/logs")
ALLOC = AllocationLogs("a-1", "web.app[2]", "prod", "web", "app", 2, "n1", "dc1", LOGS)
T0 = 1_764_477_000.25  # 2025-11-30T04:30:00.25Z


def stream(name: str = "stdout", **static: str) -> Stream:
    s = Stream("a-1", ALLOC.logs_dir, "server", name, [LogFile(0, "", 1, 0)])
    s.tags = ALLOC.tags("server", name) | static
    return s


def batch(*lines: Line) -> Batch:
    return Batch(time=T0, lines=list(lines), size=sum(len(line.data) for line in lines))


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert rfc3339(T0) == "2025-11-30T04:30:00.250000Z"


def test_json_records_carry_every_tag_the_file_and_offset() -> None:
    s = stream(env="prod")
    data = JsonEncoder().encode(batch(Line(s, 3, 120, b"hello \xff", False), Line(s, 3, 128, b"x" * 4, True)))
    first, second = (json.loads(line) for line in data.decode().splitlines())
    assert first == {
        "@timestamp": "2025-11-30T04:30:00.250000Z",
        "nomad.allocation.id": "a-1",
        "nomad.allocation.name": "web.app[2]",
        "nomad.job.name": "web",
        "nomad.task.name": "server",
        "nomad.namespace": "prod",
        "nomad.datacenter": "dc1",
        "nomad.group.name": "app",
        "nomad.allocation.index": "2",
        "nomad.node.name": "n1",
        "stream": "stdout",
        "env": "prod",
        "log.file.path": "/d/alloc/a-1/alloc/logs/server.stdout.3",
        "log.offset": 120,
        "message": "hello \ufffd",
    }
    assert second["log.cut"] is True and "log.cut" not in first


def test_syslog_messages_are_rfc5424_with_the_tags_as_structured_data() -> None:
    sink = SyslogSink("127.0.0.1:514", SyslogProtocol.UDP, "shepard")
    (message,) = sink.messages(batch(Line(stream("stderr", team='a"b]\\'), 0, 7, b"boom", True)))
    assert message == (
        b'<11>1 2025-11-30T04:30:00.250000Z n1 shepard - stderr [nomad@32473 nomad.allocation.id="a-1"'
        b' nomad.allocation.name="web.app[2\\]" nomad.job.name="web" nomad.task.name="server"'
        b' nomad.namespace="prod" nomad.datacenter="dc1" nomad.group.name="app" nomad.allocation.index="2"'
        b' nomad.node.name="n1" stream="stderr" team="a\\"b\\]\\\\"'
        b' log.file.path="/d/alloc/a-1/alloc/logs/server.stderr.0" log.offset="7" log.cut="true"] boom'
    )
    (info,) = sink.messages(batch(Line(stream(), 0, 0, b"ok", False)))
    assert info.startswith(b"<14>1 ") and b"log.cut" not in info
    sink.close()


def test_loki_labels_are_the_low_cardinality_tags_and_the_rest_is_structured_metadata() -> None:
    sink = HttpSink("http://loki:3100/loki/api/v1/push", HttpFormat.LOKI)
    s = stream(env="prod")
    body = sink.loki_body(batch(Line(s, 1, 0, b"one", False), Line(s, 1, 4, b"one", False)))
    sink.close()
    (entry,) = body["streams"]
    assert entry["stream"] == {
        "nomad_job_name": "web",
        "nomad_task_name": "server",
        "nomad_namespace": "prod",
        "nomad_datacenter": "dc1",
        "nomad_group_name": "app",
        "nomad_node_name": "n1",
        "stream": "stdout",
        "env": "prod",
    }
    (ts1, line1, meta1), (ts2, _, meta2) = entry["values"]
    assert int(ts2) == int(ts1) + 1 and int(ts1) == int(T0 * 1e9), "equal lines keep distinct timestamps"
    assert line1 == "one"
    assert meta1 == {
        "nomad_allocation_id": "a-1",
        "nomad_allocation_name": "web.app[2]",
        "nomad_allocation_index": "2",
        "log_file_path": "/d/alloc/a-1/alloc/logs/server.stdout.1",
        "log_offset": "0",
    }
    assert meta2["log_offset"] == "4"
    assert loki_label("9.x-y") == "_9_x_y"


def test_the_file_sink_rotates_by_size_and_keeps_max_files(tmp_path: Path) -> None:
    path = tmp_path / "out" / "tasks.jsonl"
    sink = FileSink(str(path), max_bytes=2000, max_files=2)
    s = stream()
    for n in range(40):
        sink.send(batch(Line(s, 0, n, f"line {n}".encode(), False)))
    sink.close()
    files = [path, Path(f"{path}.1"), Path(f"{path}.2")]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(p.name for p in files)
    assert all(p.stat().st_size <= 2000 for p in files)
    messages = [json.loads(line)["message"] for p in reversed(files) for line in p.read_text().splitlines()]
    assert messages == [f"line {n}" for n in range(40 - len(messages), 40)], "newest files kept, whole lines"


def test_checkpoints_survive_a_failed_save_and_a_damaged_file_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck.json"
    first = Checkpoints(path)
    assert first.allocations() == []
    first.remember(ALLOC)
    first.set("file", ("a-1", "server", "stdout"), Position(2, 10, 99))
    first.save()
    first.set("file", ("a-1", "server", "stdout"), Position(3, 0, 100))

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="No space left"):
        first.save()
    monkeypatch.undo()
    again = Checkpoints(path)
    assert again.allocations() == [ALLOC]
    assert again.position("file", ("a-1", "server", "stdout")) == Position(2, 10, 99)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.json"], "no temporary file is left behind"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"damaged .* move it away"):
        Checkpoints(path)


def test_a_saved_checkpoint_is_durable_the_rename_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is fsynced before the rename and its directory after it: a power loss right after
    ``save()`` cannot bring the previous checkpoint back (which would re-ship more than one batch)."""
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        synced.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoints = Checkpoints(tmp_path / "ck.json")
    checkpoints.remember(ALLOC)
    checkpoints.save()
    assert synced == ["file", "rename", "directory"]


def test_checkpoints_keep_each_streams_listed_end_to_tell_what_was_not_shipped(tmp_path: Path) -> None:
    key = ("a-1", "server", "stdout")
    checkpoints = Checkpoints(tmp_path / "ck.json")
    checkpoints.remember(ALLOC)
    checkpoints.set("file", key, Position(2, 10, 99))
    checkpoints.set("http", key, Position(4, 50, 101))
    checkpoints.listed(key, 4, 50)
    checkpoints.save()
    again = Checkpoints(tmp_path / "ck.json")
    assert again.unshipped("a-1", "file") == 3, "files 2, 3 and 4"
    assert again.unshipped("a-1", "http") == 0
    again.forget("a-1")
    assert again.unshipped("a-1", "file") == 0 and again.allocations() == []


def test_metrics_samples_are_named_for_prometheus() -> None:
    metrics = ShipperMetrics(["file", "syslog"])
    metrics.add("lines_shipped", "file", 5)
    metrics.set("lag_bytes", "syslog", 42)
    samples = {(s.name, s.labels["sink"]): s for s in metrics.samples()}
    assert samples[("shepard_logship_lines_shipped_total", "file")].value == 5
    assert samples[("shepard_logship_lines_shipped_total", "file")].kind == "counter"
    assert samples[("shepard_logship_lag_bytes", "syslog")].kind == "gauge"
    assert samples[("shepard_logship_lag_bytes", "syslog")].value == 42
    assert len(samples) == 2 * 8


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(str(path), env={}).log_shipping


def test_several_sinks_at_once_and_static_tags(tmp_path: Path) -> None:
    shipping = _load(
        tmp_path,
        "log_shipping: {enabled: true, sink: [syslog, http], http_url: 'http://l:3100/p',"
        " tags: {env: prod}}\n",
    )
    assert shipping.sink == (LogSink.SYSLOG, LogSink.HTTP)  # type: ignore[attr-defined]
    assert shipping.tags == {"env": "prod"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("log_shipping: {sink: [file, file]}", "log_shipping.sink: each sink may be listed once"),
        ("log_shipping: {sink: []}", "log_shipping.sink: expected a sink or a list of sinks"),
        ("log_shipping: {sink: [file, kafka]}", "log_shipping.sink: expected one of file, syslog, http"),
        ("log_shipping: {tags: {nomad.job.name: x}}", "log_shipping.tags: tag name 'nomad.job.name'"),
        ("log_shipping: {tags: {'has space': x}}", "log_shipping.tags: tag name 'has space': expected"),
        ("log_shipping: {tags: {env: 3}}", "log_shipping.tags: tag env: expected a string, got '3'"),
        ("log_shipping: {start_at: middle}", "log_shipping.start_at: expected one of beginning, end"),
        ("log_shipping: {max_line_bytes: 10}", "log_shipping.max_line_bytes: expected an integer >= 256"),
        ("log_shipping: {buffer_limit: -1}", "log_shipping.buffer_limit: expected an integer >= 0"),
        (
            "log_shipping: {sink: syslog, max_line_bytes: 65536}",
            "log_shipping.max_line_bytes: at most 57344 with the syslog sink over udp",
        ),
        (
            "log_shipping: {sink: [file, syslog], syslog_protocol: udp, max_line_bytes: 100000}",
            "log_shipping.max_line_bytes: at most 57344 with the syslog sink over udp",
        ),
        (
            "log_shipping: {sink: [file, http]}",
            "log_shipping.http_url: required when log_shipping.sink includes http",
        ),
    ],
)
def test_bad_log_shipping_settings_are_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text + "\n")
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_long_lines_are_fine_with_syslog_over_tcp_or_without_syslog(tmp_path: Path) -> None:
    tcp = _load(tmp_path, "log_shipping: {sink: syslog, syslog_protocol: tcp, max_line_bytes: 1048576}\n")
    assert tcp.max_line_bytes == 1048576  # type: ignore[attr-defined]
    udp = _load(tmp_path, "log_shipping: {sink: syslog, max_line_bytes: 57344}\n")
    assert udp.max_line_bytes == 57344  # type: ignore[attr-defined]
    no_syslog = _load(tmp_path, "log_shipping: {sink: file, max_line_bytes: 1048576}\n")
    assert no_syslog.max_line_bytes == 1048576  # type: ignore[attr-defined]
