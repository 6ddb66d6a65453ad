"""Log shipping end to end over real files: Nomad's rotation, FIFOs, partial lines, restarts,
a sink that goes down, allocations coming and going (``shepard_lib.logship``)."""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
import threading
import time
import tracemalloc
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logship_support import MemorySink, Node, allocation, config
from support import Background

from shepard_lib.config import HttpFormat, LogSink, StartAt, SyslogProtocol
from shepard_lib.errors import NomadError
from shepard_lib.logship import LogShipper, RetryPolicy, tailer
from shepard_lib.logship.sinks import build_sinks
from shepard_lib.logship.sinks.http import HttpSink
from shepard_lib.logship.sinks.syslog import SyslogSink
from shepard_lib.logship.tailer import list_streams
from shepard_lib.model import Allocation

with warnings.catch_warnings():  # pyinotify imports asyncore, deprecated since Python 3.10
    warnings.simplefilter("ignore", DeprecationWarning)
    import pyinotify

NO_WAIT = RetryPolicy(attempts=2, initial=0, maximum=0)


def numbered(prefix: str, count: int, start: int = 0, rng: random.Random | None = None) -> list[str]:
    """Distinct lines ``<prefix>-<n> xxx...`` of varied length."""
    rng = rng or random.Random(7)
    return [f"{prefix}-{n} " + "x" * rng.randrange(0, 90) for n in range(start, start + count)]


def text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def test_lines_are_shipped_in_order_while_nomad_rotates_the_files(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=256, max_files=1000)
    alloc = node.add(allocation(0))
    sink = MemorySink()
    shipper = LogShipper(node_cfg := config(tmp_path, node, batch_size=7), node, sinks=[sink], retry=NO_WAIT)
    written: list[str] = []
    rng = random.Random(3)
    for round_ in range(30):
        lines = numbered(f"r{round_}", rng.randrange(0, 15), rng=rng)
        node.write(alloc, text(lines))
        written += lines
        assert shipper.ship_once().ok
        assert sink.lines(alloc) == written, f"round {round_}"
    files = sorted(p.name for p in node.logs_dir(alloc).iterdir() if p.is_file())
    assert len(files) > 20, "the test should span many rotations (N+1 files)"
    split = [
        p
        for p in node.logs_dir(alloc).iterdir()
        if p.is_file() and p.read_bytes() and not p.read_bytes().endswith(b"\n")
    ]
    assert split, "logmon's scheme splits lines across files; the test should include such lines"
    saved = json.loads(Path(node_cfg.log_shipping.checkpoint_path).read_text())
    index, offset, inode = saved["allocations"][alloc.id]["positions"]["server"]["stdout"]["memory"]
    newest = max(int(name.rsplit(".", 1)[1]) for name in files if ".stdout." in name)
    path = node.logs_dir(alloc) / f"server.stdout.{newest}"
    assert (index, offset, inode) == (newest, path.stat().st_size, path.stat().st_ino)


def test_files_deleted_before_shipping_are_reported_and_the_rest_is_shipped(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=100, max_files=3)
    alloc = node.add(allocation(0))
    sink = MemorySink()
    shipper = LogShipper(config(tmp_path, node), node, sinks=[sink], retry=NO_WAIT)
    node.write(alloc, "first\n")
    shipper.ship_once()
    later = [f"line-{n:04d}" for n in range(100)]  # 1000 bytes: 10 files, logmon keeps the last 3
    node.write(alloc, text(later))
    assert shipper.ship_once().ok
    assert shipper.metrics.value("fell_behind", "memory") == 8, "files 0 to 7 were lost (counted in files)"
    logs = [p for p in node.logs_dir(alloc).iterdir() if p.is_file()]
    files = sorted(logs, key=lambda p: int(p.name.rsplit(".")[-1]))
    kept = b"".join(p.read_bytes() for p in files)
    assert sink.lines(alloc) == ["first", *kept.decode().splitlines()]
    assert sink.lines(alloc)[-1] == "line-0099"


def test_fifos_in_the_log_directory_are_never_opened(tmp_path: Path) -> None:
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    logs = node.logs_dir(alloc)
    fifos = [logs / ".server.stdout.fifo", logs / ".server.stderr.fifo"]
    assert all(fifo.is_fifo() for fifo in fifos), "logmon's FIFOs (made by the simulator's TaskLogs)"
    node.write(alloc, "hello\n")
    node.write(alloc, "oops\n", stream="stderr")
    watches = pyinotify.WatchManager()
    watches.add_watch(str(logs), pyinotify.IN_OPEN)
    opened: list[str] = []

    class Opened(pyinotify.ProcessEvent):  # type: ignore[misc]
        def process_IN_OPEN(self, event: Any) -> None:
            opened.append(event.name)

    notifier = pyinotify.Notifier(watches, Opened(), timeout=100)

    def drain() -> None:
        while notifier.check_events():
            notifier.read_events()
            notifier.process_events()

    try:
        sink = MemorySink()
        shipper = LogShipper(config(tmp_path, node), node, sinks=[sink], retry=NO_WAIT)
        run = Background(shipper.ship_once)
        run.join(timeout=60)  # opening a FIFO for reading would block here for good
        assert run.error is None
        drain()
        assert {"server.stdout.0", "server.stderr.0"} <= set(opened), opened
        assert not {f.name for f in fifos} & set(opened), f"a FIFO was opened: {opened}"
        assert sorted(r[3] for r in sink.records) == [b"hello", b"oops"]
        # The watch does see a FIFO being opened (so the check above can fail):
        fd = os.open(fifos[0], os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        drain()
        assert fifos[0].name in opened
    finally:
        notifier.stop()


def test_a_partial_last_line_ships_once_it_is_complete_and_long_lines_are_cut(tmp_path: Path) -> None:
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    sink = MemorySink()
    shipper = LogShipper(config(tmp_path, node, max_line_bytes=300), node, sinks=[sink], retry=NO_WAIT)
    node.write(alloc, "one\ntw")
    shipper.ship_once()
    assert sink.lines(alloc) == ["one"]
    node.write(alloc, "o\nthr")
    shipper.ship_once()
    node.write(alloc, "ee\n")
    shipper.ship_once()
    assert sink.lines(alloc) == ["one", "two", "three"]
    node.write(alloc, "a" * 700 + "\n" + "b" * 450)  # 450 > 300: a piece ships before the newline comes
    shipper.ship_once()
    node.write(alloc, "b" * 10 + "\n")
    shipper.ship_once()
    pieces = [(r[3], r[4]) for r in sink.records[3:]]
    assert pieces == [
        (b"a" * 300, True),
        (b"a" * 300, True),
        (b"a" * 100, False),
        (b"b" * 300, True),
        (b"b" * 160, False),
    ]


class Crash(BaseException):
    """The agent dies (not an Exception: nothing may catch it)."""


class CrashingSink(MemorySink):
    """Accepts batches, then the process dies right after the sink took batch ``crash_after``."""

    def __init__(self, crash_after: int) -> None:
        super().__init__()
        self.crash_after = crash_after

    def send(self, batch: Any) -> None:
        super().send(batch)
        if len(self.batches) == self.crash_after:
            raise Crash()


def test_a_restart_in_the_middle_loses_nothing_and_repeats_at_most_one_batch(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=2000)
    allocs = [node.add(allocation(n)) for n in range(3)]
    written = {a.id: numbered(a.id[:8], 120) for a in allocs}
    for a in allocs:
        node.write(a, text(written[a.id]))
    first = CrashingSink(crash_after=5)
    cfg = config(tmp_path, node, batch_size=50)
    crashed = LogShipper(cfg, node, sinks=[first], retry=NO_WAIT)
    with pytest.raises(Crash):
        crashed.ship_once()
    assert len(first.records) == 250
    second = MemorySink()
    LogShipper(cfg, node, sinks=[second], retry=NO_WAIT).ship_once()
    received = first.records + second.records
    for a in allocs:
        lines = [r[3].decode() for r in received if r[0] == a.id]
        assert sorted(set(lines)) == sorted(written[a.id]), "a line was lost"
    repeated = sum(MemorySink.duplicates_of(received).values())
    assert repeated == 50, "exactly the batch in flight at the crash is shipped twice"


def test_a_sink_down_pauses_reading_at_the_checkpoint_with_bounded_memory(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=1 << 20)
    allocs = [node.add(allocation(n)) for n in range(3)]
    written = {a.id: numbered(a.id[:8], 40000) for a in allocs}  # 3 x 2 MB, 50 MB as JSON
    for a in allocs:
        node.write(a, text(written[a.id]))
    out = tmp_path / "received.ndjson"
    server = _NdjsonServer(out)
    sink = HttpSink(server.url, HttpFormat.NDJSON)
    cfg = config(tmp_path, node, batch_bytes=16 * 1024, batch_size=100000)
    shipper = LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT)
    try:
        server.status = 503
        tracemalloc.start()
        report = shipper.ship_once()
        _, peak_down = tracemalloc.get_traced_memory()
        assert report.sinks[0].error is not None and "503" in report.sinks[0].error
        assert not out.exists() and shipper.metrics.value("errors", "http") == 2
        assert report.sinks[0].lag_bytes > 6_000_000
        server.status = 200
        tracemalloc.reset_peak()
        report = shipper.ship_once()
        _, peak_up = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.ok and report.sinks[0].lag_bytes == 0
    finally:
        shipper.close()
        server.close()
    messages: dict[str, list[str]] = {a.id: [] for a in allocs}
    with out.open("rb") as f:
        for line in f:
            record = json.loads(line)
            messages[record["nomad.allocation.id"]].append(record["message"])
    assert messages == written
    assert shipper.metrics.value("dropped_lines", "http") == 0
    # One batch (16 KiB of lines, 150 KB as JSON) in a few copies and one read buffer, not 6 MB of logs.
    assert peak_down < 3_000_000 and peak_up < 3_000_000, (peak_down, peak_up)


class _NdjsonServer:
    """An HTTP endpoint that answers ``status`` and appends the bodies of its 2xx answers to ``out``
    (a file: the test measures the shipper's memory, not the receiver's)."""

    def __init__(self, out: Path) -> None:
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.status == 200:
                    with out.open("ab") as f:
                        f.write(body if body.endswith(b"\n") else body + b"\n")
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/push"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def test_many_allocations_appear_and_disappear(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=500, max_files=1000)
    sink = MemorySink()
    cfg = config(tmp_path, node, batch_size=64)
    shipper = LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT)
    rng = random.Random(11)
    written: dict[str, list[str]] = {}
    gone: set[str] = set()
    serial = 0
    forgotten: list[Allocation] = []
    for round_ in range(12):
        for alloc in list(node.allocations.values()):
            lines = numbered(f"{alloc.id[:8]}-{round_}", rng.randrange(0, 12), rng=rng)
            node.write(alloc, text(lines))
            written[alloc.id] += lines
        # Nomad forgets some allocations it listed before; their last lines still ship.
        for alloc in rng.sample(list(node.allocations.values()), k=min(3, len(node.allocations))):
            node.remove(alloc, delete_files=False)
            forgotten.append(alloc)
        for _ in range(rng.randrange(3, 8)):  # new allocations, with their first lines
            alloc = node.add(allocation(serial), tasks=("server", "sidecar"))
            serial += 1
            written[alloc.id] = numbered(f"{alloc.id[:8]}-{round_}", rng.randrange(0, 12), rng=rng)
            node.write(alloc, text(written[alloc.id]))
        assert shipper.ship_once().ok
        for alloc in rng.sample(forgotten, k=len(forgotten) // 2):  # the client deletes some later
            node.delete_files(alloc)
            forgotten.remove(alloc)
            gone.add(alloc.id)
    assert shipper.ship_once().ok  # notices the directories deleted after the last round
    for alloc_id, lines in written.items():
        assert [r[3].decode() for r in sink.records if r[0] == alloc_id] == lines, alloc_id
    assert not sink.duplicates()
    kept = set(json.loads(Path(cfg.log_shipping.checkpoint_path).read_text())["allocations"])
    on_disk = {p.name for p in (node.data_dir / "alloc").iterdir()}
    assert kept == on_disk, "checkpoints are kept exactly for the allocations whose files exist"
    assert gone and not gone & kept, "the allocations whose files are gone are forgotten"


def test_start_at_end_skips_existing_lines_only_on_the_first_run(tmp_path: Path) -> None:
    node = Node(tmp_path)
    old = node.add(allocation(0))
    node.write(old, "before 1\nbefore 2\npart")
    sink = MemorySink()
    cfg = config(tmp_path, node, start_at=StartAt.END)
    shipper = LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT)
    shipper.ship_once()
    assert sink.records == []
    node.write(old, "ial\nafter\n")
    new = node.add(allocation(1))
    node.write(new, "new 1\n")
    LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT).ship_once()  # a restarted agent
    assert sink.lines(old) == ["partial", "after"]
    assert sink.lines(new) == ["new 1"], "an allocation that appears later ships from its first line"


def test_buffer_limit_drops_the_oldest_lines_and_counts_them(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=1000)
    alloc = node.add(allocation(0))
    lines = [f"line-{n:04d}" for n in range(500)]  # 10 bytes each, with the newline
    node.write(alloc, text(lines))
    sink = MemorySink()
    shipper = LogShipper(config(tmp_path, node, buffer_limit=1005), node, sinks=[sink], retry=NO_WAIT)
    shipper.ship_once()
    assert sink.lines(alloc) == lines[-100:]
    assert shipper.metrics.value("dropped_lines", "memory") == 400


def test_a_rejected_batch_is_counted_and_skipped(tmp_path: Path) -> None:
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    node.write(alloc, "refused\n")
    out = tmp_path / "received.ndjson"
    server = _NdjsonServer(out)
    server.status = 400
    shipper = LogShipper(
        config(tmp_path, node), node, sinks=[HttpSink(server.url, HttpFormat.NDJSON)], retry=NO_WAIT
    )
    try:
        assert shipper.ship_once().ok
        server.status = 200
        node.write(alloc, "taken\n")
        shipper.ship_once()
    finally:
        shipper.close()
        server.close()
    assert [json.loads(r)["message"] for r in out.read_bytes().splitlines()] == ["taken"]
    assert shipper.metrics.value("rejected_lines", "http") == 1
    assert shipper.metrics.value("errors", "http") == 0


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"")), st.booleans()), max_size=25
    ),
    max_file_size=st.integers(min_value=5, max_value=200),
    max_line=st.integers(min_value=256, max_value=300),
    batch_size=st.integers(min_value=1, max_value=9),
)
def test_whatever_logmon_writes_the_shipped_records_rebuild_it_exactly(
    chunks: list[tuple[bytes, bool]], max_file_size: int, max_line: int, batch_size: int
) -> None:
    """Records (a newline after each uncut one) rebuild the written bytes up to the last complete or cut
    line; each record's file and offset point at its first byte."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = Node(root, max_file_size=max_file_size, max_files=10_000)
        alloc = node.add(allocation(0))
        cfg = config(root, node, max_line_bytes=max_line, batch_size=batch_size)
        written = b""
        pieces: list[tuple[int, int, bytes, bool]] = []

        class Recording(MemorySink):
            def send(self, batch: Any) -> None:
                pieces.extend((line.file, line.offset, line.data, line.cut) for line in batch.lines)

        shipper = LogShipper(cfg, node, sinks=[Recording()], retry=NO_WAIT)
        for data, ship in chunks:
            node.write(alloc, data.decode("latin-1"))
            written += data.decode("latin-1").encode("utf-8")
            if ship:
                shipper.ship_once()
        shipper.ship_once()
        rebuilt = b"".join(data if cut else data + b"\n" for _, _, data, cut in pieces)
        assert written.startswith(rebuilt)
        rest = written[len(rebuilt) :]
        assert b"\n" not in rest and len(rest) <= max_line, "everything complete was shipped"
        logs = node.logs_dir(alloc)
        for index, offset, data, _ in pieces:
            with (logs / f"server.stdout.{index}").open("rb") as f:
                f.seek(offset)
                head = f.read(len(data))
            assert data.startswith(head) and (head or not data), (index, offset, data)


def test_each_sink_has_its_own_checkpoints_so_one_down_holds_up_no_other(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=300)
    alloc = node.add(allocation(0))
    down = MemorySink()
    down.name = "second"
    cfg = config(tmp_path, node, sink=(LogSink.FILE,), batch_size=10)
    shipper = LogShipper(cfg, node, sinks=[*build_sinks(cfg.log_shipping), down], retry=NO_WAIT)
    first = numbered("a", 40)
    node.write(alloc, text(first))
    down.down = True
    report = shipper.ship_once()
    assert [s.error is None for s in report.sinks] == [True, False]
    second = numbered("b", 25)
    node.write(alloc, text(second))
    down.down = False
    assert shipper.ship_once().ok
    shipper.close()
    out = Path(cfg.log_shipping.path)
    assert [json.loads(line)["message"] for line in out.read_text().splitlines()] == first + second
    assert down.lines(alloc) == first + second


def test_loki_push_and_a_tcp_syslog_server_that_comes_up_late(tmp_path: Path) -> None:
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    node.write(alloc, text(numbered("x", 30)))
    out = tmp_path / "loki.json"
    loki = _NdjsonServer(out)
    with socket.socket() as probe:  # a free port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sinks = [
        HttpSink(loki.url, HttpFormat.LOKI),
        SyslogSink(f"127.0.0.1:{port}", SyslogProtocol.TCP, "shepard"),
    ]
    shipper = LogShipper(config(tmp_path, node), node, sinks=sinks, retry=NO_WAIT)
    frames: list[bytes] = []
    try:
        report = shipper.ship_once()
        assert report.sinks[0].error is None and "refused" in str(report.sinks[1].error)
        with socket.create_server(("127.0.0.1", port)) as server:
            receiver = Background(lambda: frames.extend(_octet_counted(server, 30)))
            node.write(alloc, text(numbered("x", 5, start=30)))
            assert shipper.ship_once().ok
            receiver.join(timeout=60)
    finally:
        shipper.close()
        loki.close()
    assert len(frames) == 35 and frames[0].startswith(b"<14>1 ") and b"] x-34 " in frames[-1]
    pushed = [json.loads(body) for body in out.read_bytes().splitlines()]
    values = [v for body in pushed for s in body["streams"] for v in s["values"]]
    assert [v[1] for v in values] == numbered("x", 30) + numbered("x", 5, start=30)
    assert pushed[0]["streams"][0]["stream"]["nomad_job_name"] == "web"


def _octet_counted(server: socket.socket, count: int) -> list[bytes]:
    """``count`` RFC 6587 octet-counted frames from the first connection to ``server``, and the rest."""
    conn, _ = server.accept()
    frames: list[bytes] = []
    data = b""
    with conn:
        conn.settimeout(60)
        while True:
            while b" " in data:
                length, _, rest = data.partition(b" ")
                if len(rest) < int(length):
                    break
                frames.append(rest[: int(length)])
                data = rest[int(length) :]
            if len(frames) >= count and not data:
                conn.settimeout(1)  # the rest of the round, if any, follows at once
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return frames
            if not chunk:
                return frames
            data += chunk


def test_when_nomad_cannot_be_asked_the_known_allocations_still_ship(tmp_path: Path) -> None:
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    node.write(alloc, "one\n")
    sink = MemorySink()
    nomad_up = True

    def source() -> list[Allocation]:
        if not nomad_up:
            raise NomadError("node allocations", "connection refused", transient=True)
        return node()

    shipper = LogShipper(config(tmp_path, node), source, sinks=[sink], retry=NO_WAIT)
    shipper.ship_once()
    nomad_up = False
    node.write(alloc, "two\n")
    report = shipper.ship_once()
    assert not report.ok and "connection refused" in str(report.source_error)
    assert report.sinks[0].error is None
    assert sink.lines(alloc) == ["one", "two"]


def test_long_lines_are_cut_between_utf8_characters(tmp_path: Path) -> None:
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    line = "é✓" * 300  # 2- and 3-byte characters, 1500 bytes
    node.write(alloc, line + "\n")
    sink = MemorySink()
    LogShipper(config(tmp_path, node, max_line_bytes=257), node, sinks=[sink], retry=NO_WAIT).ship_once()
    pieces = [r[3] for r in sink.records]
    assert all(len(p) <= 257 for p in pieces) and [r[4] for r in sink.records][-1] is False
    assert "".join(p.decode("utf-8") for p in pieces) == line, "every piece is valid UTF-8"


def test_a_restarted_logmon_appends_to_the_newest_file_and_nothing_ships_twice(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=100)
    alloc = node.add(allocation(0))
    sink = MemorySink()
    shipper = LogShipper(config(tmp_path, node), node, sinks=[sink], retry=NO_WAIT)
    node.write(alloc, text(numbered("before", 12)) + "half")
    shipper.ship_once()
    node.add(alloc)  # a new logmon (TaskLogs) for the same task: it continues the highest N
    node.write(alloc, " a line\n" + text(numbered("after", 5)))
    shipper.ship_once()
    assert sink.lines(alloc) == [*numbered("before", 12), "half a line", *numbered("after", 5)]
    assert not sink.duplicates()


def test_two_shippers_on_the_same_checkpoints_take_turns_and_ship_each_line_once(tmp_path: Path) -> None:
    """The agent and a ``shepard logs ship --once`` from cron: a file lock and a fresh read of the
    checkpoints at each round."""
    node = Node(tmp_path, max_file_size=500, max_files=1000)
    alloc = node.add(allocation(0))
    sink = MemorySink()
    cfg = config(tmp_path, node, batch_size=5)
    agent, cron = (LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT) for _ in range(2))
    written: list[str] = []
    for round_ in range(6):
        lines = numbered(f"r{round_}", 20)
        node.write(alloc, text(lines))
        written += lines
        (agent if round_ % 2 else cron).ship_once()
    assert sink.lines(alloc) == written and not sink.duplicates()

    class Slow(MemorySink):
        def __init__(self, started: threading.Event) -> None:
            super().__init__()
            self.started = started

        def send(self, batch: Any) -> None:
            self.started.set()
            time.sleep(0.01)  # widens the window in which the other round would overlap
            sink.send(batch)

    more = numbered("concurrent", 200)
    node.write(alloc, text(more))
    started = threading.Event()
    first = LogShipper(cfg, node, sinks=[Slow(started)], retry=NO_WAIT)
    second = LogShipper(cfg, node, sinks=[Slow(threading.Event())], retry=NO_WAIT)
    run = Background(first.ship_once)
    assert started.wait(60)
    second.ship_once()  # waits for the lock, then finds everything shipped
    run.join(timeout=60)
    assert sink.lines(alloc) == written + more and not sink.duplicates()


def _points_at_first_byte(logs: Path, pieces: list[tuple[int, int, bytes, bool]]) -> None:
    """Each record's file and offset point at its first byte (the start of its data)."""
    for index, offset, data, _ in pieces:
        assert offset >= 0, (index, offset, data)
        with (logs / f"server.stdout.{index}").open("rb") as f:
            f.seek(offset)
            head = f.read(len(data))
        assert data.startswith(head) and (head or not data), (index, offset, data)


def test_a_crash_after_a_piece_cut_in_a_carried_tail_leaves_valid_checkpoints(tmp_path: Path) -> None:
    """Regression: a long tail of a finished file, then a character logmon split across the two files,
    cut a piece inside the carried tail: its end was recorded as offset -1 of the next file, and
    after a crash every later round failed (EINVAL) for every stream."""
    node = Node(tmp_path, max_file_size=256, max_files=100)
    alloc = node.add(allocation(0))
    node.write(alloc, "a" * 255 + "é" + "b" * 300)
    logs = node.logs_dir(alloc)
    assert (logs / "server.stdout.0").read_bytes() == b"a" * 255 + b"\xc3", "é split across files 0 and 1"
    cfg = config(tmp_path, node, max_line_bytes=256, batch_size=1)
    pieces: list[tuple[int, int, bytes, bool]] = []

    class Recording(CrashingSink):
        def send(self, batch: Any) -> None:
            pieces.extend((line.file, line.offset, line.data, line.cut) for line in batch.lines)
            super().send(batch)

    with pytest.raises(Crash):
        LogShipper(cfg, node, sinks=[Recording(crash_after=2)], retry=NO_WAIT).ship_once()
    saved = json.loads(Path(cfg.log_shipping.checkpoint_path).read_text())
    index, offset, _ = saved["allocations"][alloc.id]["positions"]["server"]["stdout"]["memory"]
    assert (index, offset) == (0, 255), "the checkpoint is inside the carried tail, where the piece starts"
    node.write(alloc, "c\n")
    assert LogShipper(cfg, node, sinks=[Recording(crash_after=0)], retry=NO_WAIT).ship_once().ok
    second = (0, 255, "é".encode() + b"b" * 254, True)
    assert pieces == [(0, 0, b"a" * 255, True), second, second, (1, 255, b"b" * 46 + b"c", False)]
    _points_at_first_byte(logs, pieces)


def test_an_invalid_checkpoint_or_an_unreadable_stream_holds_up_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path)
    damaged, unreadable, unlisted, fine = (node.add(allocation(n)) for n in range(4))
    for alloc in (damaged, unreadable, unlisted, fine):
        node.write(alloc, f"{alloc.id[:8]} one\n")
    sink = MemorySink()
    cfg = config(tmp_path, node)
    shipper = LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT)
    assert shipper.ship_once().ok
    path = Path(cfg.log_shipping.checkpoint_path)
    saved = json.loads(path.read_text())
    saved["allocations"][damaged.id]["positions"]["server"]["stdout"]["memory"][1] = -1
    path.write_text(json.dumps(saved))
    locked, closed = str(node.logs_dir(unreadable)), str(node.logs_dir(unlisted))
    scandir = os.scandir

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:  # as for an agent without read access
        if str(file).startswith(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    def guarded_scandir(path: Any) -> Any:
        if str(path) == closed:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(tailer, "open", guarded_open, raising=False)
    monkeypatch.setattr(os, "scandir", guarded_scandir)
    for alloc in (damaged, unreadable, unlisted, fine):
        node.write(alloc, f"{alloc.id[:8]} two\n")
    report = shipper.ship_once()
    monkeypatch.undo()
    assert not report.ok and len(report.stream_errors) == 3, report.stream_errors
    assert any("invalid checkpoint offset -1" in problem for problem in report.stream_errors)
    assert any(f"{locked}/server.stdout.0: Permission denied" in problem for problem in report.stream_errors)
    assert any(f"{closed}: Permission denied" in problem for problem in report.stream_errors)
    assert report.sinks[0].error is None
    assert sink.lines(fine) == [f"{fine.id[:8]} one", f"{fine.id[:8]} two"]
    assert sink.lines(damaged)[1:] == [f"{damaged.id[:8]} one", f"{damaged.id[:8]} two"], (
        "the damaged stream starts over at its file's start (at-least-once)"
    )
    for alloc in (unreadable, unlisted):
        assert sink.lines(alloc) == [f"{alloc.id[:8]} one"], "it waits for the next round"
    assert shipper.metrics.value("stream_errors", "memory") == 3
    assert shipper.ship_once().ok
    for alloc in (unreadable, unlisted):
        assert sink.lines(alloc) == [f"{alloc.id[:8]} one", f"{alloc.id[:8]} two"]


def test_lines_read_before_a_file_that_cannot_be_opened_ship_and_the_rest_follows_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path, max_file_size=40)
    alloc = node.add(allocation(0))
    lines = [f"line-{n:03d}" for n in range(10)]  # 90 bytes: files 0, 1 and 2, line-004 split by the first
    node.write(alloc, text(lines))
    second = str(node.logs_dir(alloc) / "server.stdout.1")

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == second:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(tailer, "open", guarded_open, raising=False)
    sink = MemorySink()
    shipper = LogShipper(config(tmp_path, node, batch_size=3), node, sinks=[sink], retry=NO_WAIT)
    report = shipper.ship_once()
    assert [second in problem for problem in report.stream_errors] == [True]
    assert sink.lines(alloc) == lines[:4], "the complete lines of file 0"
    monkeypatch.undo()
    assert shipper.ship_once().ok
    assert sink.lines(alloc) == lines and not sink.duplicates()
    assert shipper.metrics.value("fell_behind", "memory") == 0


def test_start_at_end_waits_for_a_round_that_can_list_the_allocations(tmp_path: Path) -> None:
    """Regression: a first round that could not list the allocations still wrote the checkpoint file,
    so the next round was no longer the first and shipped the old lines."""
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    node.write(alloc, "old 1\nold 2\n")
    nomad_up = False

    def source() -> list[Allocation]:
        if not nomad_up:
            raise NomadError("node allocations", "connection refused", transient=True)
        return node()

    sink = MemorySink()
    cfg = config(tmp_path, node, start_at=StartAt.END)
    shipper = LogShipper(cfg, source, sinks=[sink], retry=NO_WAIT)
    assert "connection refused" in str(shipper.ship_once().source_error)
    assert not Path(cfg.log_shipping.checkpoint_path).exists()
    nomad_up = True
    node.write(alloc, "new\n")
    assert shipper.ship_once().ok
    assert sink.records == [], "the first round that lists the allocations starts at their end"
    node.write(alloc, "newer\n")
    shipper.ship_once()
    assert sink.lines(alloc) == ["newer"]


def test_logmon_rotating_and_deleting_during_a_round_is_counted_and_never_splices_lines(
    tmp_path: Path,
) -> None:
    """Regression: files logmon deleted while a round read them were not counted in ``fell_behind``, and
    the unterminated tail of one file was joined to the start of a later, non-adjacent one."""
    max_file_size = 200
    node = Node(tmp_path, max_file_size=max_file_size, max_files=3)
    alloc = node.add(allocation(0))
    written = [f"line-{n:05d}" for n in range(30)]  # 330 bytes: files 0 and 1, none deleted yet
    node.write(alloc, text(written))
    pieces: list[tuple[int, int, bytes, bool]] = []

    class Writer(MemorySink):
        """Each batch it takes makes the task log 15 more lines: logmon rotates and deletes meanwhile."""

        def send(self, batch: Any) -> None:
            super().send(batch)
            pieces.extend((line.file, line.offset, line.data, line.cut) for line in batch.lines)
            more = [f"line-{n:05d}" for n in range(len(written), len(written) + 15)]
            written.extend(more)
            node.write(alloc, text(more))

    sink = Writer()
    cfg = config(tmp_path, node, batch_size=5)
    shipper = LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT)
    for _ in range(3):
        shipper.ship_once()
    fragments = {line[i:j] for line in written for i in range(len(line)) for j in range(i + 1, len(line) + 1)}
    spliced = [r[3] for r in sink.records if r[3].decode() not in fragments]
    assert not spliced, f"records that were never written: {spliced}"
    # Which bytes of the files before the checkpoint's reached the sink (a record may go on into the
    # next files): a file with a byte that did not was lost.
    saved = json.loads(Path(cfg.log_shipping.checkpoint_path).read_text())
    checkpoint = saved["allocations"][alloc.id]["positions"]["server"]["stdout"]["memory"][0]
    shipped = [bytearray(max_file_size) for _ in range(checkpoint)]
    for index, offset, data, cut in pieces:
        length = len(data) + (not cut)
        while length and index < checkpoint:
            span = min(length, max_file_size - offset)
            shipped[index][offset : offset + span] = b"\1" * span
            length -= span
            index, offset = index + 1, 0
    lost = [n for n, marks in enumerate(shipped) if not all(marks)]
    assert len(lost) > 3, "the sink should have fallen behind, several times"
    assert shipper.metrics.value("fell_behind", "memory") == len(lost), lost
    assert any(cut for _, _, _, cut in pieces), (
        "the test should include a tail shipped on its own because the next file was lost"
    )


def test_deleted_files_a_round_could_not_read_are_lost_files_and_the_tail_before_them_is_a_cut_line(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, max_file_size=10, max_files=100)
    alloc = node.add(allocation(0))
    node.write(alloc, "x\nabcdefgh" + "0123456789" + "def\n")  # files 0 and 1 without newline at their end
    logs = node.logs_dir(alloc)
    stream = list_streams(alloc.id, logs)[0]
    reader = tailer.StreamReader(stream, tailer.Position(0, 0, stream.files[0].inode), 300)
    (logs / "server.stdout.1").unlink()  # deleted by logmon after the listing, before it was read
    out: list[tailer.Line] = []
    try:
        reader.take(100, 10_000, out)
    finally:
        reader.close()
    assert [(line.file, line.offset, line.data, line.cut) for line in out] == [
        (0, 0, b"x", False),
        (0, 2, b"abcdefgh", True),
        (2, 0, b"def", False),
    ]
    assert reader.lost_files == 1


def test_an_allocation_deleted_before_its_lines_were_shipped_counts_as_falling_behind(tmp_path: Path) -> None:
    node = Node(tmp_path, max_file_size=100)
    alloc, other = node.add(allocation(0)), node.add(allocation(1))
    node.write(alloc, "one\n")
    node.write(other, "kept\n")
    sink = MemorySink()
    shipper = LogShipper(config(tmp_path, node), node, sinks=[sink], retry=NO_WAIT)
    assert shipper.ship_once().ok
    node.write(alloc, text(numbered("unshipped", 20)))  # several files
    node.write(other, "done\n")
    sink.down = True
    shipper.ship_once()
    sink.down = False
    files = len(list(node.logs_dir(alloc).glob("server.stdout.*")))
    node.remove(alloc)  # Nomad forgets it and the client deletes its directory
    assert shipper.ship_once().ok
    assert shipper.metrics.value("fell_behind", "memory") == files > 1
    assert sink.lines(other) == ["kept", "done"]
    assert alloc.id not in json.loads(Path(shipper._shipping.checkpoint_path).read_text())["allocations"]


def test_a_udp_syslog_message_longer_than_a_datagram_is_rejected_and_the_rest_delivered(
    tmp_path: Path,
) -> None:
    """Over UDP a message is one datagram: a longer one (EMSGSIZE) is counted as rejected instead of
    failing the sink at the same line round after round."""
    node = Node(tmp_path)
    alloc = node.add(allocation(0))
    node.write(alloc, "before\n" + "x" * 70000 + "\nafter\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(60)
        sink = SyslogSink(f"127.0.0.1:{receiver.getsockname()[1]}", SyslogProtocol.UDP, "shepard")
        cfg = config(tmp_path, node, max_line_bytes=100_000)  # the config refuses this with syslog over udp
        shipper = LogShipper(cfg, node, sinks=[sink], retry=NO_WAIT)
        try:
            report = shipper.ship_once()
            received = [receiver.recv(65536) for _ in range(2)]
        finally:
            shipper.close()
    assert report.ok and report.sinks[0].lines == 2 and report.sinks[0].lag_bytes == 0
    assert [m.rsplit(b"] ", 1)[1] for m in received] == [b"before", b"after"]
    assert shipper.metrics.value("rejected_lines", "syslog") == 1
    assert shipper.metrics.value("lines_shipped", "syslog") == 2
    assert shipper.metrics.value("errors", "syslog") == 0


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(
            st.text(alphabet="ab\né✓", max_size=80),
            st.sampled_from(["write", "write and ship", "write during a send"]),
        ),
        max_size=30,
    ),
    max_file_size=st.integers(min_value=10, max_value=60),
    max_files=st.integers(min_value=1, max_value=4),
    max_line=st.integers(min_value=4, max_value=40),
    batch_size=st.integers(min_value=1, max_value=5),
)
def test_whatever_logmon_writes_and_deletes_records_are_exact_and_lost_files_are_counted(
    chunks: list[tuple[str, str]], max_file_size: int, max_files: int, max_line: int, batch_size: int
) -> None:
    """With logmon deleting files between and during rounds: each record is bytes of the written stream
    at its file and offset (ending at a newline unless cut), in order, resuming only at a file's start
    after a gap; and ``fell_behind`` counts exactly the files with bytes that never shipped (give or
    take a file that filled up at a newline right as its last line shipped: the shipper cannot tell it
    from one that grew after it was read)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = Node(root, max_file_size=max_file_size, max_files=max_files)
        alloc = node.add(allocation(0))
        written = bytearray()
        pending: list[str] = []
        pieces: list[tuple[int, int, bytes, bool]] = []

        def write(data: str) -> None:
            node.write(alloc, data)
            written.extend(data.encode("utf-8"))

        class Recording(MemorySink):
            def send(self, batch: Any) -> None:
                pieces.extend((line.file, line.offset, line.data, line.cut) for line in batch.lines)
                if pending:
                    write(pending.pop(0))

        cfg = config(root, node, max_line_bytes=max_line, batch_size=batch_size)  # below the config's minimum
        shipper = LogShipper(cfg, node, sinks=[Recording()], retry=NO_WAIT)
        write("start\n")
        shipper.ship_once()  # file 0 is listed before logmon deletes anything
        for data, what in chunks:
            if what == "write during a send":
                pending.append(data)
                continue
            write(data)
            if what == "write and ship":
                shipper.ship_once()
        while pending:
            write(pending.pop(0))
        shipper.ship_once()
        shipper.ship_once()
        saved = json.loads(Path(cfg.log_shipping.checkpoint_path).read_text())
        checkpoint = saved["allocations"][alloc.id]["positions"]["server"]["stdout"]["memory"][0]
        fell_behind = shipper.metrics.value("fell_behind", "memory")

    covered = bytearray(len(written))
    previous_end = 0
    for index, offset, data, cut in pieces:
        at = index * max_file_size + offset
        assert 0 <= offset < max_file_size and b"\n" not in data, (index, offset, data)
        assert bytes(written[at : at + len(data)]) == data, (index, offset, data)
        end = at + len(data) + (not cut)
        assert cut or written[end - 1 : end] == b"\n", (index, offset, data)
        assert at == previous_end or (at > previous_end and offset == 0), "in order, resuming at a file start"
        covered[at:end] = b"\1" * (end - at)
        previous_end = end
    files = [range(n * max_file_size, (n + 1) * max_file_size) for n in range(checkpoint)]
    shipped = [all(covered[i] for i in span) for span in files]
    lost = shipped.count(False)
    filled_at_a_newline = sum(
        1 for span, whole in zip(files, shipped, strict=True) if whole and written[span[-1]] == ord("\n")
    )
    assert lost <= fell_behind <= lost + filled_at_a_newline, (lost, fell_behind, filled_at_a_newline)
