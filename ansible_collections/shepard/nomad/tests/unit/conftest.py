"""Run a module's ``main()`` in-process with given arguments and catch its exit_json / fail_json."""

from __future__ import annotations

import json

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args


class ModuleExit(Exception):
    """exit_json or fail_json was called; ``result`` holds its arguments (``failed`` for fail_json)."""

    def __init__(self, result):
        super().__init__(json.dumps(result, default=str))
        self.result = result


def _exit_json(self, **result):  # pylint: disable=unused-argument
    raise ModuleExit(result)


def _fail_json(self, msg, **result):  # pylint: disable=unused-argument
    raise ModuleExit(dict(result, msg=msg, failed=True))


@pytest.fixture
def run_module(monkeypatch):
    """``run_module(module, args, check_mode=False)``: the module's result dict."""
    monkeypatch.setattr(basic.AnsibleModule, "exit_json", _exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", _fail_json)
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "NOMAD_ADDR", "NOMAD_TOKEN", "SHEPARD_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)

    def run(module, args, check_mode=False):
        args = dict(args, _ansible_check_mode=check_mode)
        with patch_module_args(args), pytest.raises(ModuleExit) as caught:
            module.main()
        return caught.value.result

    return run
