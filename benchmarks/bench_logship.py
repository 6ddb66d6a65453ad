"""Log shipping throughput: Shepard's file sink against rsyslog's ``imfile`` on the same files.

Writes N lines (default 1,000,000) across 50 Nomad task log files (``alloc/<id>/alloc/logs/
server.stdout.0`` under a fresh data dir), then, in the same run:

* Shepard: ``LogShipper(cfg, source).ship_once()`` with the ``file`` sink, once per
  ``--batch-sizes`` value (the default ``batch_bytes``), in a child process (so its peak RSS is
  its own), records as JSON lines with every tag;
* rsyslog: ``rsyslogd -n`` with ``module(load="imfile" mode="inotify")`` reading the same 50 files
  (a wildcard input, ``addMetadata``) and ``omfile`` writing the same JSON records (the tags as
  constants, file name and offset from imfile's metadata), and with ``--rsyslog-sync`` also with
  ``sync="on"`` (fsync per batch, as Shepard does), timed from start until the output holds N
  lines; peak RSS is ``VmHWM``.

Prints lines/s, peak RSS, bytes per record and the ratios Shepard/rsyslog. Targets (issue 16): at
least as fast as imfile and under 100 MB RSS. Shepard fsyncs the output and its checkpoints after
every batch. Asserts nothing about timing.

    python benchmarks/bench_logship.py [-n 1000000] [--files 50] [--repeat 3] [--rsyslog-sync]
                                       [--batch-sizes 500,2000,5000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RSS_MB = 100
BATCH_SIZES = "500,2000,5000"
"""``log_shipping.batch_size`` values timed by default (``--batch-sizes``)."""
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def write_logs(data_dir: Path, lines: int, files: int) -> list[str]:
    """``files`` allocation directories with one stdout file each; returns the allocation IDs."""
    rng = random.Random(5)
    ids = [f"{n:08x}-0000-4000-8000-{n:012x}" for n in range(files)]
    words = [w * rng.randrange(1, 6) for w in ("GET", "/api/v1/items", "200", "ms", "user=alice", "ok")]
    for n, alloc_id in enumerate(ids):
        logs = data_dir / "alloc" / alloc_id / "alloc" / "logs"
        logs.mkdir(parents=True)
        count = lines // files + (1 if n < lines % files else 0)
        with (logs / "server.stdout.0").open("w") as f:
            for i in range(count):
                f.write(f"2026-11-30T04:00:00.{i:06d}Z INFO req={i} {' '.join(rng.sample(words, 4))}\n")
    return ids


SHEPARD_CHILD = """
import dataclasses, json, os, resource, sys, time
from shepard_lib.config import LogShippingConfig, default_config
from shepard_lib.logship import LogShipper
from shepard_lib.model import Allocation

data_dir, out, checkpoints, ids, batch = sys.argv[1:]
allocs = [
    Allocation(id=i, name=f"web.app[{n}]", namespace="default", node_id="x", node_name="n1", job_id="web",
               task_group="app", client_status="running", desired_status="run", index=n)
    for n, i in enumerate(ids.split(","))
]
cfg = dataclasses.replace(
    default_config(), nomad_data_dir=data_dir,
    log_shipping=LogShippingConfig(
        path=out, checkpoint_path=checkpoints, file_max_bytes=1 << 40, batch_size=int(batch)
    ),
)
shipper = LogShipper(cfg, lambda: allocs, datacenter="dc1")
start = time.perf_counter()
report = shipper.ship_once()
elapsed = time.perf_counter() - start
shipper.close()
print(json.dumps({"lines": report.sinks[0].lines, "seconds": elapsed, "bytes": os.path.getsize(out),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_shepard(data_dir: Path, work: Path, ids: list[str], batch_size: int) -> dict[str, float]:
    """Lines/s and peak RSS of one ``ship_once`` in a child process, from a fresh checkpoint."""
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", SHEPARD_CHILD, str(data_dir), str(work / "shepard.jsonl"),
         str(work / "checkpoints.json"), ",".join(ids), str(batch_size)],
        capture_output=True, text=True, check=True,
    )
    stats: dict[str, float] = json.loads(result.stdout)
    return stats


RSYSLOG_CONFIG = """\
global(workDirectory="{work}")
module(load="imfile" mode="inotify")
template(name="json" type="list") {{
  constant(value="{{\\"@timestamp\\": \\"")
  property(name="timegenerated" dateFormat="rfc3339")
  constant(value="\\", {tags}, \\"log.file.path\\": \\"")
  property(name="$!metadata!filename" format="json")
  constant(value="\\", \\"log.offset\\": ")
  property(name="$!metadata!fileoffset")
  constant(value=", \\"message\\": \\"")
  property(name="msg" format="json")
  constant(value="\\"}}\\n")
}}
ruleset(name="ship") {{ action(type="omfile" file="{out}" template="json" sync="{sync}") }}
input(type="imfile" file="{data_dir}/alloc/*/alloc/logs/server.stdout.0" tag="task" addMetadata="on"
      ruleset="ship")
"""
"""rsyslog writes the same JSON records as Shepard: the tags are constants (imfile cannot know an
allocation's), the file name and offset come from imfile's metadata. ``sync="on"`` makes omfile
fsync after each batch, as Shepard does."""

TAGS = {
    "nomad.allocation.id": "00000000-0000-4000-8000-000000000000",
    "nomad.allocation.name": "web.app[0]",
    "nomad.job.name": "web",
    "nomad.task.name": "server",
    "nomad.namespace": "default",
    "nomad.datacenter": "dc1",
    "nomad.group.name": "app",
    "nomad.allocation.index": "0",
    "nomad.node.name": "n1",
    "stream": "stdout",
}


def run_rsyslog(data_dir: Path, work: Path, lines: int, sync: bool) -> dict[str, float]:
    """Lines/s and peak RSS of rsyslogd's imfile shipping the same files to omfile."""
    work.mkdir()
    state = work / "rsyslog"
    state.mkdir()
    out = work / "rsyslog.jsonl"
    conf = state / "rsyslog.conf"
    tags = json.dumps(TAGS)[1:-1].replace('"', '\\"')
    conf.write_text(
        RSYSLOG_CONFIG.format(work=state, out=out, data_dir=data_dir, tags=tags, sync="on" if sync else "off")
    )
    subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], check=True, capture_output=True)
    start = time.perf_counter()
    process = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(state / "pid")])
    try:
        seen, offset = 0, 0
        deadline = time.monotonic() + 600
        while seen < lines:
            if process.poll() is not None:
                raise SystemExit(f"rsyslogd exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"rsyslogd shipped {seen} of {lines} lines in 600 s")
            if out.exists():
                with out.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                seen += chunk.count(b"\n")
                offset += len(chunk)
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"lines": seen, "seconds": elapsed, "rss_mb": rss_kb / 1024, "bytes": out.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="lines in all (default 1,000,000)")
    parser.add_argument("--files", type=int, default=50, help="log files (default 50)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the runs this many times; medians")
    parser.add_argument(
        "--rsyslog-sync", action="store_true", help="also time omfile with sync=on (slow: use -n 100000)"
    )
    parser.add_argument(
        "--batch-sizes", default=BATCH_SIZES, help=f"log_shipping.batch_size values to time ({BATCH_SIZES})"
    )
    args = parser.parse_args()
    have_rsyslog = Path(RSYSLOGD).exists()
    if not have_rsyslog:
        print("rsyslogd not found (apt-get install rsyslog): no baseline")
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-logship-") as tmp:
        root = Path(tmp)
        data_dir = root / "data"
        ids = write_logs(data_dir, args.n, args.files)
        size = sum(p.stat().st_size for p in data_dir.rglob("server.stdout.0"))
        print(f"{args.n} lines, {size / 1e6:.0f} MB in {args.files} files, {args.repeat} alternating run(s)")
        for r in range(args.repeat):  # alternate, so that load from elsewhere hits every contender alike
            for sync in ((False, True) if args.rsyslog_sync else (False,)) if have_rsyslog else ():
                name = f"rsyslog imfile -> omfile sync={'on' if sync else 'off'}"
                result = run_rsyslog(data_dir, root / f"rsyslog-{sync}-{r}", args.n, sync)
                runs.setdefault(name, []).append(result)
            for batch_size in (int(size) for size in args.batch_sizes.split(",")):
                shepard = run_shepard(data_dir, root / f"shepard-{batch_size}-{r}", ids, batch_size)
                assert shepard["lines"] == args.n, shepard
                runs.setdefault(f"shepard file sink batch_size={batch_size}", []).append(shepard)
    rates = {name: statistics.median(x["lines"] / x["seconds"] for x in got) for name, got in runs.items()}
    baselines = {name: rate for name, rate in rates.items() if name.startswith("rsyslog")}
    for name, results in runs.items():
        rss = max(x["rss_mb"] for x in results)
        per_record = results[0]["bytes"] / args.n
        line = f"{name:<38}: {rates[name]:>9,.0f} lines/s  peak RSS {rss:>3.0f} MB  {per_record:.0f} B/record"
        if name.startswith("shepard") and baselines:
            line += "  ratio " + "  ".join(
                f"vs {base.split()[-1]}: {rates[name] / rate:.2f}" for base, rate in baselines.items()
            )
        print(line)
    print(f"targets: ratio >= 1.0, peak RSS < {TARGET_RSS_MB} MB")


if __name__ == "__main__":
    main()
