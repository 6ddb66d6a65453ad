"""``shepard demo``: the thundering herd and Shepard side by side, on an embedded simulated cluster.

:func:`run_demo` runs one job through the same config change under Nomad alone, Nomad's splay, and
Shepard's agents, then with a bad config value under Nomad alone and under Shepard, and measures
each run from the simulator's restart record (:mod:`shepard_lib.demo.timeline`).
"""

from shepard_lib.demo.runner import RUNS, DemoOptions, RunResult, RunSpec, Snapshot, run_demo, run_once

__all__ = ["RUNS", "DemoOptions", "RunResult", "RunSpec", "Snapshot", "run_demo", "run_once"]
