"""module_utils/shepard.py: the connection options become Shepard's configuration; errors become fail_json."""

from __future__ import annotations

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.shepard.nomad.plugins.module_utils import shepard as module_utils
from shepard_lib.errors import ConsulError


def _module(args):
    with patch_module_args(args):
        return module_utils.ShepardModule({}, supports_check_mode=True)


def test_options_win_over_the_config_file_which_wins_over_the_environment(tmp_path, monkeypatch):
    config = tmp_path / "shepard.yaml"
    config.write_text("consul: {address: 'http://file:8500'}\nnomad: {address: 'http://file:4646'}\n")
    monkeypatch.setenv("NOMAD_ADDR", "http://env:4646")
    monkeypatch.setenv("NOMAD_NAMESPACE", "from-env")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    shepard = _module({"config_file": str(config), "consul_address": "http://option:8500", "validate_certs": False})
    cfg = shepard.config()
    assert cfg.consul.address == "http://option:8500"
    assert cfg.nomad.address == "http://file:4646"
    assert cfg.nomad.namespace == "from-env"
    assert cfg.consul.token == "env-token"
    assert (cfg.consul.verify, cfg.nomad.verify) == (False, False)


def test_every_connection_option_reaches_the_configuration(tmp_path):
    files = {name: tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem", "nomad-ca.pem")}
    for path in files.values():
        path.write_text("pem")
    shepard = _module(
        {
            "consul_address": "https://consul:8501",
            "consul_token": "ct",
            "consul_ca_file": str(files["ca.pem"]),
            "consul_client_cert": str(files["cert.pem"]),
            "consul_client_key": str(files["key.pem"]),
            "nomad_address": "https://nomad:4646",
            "nomad_token": "nt",
            "nomad_namespace": "apps",
            "nomad_region": "eu",
            "nomad_ca_file": str(files["nomad-ca.pem"]),
        }
    )
    cfg = shepard.config()
    assert (cfg.consul.token, cfg.consul.ca_file, cfg.consul.cert_file, cfg.consul.key_file) == (
        "ct", str(files["ca.pem"]), str(files["cert.pem"]), str(files["key.pem"])
    )
    assert (cfg.nomad.address, cfg.nomad.token, cfg.nomad.namespace, cfg.nomad.region, cfg.nomad.ca_file) == (
        "https://nomad:4646", "nt", "apps", "eu", str(files["nomad-ca.pem"])
    )


def test_tokens_are_no_log_options():
    assert module_utils.CONNECTION_ARGUMENT_SPEC["consul_token"]["no_log"] is True
    assert module_utils.CONNECTION_ARGUMENT_SPEC["nomad_token"]["no_log"] is True


def test_a_bad_configuration_fails_with_shepards_problems(run_module, tmp_path):
    config = tmp_path / "shepard.yaml"
    config.write_text("concurrency: 0\nsession_ttl: fast\n")
    from ansible_collections.shepard.nomad.plugins.modules import restart_status_info

    result = run_module(restart_status_info, {"config_file": str(config)})
    assert result["failed"] is True and result["error"] == "ConfigError"
    assert "concurrency" in result["msg"] and "session_ttl" in result["msg"]


def test_a_library_error_becomes_fail_json_with_its_message(monkeypatch):
    shepard = _module({})
    failed = {}
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", lambda self, msg, **kw: failed.update(msg=msg, **kw))
    with shepard.library_errors():
        raise ConsulError("kv.get shepard/locks/", "connection refused", transient=True)
    assert failed == {"msg": "consul kv.get shepard/locks/ failed: connection refused", "error": "ConsulError"}


def test_without_shepard_lib_the_module_fails_with_missing_required_lib(monkeypatch):
    monkeypatch.setattr(module_utils, "SHEPARD_IMPORT_ERROR", "Traceback: No module named 'shepard_lib'")
    failed = {}

    def fail_json(self, msg, **kw):
        failed.update(msg=msg, **kw)
        raise SystemExit(1)

    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    with pytest.raises(SystemExit):
        _module({})
    assert "Failed to import the required Python library (shepard)" in failed["msg"]
    assert failed["exception"].startswith("Traceback")
