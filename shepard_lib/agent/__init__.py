"""The per-node Shepard agent (docs/design.md section 5).

:class:`Agent` watches the allocation directories of one Nomad client node and turns "a template
re-rendered on this node" into a coordinated, health-gated restart through the coordination core.
Its parts, one module each: :mod:`.discovery` (which allocations and tasks), :mod:`.watcher` and
:mod:`.inotify` (their files), :mod:`.rollouts` (one worker per task), :mod:`.periodic` (GC and log
shipping schedules), :mod:`.metrics` (Prometheus, ``/health``, ``/ready``), :mod:`.daemon` (the
``shepard agent`` process: signals, reload, exit codes) and :mod:`.unit` (the systemd unit).
"""

from shepard_lib.agent.agent import Agent
from shepard_lib.agent.periodic import PeriodicJob

__all__ = ["Agent", "PeriodicJob"]
