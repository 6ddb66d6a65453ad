"""The syslog sink against a real rsyslog: RFC 5424 over TCP (octet-counted) and UDP, tags intact.

rsyslogd runs in the foreground (``-n``) with a config of its own: ``imtcp`` and ``imudp`` inputs on
free loopback ports, each written by ``omfile`` with a template that keeps the structured data.
Skipped where rsyslog is not installed; ``.ci/run`` installs it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from logship_support import Node, allocation, config

from shepard_lib.config import SYSLOG_UDP_MAX_LINE, SyslogProtocol
from shepard_lib.logship import LogShipper, RetryPolicy
from shepard_lib.logship.sinks.syslog import SD_ID, SyslogSink

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
pytestmark = pytest.mark.skipif(
    RSYSLOGD is None, reason="rsyslog is not installed (apt-get install -y rsyslog; .ci/run installs it)"
)
DEADLINE = 60.0
"""Real seconds to wait for rsyslog to start or to write what it received."""


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Rsyslog:
    tcp_port: int
    udp_port: int
    tcp_log: Path
    udp_log: Path


CONFIG = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
module(load="imudp")
template(name="keep_sd" type="string"
         string="%hostname% %app-name% %msgid% %pri% %structured-data% %msg%\\n")
ruleset(name="from_tcp") {{ action(type="omfile" file="{tcp_log}" template="keep_sd") }}
ruleset(name="from_udp") {{ action(type="omfile" file="{udp_log}" template="keep_sd") }}
input(type="imtcp" address="127.0.0.1" port="{tcp_port}" ruleset="from_tcp")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="from_udp")
"""


def _wait_for(what: str, check: object) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"rsyslog: timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    """A running rsyslogd with a TCP and a UDP input on loopback."""
    assert RSYSLOGD is not None
    work = tmp_path / "rsyslog"
    work.mkdir()
    server = Rsyslog(
        _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM), work / "tcp.log", work / "udp.log"
    )
    conf = work / "rsyslog.conf"
    conf.write_text(
        CONFIG.format(
            work=work, tcp_log=server.tcp_log, udp_log=server.udp_log,
            tcp_port=server.tcp_port, udp_port=server.udp_port,
        )
    )
    check = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"rsyslogd -N1 rejects the config: {check.stderr}"
    process = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        def tcp_up() -> bool:
            if process.poll() is not None:
                output = process.stdout.read() if process.stdout else b""
                raise AssertionError(f"rsyslogd exited: {output.decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", server.tcp_port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait_for("its TCP input", tcp_up)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:

            def udp_up() -> bool:  # UDP cannot be probed but by sending until something arrives
                probe.sendto(b"<14>1 - - probe - - - udp probe", ("127.0.0.1", server.udp_port))
                return server.udp_log.exists() and "udp probe" in server.udp_log.read_text()

            _wait_for("its UDP input", udp_up)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            if process.stdout:
                process.stdout.close()


_RECORD = re.compile(
    r"^(?P<host>\S+) (?P<app>\S+) (?P<msgid>\S+) (?P<pri>\d+) "
    r'\[(?P<sd_id>[^ \]]+)(?P<params>(?: [^=]+="(?:[^"\\]|\\.)*")*)\] ?(?P<msg>.*)$'
)
_PARAM = re.compile(r' ([^=]+)="((?:[^"\\]|\\.)*)"')


HEADER = ("host", "app", "msgid", "pri", "sd_id", "msg")


def parse(line: str) -> dict[str, str]:
    """One record as rsyslog wrote it: the header fields, the SD params unescaped, the message."""
    match = _RECORD.match(line)
    assert match, f"rsyslog did not keep the structured data: {line!r}"
    record = {k: match[k] for k in HEADER}
    for name, value in _PARAM.findall(match["params"]):
        record[name] = re.sub(r"\\(.)", r"\1", value)
    return record


def _records(path: Path, count: int) -> list[dict[str, str]]:
    def written() -> bool:
        return path.exists() and len(_lines(path)) >= count

    _wait_for(f"{count} records in {path.name}", written)
    return [parse(line) for line in _lines(path)]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if "probe" not in line]


@pytest.mark.parametrize("protocol", [SyslogProtocol.TCP, SyslogProtocol.UDP])
def test_rsyslog_receives_every_line_with_its_tags(
    tmp_path: Path, rsyslog: Rsyslog, protocol: SyslogProtocol
) -> None:
    node = Node(tmp_path, max_file_size=4096)
    alloc = node.add(allocation(3, job="api", group="edge"), tasks=("proxy",))
    lines = [f"request {n} from 10.0.0.{n % 250} héllo ✓" for n in range(150)]
    node.write(alloc, "".join(line + "\n" for line in lines), task="proxy")
    node.write(alloc, "upstream refused\n", task="proxy", stream="stderr")
    port = rsyslog.tcp_port if protocol is SyslogProtocol.TCP else rsyslog.udp_port
    tags = {"env": "prod", "team": 'a"b]c\\d'}  # escaped in SD-PARAM values
    cfg = config(tmp_path, node, tags=tags, batch_size=40)
    sink = SyslogSink(f"127.0.0.1:{port}", protocol, "shepard-test")
    shipper = LogShipper(cfg, node, datacenter="dc7", sinks=[sink], retry=RetryPolicy(attempts=2, initial=0))
    try:
        assert shipper.ship_once().ok
    finally:
        shipper.close()
    out = rsyslog.tcp_log if protocol is SyslogProtocol.TCP else rsyslog.udp_log
    records = _records(out, 151)
    stdout = [r for r in records if r["msgid"] == "stdout"]
    assert [r["msg"] for r in stdout] == lines
    (stderr,) = [r for r in records if r["msgid"] == "stderr"]
    assert stderr["msg"] == "upstream refused" and stderr["pri"] == "11"
    logs = node.logs_dir(alloc)
    for record, line in zip(stdout, lines, strict=True):
        assert record["host"] == "n1" and record["app"] == "shepard-test" and record["pri"] == "14"
        assert record["sd_id"] == SD_ID
        assert {k: v for k, v in record.items() if k not in HEADER} == {
            "nomad.allocation.id": alloc.id,
            "nomad.allocation.name": "api.edge[3]",
            "nomad.job.name": "api",
            "nomad.task.name": "proxy",
            "nomad.namespace": "default",
            "nomad.datacenter": "dc7",
            "nomad.group.name": "edge",
            "nomad.allocation.index": "3",
            "nomad.node.name": "n1",
            "stream": "stdout",
            "env": "prod",
            "team": 'a"b]c\\d',
            "log.file.path": record["log.file.path"],
            "log.offset": record["log.offset"],
        }
        path = Path(record["log.file.path"])
        assert path.parent == logs and path.name.startswith("proxy.stdout.")
        with path.open("rb") as f:  # the line starts at the offset (it may go on in the next file)
            f.seek(int(record["log.offset"]))
            head = f.read(len(line.encode()))
        assert line.encode().startswith(head) and head, (record, line)


def test_the_longest_line_allowed_over_udp_reaches_rsyslog_whole_with_its_tags(
    tmp_path: Path, rsyslog: Rsyslog
) -> None:
    """``max_line_bytes`` is at most SYSLOG_UDP_MAX_LINE with syslog over UDP: such a line and its header
    fit one datagram (rsyslog here takes messages up to its ``maxMessageSize`` of 64k)."""
    node = Node(tmp_path, max_file_size=1 << 20)
    alloc = node.add(allocation(1))
    longest = "x" * (SYSLOG_UDP_MAX_LINE - 4) + "end."
    node.write(alloc, longest + "\nshort\n")
    cfg = config(tmp_path, node, max_line_bytes=SYSLOG_UDP_MAX_LINE, tags={"env": "prod"})
    sink = SyslogSink(f"127.0.0.1:{rsyslog.udp_port}", SyslogProtocol.UDP, "shepard-test")
    shipper = LogShipper(cfg, node, sinks=[sink], retry=RetryPolicy(attempts=2, initial=0))
    try:
        assert shipper.ship_once().ok
    finally:
        shipper.close()
    first, second = _records(rsyslog.udp_log, 2)
    assert first["msg"] == longest and second["msg"] == "short"
    assert first["nomad.allocation.id"] == alloc.id and first["env"] == "prod" and "log.cut" not in first
    assert shipper.metrics.value("rejected_lines", "syslog") == 0
