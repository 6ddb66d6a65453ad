"""Log shipping: the task logs of this node's allocations, tagged, checkpointed, to one or more sinks.

``LogShipper(cfg, allocations_source).ship_once()`` is the entry point (see :mod:`.shipper`);
:class:`NodeAllocations` is the allocations source backed by Nomad. Modules: :mod:`.tailer`
(reading logmon's files), :mod:`.checkpoints`, :mod:`.tags`, :mod:`.records`, :mod:`.sinks`,
:mod:`.metrics`.
"""

from shepard_lib.logship.metrics import MetricSample, ShipperMetrics
from shepard_lib.logship.shipper import AllocationsSource, LogShipper, RetryPolicy, ShipReport, SinkReport
from shepard_lib.logship.source import NodeAllocations

__all__ = [
    "AllocationsSource",
    "LogShipper",
    "MetricSample",
    "NodeAllocations",
    "RetryPolicy",
    "ShipReport",
    "ShipperMetrics",
    "SinkReport",
]
