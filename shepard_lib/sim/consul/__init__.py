"""Simulated Consul: the state machine (:class:`ConsulState`) and its HTTP API (:class:`ConsulServer`).

The sim follows Consul's own source and API docs for the endpoints Shepard uses (KV with blocking
queries, sessions and locks, ``/v1/txn``, health, catalog, agent, status); each module names what
it mirrors. Usage::

    clock = Clock(scale=50)                       # shared with the code under test
    state = ConsulState(clock, seed=1)            # the datacenter; the Nomad sim drives it in-process
    state.register_node("client-1", "10.0.0.11")
    with ConsulServer(state) as consul:           # http://127.0.0.1:<free port>
        client = consul_client(consul.address)    # python-consul2, python-consul, curl...
        consul.faults.error_rate = 0.05           # 5 % of requests answer 500
        consul.faults.pause_session_renewals(session_id)

Times are cluster seconds on ``clock`` (TTLs, lock-delays, ``?wait=``, injected latency).
"""

from shepard_lib.sim.consul.faults import Fault, Faults
from shepard_lib.sim.consul.server import ConsulServer
from shepard_lib.sim.consul.state import ConsulState

__all__ = ["ConsulServer", "ConsulState", "Fault", "Faults"]
