"""The agent's systemd unit: one source of truth, the package data file ``data/shepard-agent.service``.

:func:`render_unit` fills in the user, group, config path, virtualenv, Nomad data dir and stop
timeout; the output depends on nothing else, so an installer (the Ansible role runs
``shepard agent --print-unit ...``) gets the same file every time. Values that would break the
unit (a relative path, whitespace, a newline, a user name systemd rejects) raise ValueError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["UnitOptions", "render_unit"]

_USER = re.compile(r"[a-zA-Z_][a-zA-Z0-9_-]{0,30}\$?")


@dataclass(frozen=True)
class UnitOptions:
    """What ``shepard agent --print-unit`` takes; every path absolute, without whitespace."""

    user: str = "shepard"
    group: str | None = None  # default: the user's name
    config: str = "/etc/shepard/shepard.yaml"
    venv: str = "/opt/shepard/venv"
    data_dir: str = "/opt/nomad/data"
    stop_timeout: int = 60


def _path(flag: str, value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value) or "%" in value:
        raise ValueError(f"{flag}: expected an absolute path without whitespace or '%', got {value!r}")
    return value.rstrip("/") or "/"


def render_unit(options: UnitOptions) -> str:
    """The unit file text for ``options``."""
    for flag, name in (("--user", options.user), ("--group", options.group or options.user)):
        if not _USER.fullmatch(name):
            raise ValueError(f"{flag}: not a valid user or group name: {name!r}")
    if options.stop_timeout < 1:
        raise ValueError(f"--stop-timeout: expected seconds >= 1, got {options.stop_timeout}")
    template = resources.files("shepard_lib.agent").joinpath("data/shepard-agent.service").read_text("utf-8")
    return template.format(
        user=options.user,
        group=options.group or options.user,
        config=_path("--config-path", options.config),
        venv=_path("--venv", options.venv),
        data_dir=_path("--nomad-data-dir", options.data_dir),
        stop_timeout=f"{options.stop_timeout}s",
    )
