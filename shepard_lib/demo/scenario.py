"""The demo's cluster: one job of ``allocations`` instances over ``nodes`` nodes, wired for one mode.

Every mode runs the same job, timing and change; only the templates differ:

- ``uncoordinated``: the config template has ``change_mode = "restart"`` (what Nomad does today);
- ``splay``: the same, with Nomad's ``splay``;
- ``shepard``: the config template is ``noop`` and ``local/shepard.tpl`` restarts the task when
  Shepard writes its trigger key.

A ``bad`` config value (``BAD_VALUE``) makes the task fail its health check after the restart.
"""

from __future__ import annotations

import enum
from typing import Any

CONFIG_KEY = "config/web"
GOOD_VALUES = ("v1", "v2")
BAD_VALUE = "broken"
JOB = "web"
GROUP = "app"
TASK = "server"


class Mode(enum.StrEnum):
    """How the job's config template reacts to a change."""

    UNCOORDINATED = "uncoordinated"
    SPLAY = "splay"
    SHEPARD = "shepard"

    @property
    def coordinated(self) -> bool:
        """Shepard's agents decide when the tasks restart."""
        return self is Mode.SHEPARD


def demo_scenario(mode: Mode, *, allocations: int, nodes: int, splay: float, seed: int = 7) -> dict[str, Any]:
    """The scenario dict of the demo cluster for ``mode`` (see :mod:`shepard_lib.sim.scenario`)."""
    config_template: dict[str, Any] = {
        "key": CONFIG_KEY,
        "destination": "local/app.conf",
        "change_mode": "noop" if mode.coordinated else "restart",
    }
    if mode is Mode.SPLAY:
        config_template["splay"] = f"{splay:g}s"
    return {
        "seed": seed,
        "nodes": nodes,
        "jobs": [
            {
                "name": JOB,
                "groups": [
                    {
                        "name": GROUP,
                        "count": allocations,
                        "tasks": [
                            {
                                "name": TASK,
                                "shepard": mode.coordinated,
                                "templates": [config_template],
                                "service": JOB,
                                "unhealthy_if": {"key": CONFIG_KEY, "equals": BAD_VALUE},
                            }
                        ],
                    }
                ],
            }
        ],
        "timing": {"restart": {"lognormal": {"median": "3s", "sigma": 0.3}}, "healthy_after": "2s"},
        "keys": {CONFIG_KEY: GOOD_VALUES[0]},
    }
