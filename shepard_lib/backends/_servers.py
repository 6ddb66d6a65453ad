"""Is the server the one the configuration meant? Checks on every answer, cheap enough to run each time.

- A simulated cluster (``shepard sim serve``) tells its time scale in ``X-Shepard-Sim-Time-Scale``;
  a Shepard whose clock runs at another speed would see every TTL and health time wrong, so the
  first answer stops it with the fix (``SHEPARD_TIME_SCALE``) instead of a rollout that fails late.
- Consul answers every KV read, found or not, with ``X-Consul-Index``; a 404 without it comes from
  something else (typically ``CONSUL_HTTP_ADDR`` naming the Nomad port), not from a missing key.
- Consul removes what the token may not read from a listing and says so in
  ``X-Consul-Results-Filtered-By-ACLs: true``: such an empty answer means "not allowed", not "nothing there".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from shepard_lib.clock import SIM_TIME_SCALE_HEADER, Clock
from shepard_lib.errors import ConfigError

__all__ = ["check_consul_kv_answer", "check_time_scale"]

FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"


def check_time_scale(service: str, address: str, headers: Mapping[str, str], clock: Clock) -> None:
    """ConfigError when ``headers`` come from a simulator whose clock runs at another speed than ``clock``."""
    raw = headers.get(SIM_TIME_SCALE_HEADER)
    if raw is None:
        return
    try:
        theirs = float(raw)
    except ValueError:
        return
    if math.isclose(theirs, clock.scale, rel_tol=1e-9):
        return
    raise ConfigError(
        f"{service} at {address} is a Shepard simulator whose clock runs at time scale {theirs:g}, "
        f"but Shepard's time_scale is {clock.scale:g}: every TTL and health time would be wrong. "
        f"Run with SHEPARD_TIME_SCALE={theirs:g} (or `time_scale: {theirs:g}` in the config file)"
    )


def check_consul_kv_answer(address: str, status: int, headers: Mapping[str, str], what: str) -> None:
    """ConfigError when a KV answer is not Consul's, or is a listing the ACL token was not allowed to see."""
    if status == 404 and "X-Consul-Index" not in headers:
        raise ConfigError(
            f"{address} is not a Consul agent: it answered a KV read (HTTP {status}) without Consul's "
            "X-Consul-Index header. Point CONSUL_HTTP_ADDR (or consul.address) at Consul's HTTP port "
            "(8500), not Nomad's (4646)"
        )
    if str(headers.get(FILTERED_HEADER, "")).lower() == "true":
        raise ConfigError(
            f"Consul at {address} hid keys of {what} from Shepard's ACL token "
            f"({FILTERED_HEADER}); set CONSUL_HTTP_TOKEN (or consul.token / consul.token_file) "
            "to a token that may read and write Shepard's key_prefix"
        )
