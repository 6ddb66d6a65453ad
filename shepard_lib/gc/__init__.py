"""Garbage collection of Shepard's Consul keys, safe on a live cluster (docs/design.md section 6).

::

    report = collect_garbage(consul, nomad, cfg, scope="cluster", dry_run=True)
    print(report.deleted_by_rule(), report.skipped_by_reason())

:mod:`.planner` decides (pure), :mod:`.executor` deletes (``delete-cas`` in transactions of at most
64 ops), :mod:`.collect` runs one pass, :mod:`.report` holds the outcome.
"""

from .collect import collect_garbage
from .executor import MAX_TXN_OPS
from .report import Deletion, Failure, GCReport, GCScope, Rule, Skip, SkipReason

__all__ = [
    "MAX_TXN_OPS",
    "Deletion",
    "Failure",
    "GCReport",
    "GCScope",
    "Rule",
    "Skip",
    "SkipReason",
    "collect_garbage",
]
