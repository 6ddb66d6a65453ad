"""Simulated Consul and Nomad cluster speaking the real HTTP APIs on loopback.

:class:`SimCluster` runs both from a scenario (:func:`load_scenario`); the Nomad half simulates
client agents that render templates from Consul into real allocation directories, restart tasks,
write logs and register services, and it records every restart (:class:`RestartRecord`).
"""

from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.nomad import (
    ClientError,
    NomadFaults,
    NomadServer,
    NomadSim,
    RestartRecord,
    SignalRecord,
    makespan,
    peak_concurrency,
)
from shepard_lib.sim.scenario import Scenario, ScenarioError, load_scenario, parse_duration, small_scenario

__all__ = [
    "ClientError",
    "NomadFaults",
    "NomadServer",
    "NomadSim",
    "RestartRecord",
    "Scenario",
    "ScenarioError",
    "SignalRecord",
    "SimCluster",
    "load_scenario",
    "makespan",
    "parse_duration",
    "peak_concurrency",
    "small_scenario",
]
