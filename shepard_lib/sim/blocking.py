"""How long a simulated blocking query may wait: one rule for both simulated servers.

Consul (``agent/consul/rpc.go`` ``blockingQuery``, config defaults ``default_query_time = 300s``,
``max_query_time = 600s``) and Nomad (``nomad/rpc.go`` ``blockingRPC``: ``defaultQueryTime`` and
``maxQueryTime`` both ``300 * time.Second``) apply the same steps: a missing or non-positive
``?wait`` becomes the default, a longer one is clamped to the maximum, and then
``lib.RandomStagger(wait / JitterFraction)`` (``JitterFraction = 16`` in both) adds up to
wait/16. Only the maximum differs: 10 minutes for Consul, 5 for Nomad.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["CONSUL_WAIT", "NOMAD_WAIT", "WaitRule", "blocking_wait"]


@dataclass(frozen=True)
class WaitRule:
    """A server's blocking-query limits, in cluster seconds."""

    default: float
    maximum: float
    jitter_fraction: int = 16


CONSUL_WAIT = WaitRule(default=300.0, maximum=600.0)
NOMAD_WAIT = WaitRule(default=300.0, maximum=300.0)


def blocking_wait(wait: float, rule: WaitRule, rng: random.Random) -> float:
    """Cluster seconds a blocking query asked to wait ``wait`` (0: not given) may block.

    ``rng`` is the server's seeded generator, so a seeded run draws the same staggers.
    (``random.Random`` methods are atomic, so server threads may share one.)
    """
    if wait <= 0:
        wait = rule.default
    wait = min(wait, rule.maximum)
    return wait + rng.uniform(0, wait / rule.jitter_fraction)
