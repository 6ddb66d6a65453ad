"""What ``shepard restart`` tells a person or a log collector, through the real console script.

With ``--log-format json`` every stderr line is a JSON object (progress included); times shown
to a person are wall-clock times, even when the cluster's clock runs 20 times faster.
Sim-only: a sped-up clock.
"""

from __future__ import annotations

import datetime
import json
import re
import time

from support import Console, client_env

from shepard_lib.sim.cluster import SimCluster


def _env(sim: SimCluster) -> dict[str, str]:
    return client_env(CONSUL_HTTP_ADDR=sim.consul_addr, NOMAD_ADDR=sim.nomad_addr, SHEPARD_TIME_SCALE="20")


def test_log_format_json_gives_only_json_lines_on_stderr_progress_included(sim_cluster: SimCluster) -> None:
    code, out, err = Console("--log-format", "json", "restart", "web", env=_env(sim_cluster)).finish()
    assert code == 0, err
    records = []
    for line in err.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line on stderr: {line!r}") from None
    progress = [r["message"] for r in records if r["logger"] == "shepard_lib.progress"]
    assert len([m for m in progress if m.endswith(" restarted")]) == 3, progress
    assert "3 restarted, 0 failed, 0 skipped" in out


def test_times_shown_are_wall_clock_times_even_on_a_sped_up_cluster(sim_cluster: SimCluster) -> None:
    before = datetime.datetime.now()
    started = time.monotonic()
    code, out, err = Console("restart", "web", env=_env(sim_cluster)).finish()
    took = time.monotonic() - started
    after = datetime.datetime.now()
    assert code == 0, err
    match = re.search(
        r"skipped in ([\d.]+)s \(peak concurrency \d+; ([\d.]+)s of cluster time at time scale 20\)", out
    )
    assert match, out
    assert float(match.group(1)) <= took + 0.1, (
        f"the summary says {match.group(1)}s, the command took {took:.1f}s"
    )
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ INFO shepard_lib.progress: ", err, flags=re.M)
    assert stamps, err
    for stamp in stamps:  # progress lines carry the wall-clock time, not the cluster's (20x ahead)
        at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        assert before.replace(microsecond=0) <= at <= after, f"{stamp} is outside the run ({before}..{after})"


def test_json_output_labels_cluster_and_wall_durations(sim_cluster: SimCluster) -> None:
    started = time.monotonic()
    code, out, err = Console("restart", "web", "--output", "json", env=_env(sim_cluster)).finish()
    took = time.monotonic() - started
    assert code == 0, err
    result = json.loads(out)
    assert 0 < result["wall_duration"] <= took, (result["wall_duration"], took)
    assert result["duration"] > result["wall_duration"], "the cluster's clock runs 20 times faster"
