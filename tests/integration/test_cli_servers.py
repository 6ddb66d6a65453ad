"""Pointing Shepard at the wrong server, the wrong clock or without a token: said at once, as a usage error.

Through the real console script against the simulator (sim-only: real clusters send no time scale,
and their ACL policies vary).
"""

from __future__ import annotations

import socket

import pytest
import requests
from support import Console, client_env

from shepard_lib.sim.cluster import SimCluster
from shepard_lib.sim.pytest_plugin import SimClusterFactory

TOKEN = "servers-acl-token-8c1d"


def _shepard(*args: str, **env: str) -> tuple[int, str, str]:
    return Console(*args, env=client_env(**env)).finish()


def test_consul_address_naming_the_nomad_port_is_a_usage_error_naming_the_fix(
    sim_cluster: SimCluster,
) -> None:
    code, out, err = _shepard(
        "status",
        CONSUL_HTTP_ADDR=sim_cluster.nomad_addr,
        NOMAD_ADDR=sim_cluster.nomad_addr,
        SHEPARD_TIME_SCALE="20",
    )
    assert code == 2, (code, out, err)
    assert "no restart plans" not in out
    assert f"{sim_cluster.nomad_addr} is not a Consul agent" in err and "not Nomad's (4646)" in err, err
    assert "Traceback" not in err


def test_an_acl_cluster_without_a_token_is_an_error_not_an_empty_answer(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(time_scale=20, acl_token=TOKEN)
    requests.put(
        f"{sim.consul_addr}/v1/kv/shepard/locks/web/app/server/task_lock",
        data=b"{}",
        headers={"X-Consul-Token": TOKEN},
        timeout=10,
    ).raise_for_status()
    env = {"CONSUL_HTTP_ADDR": sim.consul_addr, "NOMAD_ADDR": sim.nomad_addr, "SHEPARD_TIME_SCALE": "20"}
    code, out, err = _shepard("status", **env)
    assert code == 2, (code, out, err)
    assert "no restart plans" not in out
    assert "hid keys of shepard/locks/ from Shepard's ACL token" in err and "CONSUL_HTTP_TOKEN" in err, err

    code, out, err = _shepard("status", **env, CONSUL_HTTP_TOKEN=TOKEN)
    assert code == 0, (code, out, err)
    assert "web/app/server" in out


@pytest.mark.parametrize("command", [["restart", "web"], ["status"]])
def test_a_time_scale_other_than_the_sims_stops_at_once_naming_the_scale_to_use(
    sim_cluster: SimCluster, command: list[str]
) -> None:
    env = {"CONSUL_HTTP_ADDR": sim_cluster.consul_addr, "NOMAD_ADDR": sim_cluster.nomad_addr}
    code, out, err = _shepard(*command, **env)
    assert code == 2, (code, out, err)
    assert "time scale 20, but Shepard's time_scale is 1" in err and "SHEPARD_TIME_SCALE=20" in err, err
    assert sim_cluster.restarts() == []


def test_an_unreachable_consul_is_one_warning_and_one_error_in_shepards_words() -> None:
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        code, out, err = _shepard("status", CONSUL_HTTP_ADDR=address)
    assert code == 1, (code, out, err)
    lines = err.splitlines()
    assert len([line for line in lines if "retrying" in line]) == 1, err
    unreachable = f"cannot reach Consul at {address}: connection refused"
    assert lines[-1] == f"shepard: consul kv.keys shepard/locks/ failed: {unreachable}", err
    for internal in ("HTTPConnectionPool", "NewConnectionError", "Max retries", "urllib3", "Traceback"):
        assert internal not in err, err


def test_a_dry_run_never_reads_absent_from_the_wrong_server_or_without_a_token(
    sim_cluster_factory: SimClusterFactory,
) -> None:
    sim = sim_cluster_factory(time_scale=20, acl_token=TOKEN)
    env = {"NOMAD_ADDR": sim.nomad_addr, "NOMAD_TOKEN": TOKEN, "SHEPARD_TIME_SCALE": "20"}
    code, out, err = _shepard("restart", "web", "--dry-run", **env, CONSUL_HTTP_ADDR=sim.consul_addr)
    assert (code, out) == (1, ""), (code, out, err)
    assert "HTTP 403" in err and "key:read" in err and TOKEN not in err, err

    code, out, err = _shepard("restart", "web", "--dry-run", **env, CONSUL_HTTP_ADDR=sim.nomad_addr)
    assert (code, out) == (2, ""), (code, out, err)
    assert "is not a Consul agent" in err, err
