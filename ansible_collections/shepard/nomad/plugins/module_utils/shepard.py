# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""What every shepard.nomad module shares: the connection options, the configuration they make,
the Consul and Nomad clients, and turning Shepard's errors into ``fail_json``.

Modules stay thin: they declare their own options, build a :class:`ShepardModule`, call
``shepard_lib`` inside :meth:`ShepardModule.library_errors` and return its ``to_dict()`` results.
No protocol logic lives here; a new module (such as ``gc`` or ``job_check_info``) needs only its
own options and one library call, made with :meth:`ShepardModule.backends` or
:meth:`ShepardModule.rolling_restart`.
"""

from __future__ import annotations

import contextlib
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from shepard_lib.backends.consul import ConsulBackend
    from shepard_lib.backends.nomad import NomadBackend
    from shepard_lib.clock import Clock
    from shepard_lib.config import load_config, parse_duration
    from shepard_lib.errors import ShepardError
    from shepard_lib.rollout import RollingRestart
except ImportError:
    SHEPARD_IMPORT_ERROR = traceback.format_exc()
else:
    SHEPARD_IMPORT_ERROR = None

CONNECTION_ARGUMENT_SPEC = {
    "config_file": {"type": "path"},
    "consul_address": {"type": "str"},
    "consul_token": {"type": "str", "no_log": True},
    "consul_ca_file": {"type": "path"},
    "consul_client_cert": {"type": "path"},
    "consul_client_key": {"type": "path"},
    "nomad_address": {"type": "str"},
    "nomad_token": {"type": "str", "no_log": True},
    "nomad_namespace": {"type": "str"},
    "nomad_region": {"type": "str"},
    "nomad_ca_file": {"type": "path"},
    "validate_certs": {"type": "bool"},
}
"""The options of the ``shepard.nomad.connection`` doc fragment. No ``env_fallback``: Shepard's
own configuration loader reads the same environment variables, below the configuration file."""

_CONFIG_KEYS = {
    "consul_address": ("consul.address",),
    "consul_token": ("consul.token",),
    "consul_ca_file": ("consul.ca_file",),
    "consul_client_cert": ("consul.cert_file",),
    "consul_client_key": ("consul.key_file",),
    "nomad_address": ("nomad.address",),
    "nomad_token": ("nomad.token",),
    "nomad_namespace": ("nomad.namespace",),
    "nomad_region": ("nomad.region",),
    "nomad_ca_file": ("nomad.ca_file",),
    "validate_certs": ("consul.verify", "nomad.verify"),
}


class ShepardModule:
    """An AnsibleModule with the connection options, failing cleanly when shepard_lib is missing."""

    def __init__(self, argument_spec, connection=True, **kwargs):
        spec = dict(CONNECTION_ARGUMENT_SPEC) if connection else {}
        spec.update(argument_spec)
        self.module = AnsibleModule(argument_spec=spec, **kwargs)
        self.params = self.module.params
        if SHEPARD_IMPORT_ERROR is not None:
            self.module.fail_json(msg=missing_required_lib("shepard"), exception=SHEPARD_IMPORT_ERROR)

    def fail(self, msg, **result):
        """``fail_json``."""
        self.module.fail_json(msg=msg, **result)

    def exit(self, **result):
        """``exit_json``."""
        self.module.exit_json(**result)

    @contextlib.contextmanager
    def library_errors(self):
        """Turn a Shepard error (bad configuration, Consul or Nomad refusing, a plan that cannot
        change) into ``fail_json`` with Shepard's message, which never holds a token."""
        try:
            yield
        except ShepardError as exc:
            self.module.fail_json(msg=str(exc), error=type(exc).__name__)

    def config(self):
        """The effective Shepard configuration: these options over the file over the environment."""
        overrides = {}
        for option, keys in _CONFIG_KEYS.items():
            for key in keys:
                overrides[key] = self.params.get(option)
        with self.library_errors():
            return load_config(self.params.get("config_file"), overrides=overrides)

    def duration(self, option):
        """Seconds in the Go duration string of ``option`` (None when unset); fails naming the option."""
        value = self.params.get(option)
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.module.fail_json(msg=f"{option}: {exc}")

    @contextlib.contextmanager
    def backends(self, config=None):
        """``(consul, nomad, clock)`` for ``config`` (default :meth:`config`), closed on exit."""
        config = config or self.config()
        clock = Clock(config.time_scale)
        consul = ConsulBackend(config.consul, clock)
        nomad = NomadBackend(config.nomad, clock)
        try:
            yield consul, nomad, clock
        finally:
            consul.close()
            nomad.close()

    @contextlib.contextmanager
    def rolling_restart(self, name, config=None, observer=None):
        """A :class:`shepard_lib.rollout.RollingRestart` named ``ansible <name>`` in plans and slot
        values (``name``: the module's), closed on exit."""
        config = config or self.config()
        with self.backends(config) as (consul, nomad, clock):
            yield RollingRestart(
                consul, nomad, config, clock=clock, observer=observer, name=f"ansible {name}"
            )


def rollout_result(result):
    """A :class:`shepard_lib.rollout.RolloutResult` as module results, and its warnings.

    ``failed`` and ``skipped`` are Ansible's own result keys (a truthy ``skipped`` would mark the task
    skipped), so the allocation lists are ``restarted_allocations``, ``failed_allocations`` and
    ``skipped_allocations``.
    """
    data = result.to_dict()
    warnings = data.pop("warnings")
    for kind in ("restarted", "failed", "skipped"):
        data[f"{kind}_allocations"] = data.pop(kind)
    return data, warnings
