"""shepard.nomad.gc: check mode is a dry run; results; a failed pass fails the module."""

from __future__ import annotations

from ansible_collections.shepard.nomad.plugins.module_utils import shepard as module_utils
from ansible_collections.shepard.nomad.plugins.modules import gc
from shepard_lib.gc import GCReport, GCScope


def test_check_mode_is_a_dry_run_and_options_reach_the_library(run_module, monkeypatch):
    calls = []

    def collect(consul, nomad, config, **kwargs):
        calls.append(kwargs)
        return GCReport(scope=GCScope(kwargs["scope"]), dry_run=kwargs["dry_run"])

    monkeypatch.setattr(module_utils, "collect_garbage", collect)
    result = run_module(gc, {"scope": "node", "node": "client-7"}, check_mode=True)
    assert calls[0]["scope"] == "node" and calls[0]["node"] == "client-7" and calls[0]["dry_run"] is True
    assert calls[0]["name"] == "ansible shepard.nomad.gc"
    assert result["changed"] is False
    assert result["report"]["dry_run"] is True
    assert "skipped" not in result["report"] and result["report"]["skipped_keys"] == {}


def test_a_pass_that_could_not_ask_nomad_fails_with_its_reason(run_module, monkeypatch):
    def collect(consul, nomad, config, **kwargs):
        report = GCReport(scope=GCScope.CLUSTER, dry_run=False)
        report.error = "nomad jobs.list failed: 500 Internal Server Error: nothing deleted"
        return report

    monkeypatch.setattr(module_utils, "collect_garbage", collect)
    result = run_module(gc, {})
    assert result["failed"] is True
    assert result["msg"] == "nomad jobs.list failed: 500 Internal Server Error: nothing deleted"
    assert result["changed"] is False


def test_node_without_scope_node_fails(run_module):
    result = run_module(gc, {"node": "client-7"})
    assert result["failed"] is True and result["msg"] == "node is only used with scope=node"


def test_an_unknown_scope_fails(run_module):
    result = run_module(gc, {"scope": "everything"})
    assert result["failed"] is True and "scope" in result["msg"]
