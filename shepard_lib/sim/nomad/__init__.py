"""The simulated Nomad: servers' state, one client agent per node, and the HTTP API."""

from shepard_lib.sim.nomad.api import NomadFaults, NomadServer
from shepard_lib.sim.nomad.client import ClientError, SignalRecord
from shepard_lib.sim.nomad.restarts import RestartRecord, makespan, peak_concurrency
from shepard_lib.sim.nomad.sim import NomadSim

__all__ = [
    "ClientError",
    "NomadFaults",
    "NomadServer",
    "NomadSim",
    "RestartRecord",
    "SignalRecord",
    "makespan",
    "peak_concurrency",
]
