"""pytest fixtures for testing against a simulated Consul + Nomad cluster.

Installed as the ``shepard_sim`` plugin (entry point ``pytest11``), so any project with Shepard
installed can use them to test its own playbooks and tooling:

``sim_cluster_factory``
    ``sim_cluster_factory(scenario=None, time_scale=20.0, **kwargs) -> SimCluster``: a started
    cluster for a scenario (dict, YAML path or :class:`Scenario`; default the small scenario).
    Every cluster it made is closed at teardown.
``sim_cluster``
    A started cluster of the small scenario (3 nodes, job ``web`` with 3 allocations) at time
    scale 20.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from shepard_lib.sim.cluster import SimCluster
    from shepard_lib.sim.scenario import Scenario

# The plugin loads in every pytest run of an environment with Shepard installed: the simulator is
# imported only when a fixture is used, so a broken import cannot break unrelated test sessions.

SimClusterFactory = Callable[..., "SimCluster"]

DEFAULT_TIME_SCALE = 20.0


@pytest.fixture
def sim_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimClusterFactory]:
    """Make started :class:`SimCluster` instances; all are closed at teardown."""
    from shepard_lib.sim.cluster import SimCluster
    from shepard_lib.sim.scenario import small_scenario

    made: list[SimCluster] = []

    def make(
        scenario: Scenario | Mapping[str, Any] | str | Path | None = None,
        time_scale: float = DEFAULT_TIME_SCALE,
        **kwargs: Any,
    ) -> SimCluster:
        kwargs.setdefault("data_dir", tmp_path_factory.mktemp("sim-nomad"))
        cluster = SimCluster.from_scenario(scenario or small_scenario(), time_scale=time_scale, **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in reversed(made):
        cluster.close()


@pytest.fixture
def sim_cluster(sim_cluster_factory: SimClusterFactory) -> SimCluster:
    """A started cluster of the small default scenario."""
    return sim_cluster_factory()
