"""shepard.nomad.template_info: the library's exact text; a bad prefix fails naming it."""

from __future__ import annotations

from ansible_collections.shepard.nomad.plugins.modules import template_info
from shepard_lib.keyspace import nomad_template_block, shepard_template


def test_default_prefix(run_module):
    result = run_module(template_info, {})
    assert result["template"] == shepard_template("shepard")
    assert result["template_block"] == nomad_template_block("shepard")
    assert (result["destination"], result["changed"]) == ("local/shepard.tpl", False)


def test_a_prefix_consul_cannot_hold_fails_naming_the_option(run_module):
    result = run_module(template_info, {"prefix": "bad prefix/"})
    assert result["failed"] is True
    assert result["msg"].startswith("prefix: ")


def test_connection_options_are_not_taken(run_module):
    result = run_module(template_info, {"consul_address": "http://x:8500"})
    assert result["failed"] is True and "Unsupported parameters" in result["msg"]
