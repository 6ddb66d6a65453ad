"""What a rolling restart costs: requests, CPU and time per restart, against the ideal schedule.

Each case (``N x c``: N allocations, concurrency c) starts ``shepard sim serve`` in its own
process (a scenario of one job, log-normal restart and health times), then runs
``RollingRestart(...).run(job, RolloutOptions(concurrency=c))`` through the public API in this
process, as a user's script would, and prints per case:

- Consul and Nomad requests per restart, from the sim's own counters (``GET /_sim/requests`` on
  both ports, the delta over the rollout), in all and by endpoint;
- Shepard CPU seconds per restart (this process's CPU time over the rollout: the sim runs elsewhere);
- makespan / ideal: the rollout's makespan (first trigger seen by the sim to the last restart's
  healthy time + ``min_healthy_time``, from the sim's restart record) over the list schedule of
  the same recorded durations on c slots with zero overhead (each restart's duration: requested
  -> healthy + ``min_healthy_time``, in the order they were requested);
- batch / Shepard: ``nomad job restart -batch-size=c`` semantics on the same durations (a batch
  starts when the previous one is done) over Shepard's makespan: above 1 means Shepard is faster;
- slot hand-off latency p50/p99: real milliseconds from a restart's finish (its slot free for the next member:
  a worker keeps its slot) to the next trigger
  (pairs in order, from Shepard's own log records);
- peak concurrency (from the sim's record), sessions lost and "Connection pool is full" warnings.

Counts are what to compare between runs; times depend on the machine's load, which is printed
with them. ``--json FILE`` writes every figure; ``--profile 100x20`` profiles that case (every
thread, cProfile) and prints the top functions.

    python benchmarks/bench_rollout.py [--cases 24x1,100x5,100x20,500x50] [--time-scale 10]
        [--json out.json] [--profile 100x20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import math
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import _common as common
import requests
import yaml

from shepard_lib.backends.consul import ConsulBackend
from shepard_lib.backends.nomad import NomadBackend
from shepard_lib.clock import Clock
from shepard_lib.config import ConsulConfig, NomadConfig, ShepardConfig, default_config
from shepard_lib.rollout import RollingRestart, RolloutOptions
from shepard_lib.sim.nomad.restarts import RestartRecord, peak_concurrency

DEFAULT_CASES = "24x1,100x5,100x20,500x50"
JOB = common.JOB
TARGETS = {
    "consul_per_restart_c1": 8,
    "consul_per_restart": 10,
    "cpu_ms_per_restart": 20,
    "makespan_ratio_c5": 1.05,
    "makespan_ratio_c20": 1.10,
}
"""The issue's targets (issue 10)."""


@dataclass
class CaseResult:
    """Every figure of one case."""

    allocations: int
    concurrency: int
    restarted: int
    failed: int
    skipped: int
    consul_requests: int
    nomad_requests: int
    consul_per_restart: float
    nomad_per_restart: float
    consul_by_endpoint: dict[str, float]
    nomad_by_endpoint: dict[str, float]
    cpu_seconds: float
    cpu_ms_per_restart: float
    wall_seconds: float
    makespan: float
    ideal: float
    batch: float
    makespan_ratio: float
    batch_ratio: float
    handoff_ms_p50: float | None
    handoff_ms_p99: float | None
    peak_concurrency: int
    sessions_lost: int
    pool_warnings: int
    load: str
    notes: list[str] = field(default_factory=list)


def scenario(allocations: int, *, seed: int) -> dict[str, Any]:
    """One job of ``allocations`` Shepard-managed tasks with a Consul check, log-normal times."""
    return common.scenario(
        allocations,
        max(3, allocations // 10),
        restart={"lognormal": {"median": "2s", "sigma": 0.5}},
        healthy_after={"lognormal": {"median": "3s", "sigma": 0.4}},
        seed=seed,
    )


@contextmanager
def sim_process(spec: dict[str, Any], time_scale: float) -> Iterator[tuple[str, str]]:
    """``shepard sim serve`` in a child process; yields its Consul and Nomad addresses."""
    workdir = Path(tempfile.mkdtemp(prefix="shepard-bench-"))
    path = workdir / "scenario.yaml"
    path.write_text(yaml.safe_dump(spec))
    shepard = Path(sys.executable).with_name("shepard")
    command = (
        [str(shepard)]
        if shepard.exists()
        else [sys.executable, "-c", "from shepard_lib.cli import main; main()"]
    )
    proc = subprocess.Popen(
        [
            *command,
            "--log-level",
            "WARNING",
            "sim",
            "serve",
            "--scenario",
            str(path),
            "--time-scale",
            str(time_scale),
            "--data-dir",
            str(workdir / "data"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"sim did not start: {line!r}")
        addrs = dict(part.split("=", 1) for part in line.split()[1:])
        yield addrs["consul"], addrs["nomad"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


class _Recorder(logging.Handler):
    """Keeps the real times of finishes (a slot free for the next member) and triggers, and counts lost
    sessions and pool warnings."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.mu = threading.Lock()
        self.events: list[tuple[float, str]] = []
        self.sessions_lost = 0
        self.pool_warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        msg = str(record.msg)
        with self.mu:
            if record.name == "shepard_lib.coordinator" and "restarted and healthy" in msg:
                self.events.append((now, "release"))
            elif record.name in ("shepard_lib.coordinator", "shepard_lib.trigger") and "triggered" in msg:
                self.events.append((now, "trigger"))
            elif record.name == "shepard_lib.session" and "lost" in msg:
                self.sessions_lost += 1
            elif "Connection pool is full" in msg:
                self.pool_warnings += 1

    def handoffs_ms(self) -> list[float]:
        """Finish -> next trigger, paired in order (the first c triggers follow no finish)."""
        pending: list[float] = []
        out = []
        for at, kind in sorted(self.events):
            if kind == "release":
                pending.append(at)
            elif pending:
                out.append((at - pending.pop(0)) * 1000)
        return out


@contextmanager
def recording() -> Iterator[_Recorder]:
    recorder = _Recorder()
    names = [
        "shepard_lib.coordinator",
        "shepard_lib.trigger",
        "shepard_lib.session",
        "urllib3.connectionpool",
    ]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO if lg.name.startswith("shepard") else logging.WARNING)
        lg.addHandler(recorder)
    try:
        yield recorder
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(recorder)
            lg.setLevel(level)


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Counts by ``METHOD endpoint`` from either sim's counter format."""

    def flat(counts: dict[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, value in counts.items():
            if isinstance(value, dict):  # Consul: {endpoint: {method: n}}
                for method, n in value.items():
                    out[f"{method} {key}"] = int(n)
            else:  # Nomad: {"METHOD endpoint": n}
                out[key] = int(value)
        return out

    b, a = flat(before), flat(after)
    return {k: a[k] - b.get(k, 0) for k in sorted(a) if a[k] - b.get(k, 0)}


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def run_case(
    allocations: int,
    concurrency: int,
    *,
    time_scale: float,
    min_healthy_time: float,
    seed: int,
    profile: cProfile.Profile | None = None,
) -> CaseResult:
    """One rollout of ``allocations`` at ``concurrency``, the sim in its own process."""
    clock = Clock(time_scale)
    with sim_process(scenario(allocations, seed=seed), time_scale) as (consul_addr, nomad_addr):
        cfg: ShepardConfig = replace(
            default_config(),
            consul=ConsulConfig(address=consul_addr),
            nomad=NomadConfig(address=nomad_addr),
            min_healthy_time=min_healthy_time,
            healthy_deadline=120.0,
            time_scale=time_scale,
        )
        http = requests.Session()
        consul_before = http.get(f"{consul_addr}/_sim/requests").json()
        nomad_before = http.get(f"{nomad_addr}/_sim/requests").json()
        consul = ConsulBackend(cfg.consul, clock)
        nomad = NomadBackend(cfg.nomad, clock)
        rolling = RollingRestart(consul, nomad, cfg, clock=clock, name="bench")
        with recording() as recorder:
            cpu0, wall0 = time.process_time(), time.monotonic()
            if profile is not None:
                with _profiling_threads(profile):
                    result = rolling.run(JOB, RolloutOptions(concurrency=concurrency))
            else:
                result = rolling.run(JOB, RolloutOptions(concurrency=concurrency))
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        consul.close()
        nomad.close()
        consul_counts = _delta(consul_before, http.get(f"{consul_addr}/_sim/requests").json())
        nomad_counts = _delta(nomad_before, http.get(f"{nomad_addr}/_sim/requests").json())
        records = [
            RestartRecord(**r) for r in http.get(f"{nomad_addr}/_sim/restarts").json() if r["job"] == JOB
        ]
        http.close()
    # Each restart holds its slot from requested to healthy + min_healthy_time.
    durations = [d + min_healthy_time for d in common.durations(records)]
    makespan = common.makespan(records) + min_healthy_time if durations else 0.0
    ideal = common.ideal_makespan(durations, concurrency)
    batch = common.batch_makespan(durations, concurrency)
    restarts = max(1, len(result.restarted))
    handoffs = recorder.handoffs_ms()
    notes = []
    if len(records) != len(durations):
        notes.append(f"{len(records) - len(durations)} restart(s) never healthy")
    return CaseResult(
        allocations=allocations,
        concurrency=concurrency,
        restarted=len(result.restarted),
        failed=len(result.failed),
        skipped=len(result.skipped),
        consul_requests=sum(consul_counts.values()),
        nomad_requests=sum(nomad_counts.values()),
        consul_per_restart=sum(consul_counts.values()) / restarts,
        nomad_per_restart=sum(nomad_counts.values()) / restarts,
        consul_by_endpoint={k: round(v / restarts, 2) for k, v in consul_counts.items()},
        nomad_by_endpoint={k: round(v / restarts, 2) for k, v in nomad_counts.items()},
        cpu_seconds=cpu,
        cpu_ms_per_restart=cpu * 1000 / restarts,
        wall_seconds=wall,
        makespan=makespan,
        ideal=ideal,
        batch=batch,
        makespan_ratio=makespan / ideal if ideal else math.nan,
        batch_ratio=batch / makespan if makespan else math.nan,
        handoff_ms_p50=common.percentile(handoffs, 50) if handoffs else None,
        handoff_ms_p99=common.percentile(handoffs, 99) if handoffs else None,
        peak_concurrency=peak_concurrency(records, math.inf),  # a restart never ended is still active
        sessions_lost=recorder.sessions_lost,
        pool_warnings=recorder.pool_warnings,
        load=load_text(),
        notes=notes,
    )


@contextmanager
def _profiling_threads(profile: cProfile.Profile) -> Iterator[None]:
    """Profile the calling thread into ``profile`` and every thread started meanwhile into its own."""
    profiles: list[cProfile.Profile] = []
    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        p = cProfile.Profile(time.thread_time)
        profiles.append(p)
        p.enable()
        try:
            original_run(self)
        finally:
            p.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        threading.Thread.run = original_run  # type: ignore[method-assign]
        _THREAD_PROFILES.extend(profiles)


_THREAD_PROFILES: list[cProfile.Profile] = []


def profile_report(profile: cProfile.Profile, top: int) -> str:
    """Top functions by own time and by cumulative time, over every profiled thread."""
    stats = pstats.Stats(profile)
    for p in _THREAD_PROFILES:
        stats.add(p)
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def show(case: CaseResult) -> str:
    """The case as a few human lines."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"== {case.allocations} x {case.concurrency}: restarted {case.restarted}, failed {case.failed}, "
        f"skipped {case.skipped} ({case.load})",
        f"   Consul requests/restart {case.consul_per_restart:.2f}   Nomad requests/restart "
        f"{case.nomad_per_restart:.2f}",
        f"   Shepard CPU/restart {case.cpu_ms_per_restart:.1f} ms   wall {case.wall_seconds:.1f} s",
        f"   makespan {case.makespan:.1f}s / ideal {case.ideal:.1f}s = {case.makespan_ratio:.3f}   "
        f"batch {case.batch:.1f}s / Shepard = {case.batch_ratio:.3f}",
        f"   hand-off p50 {ms(case.handoff_ms_p50)} ms  p99 {ms(case.handoff_ms_p99)} ms   peak "
        f"{case.peak_concurrency}   sessions lost {case.sessions_lost}   pool warnings {case.pool_warnings}",
        "   Consul by endpoint (per restart): "
        + ", ".join(f"{k} {v}" for k, v in sorted(case.consul_by_endpoint.items(), key=lambda kv: -kv[1])),
        "   Nomad by endpoint (per restart): "
        + ", ".join(f"{k} {v}" for k, v in sorted(case.nomad_by_endpoint.items(), key=lambda kv: -kv[1])),
    ]
    lines += [f"   note: {n}" for n in case.notes]
    return "\n".join(lines)


def _case(text: str) -> tuple[int, int]:
    n, _, c = text.lower().partition("x")
    return int(n), int(c)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"N x c cases (default {DEFAULT_CASES})")
    parser.add_argument("--time-scale", type=float, default=10.0, help="cluster seconds per real second")
    parser.add_argument("--min-healthy-time", type=float, default=2.0, help="cluster seconds")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--profile", metavar="NxC", help="profile this case (cProfile, every thread)")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # the recorder lowers some loggers to INFO
    results = []
    report = ""
    for text in args.cases.split(","):
        n, c = _case(text)
        profile = (
            cProfile.Profile(time.thread_time) if args.profile and _case(args.profile) == (n, c) else None
        )
        case = run_case(
            n,
            c,
            time_scale=args.time_scale,
            min_healthy_time=args.min_healthy_time,
            seed=args.seed,
            profile=profile,
        )
        print(show(case), flush=True)
        results.append(case)
        if profile is not None:
            report = profile_report(profile, args.top)
            print(report)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "time_scale": args.time_scale,
                    "min_healthy_time": args.min_healthy_time,
                    "targets": TARGETS,
                    "cases": [asdict(r) for r in results],
                    "profile": report,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
