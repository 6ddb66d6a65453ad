#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Ansible module shepard.nomad.gc."""

from __future__ import annotations

DOCUMENTATION = r"""
module: gc
short_description: Delete Shepard's stale Consul keys, safely on a live cluster
version_added: 0.1.0
description:
  - Runs one garbage collection pass, as C(shepard gc) does, and returns its report; see the project's
    C(docs/design.md) section 6 for the rules.
  - The V(cluster) pass deletes the plans, restart slots and trigger keys of jobs that are gone or stopped,
    C(complete) plans older than C(gc_plan_retention), and the keys of nodes gone from Nomad or down longer
    than C(node_cleanup_timeout); it runs under Shepard's GC leader lock, so one pass runs at a time.
  - The V(node) pass deletes the trigger keys of one node whose allocation no longer runs there.
  - Every delete is a check-and-set on the index the scan read, so a key written meanwhile survives; keys held by a
    live session, plans with a restart in flight and keys Shepard does not recognise are never deleted; when Nomad
    cannot be asked (an error, a timeout, no known leader) nothing is deleted and the module fails.
author:
  - Shepard contributors (@shepard-nomad)
extends_documentation_fragment:
  - shepard.nomad.attributes
  - shepard.nomad.attributes.action_group
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.actiongroups
  - shepard.nomad.connection
attributes:
  check_mode:
    support: full
    details: A dry run; returns what would be deleted and writes nothing (not even the GC leader lock).
  diff_mode:
    support: none
options:
  scope:
    description: V(cluster) collects every rule on every key; V(node) the trigger keys of one node.
    type: str
    choices: [cluster, node]
    default: cluster
  node:
    description:
      - With O(scope=node), the node whose trigger keys to collect; default the C(node_name) of the configuration,
        else the node of the Nomad agent at O(nomad_address).
    type: str
"""

EXAMPLES = r"""
- name: Collect Shepard's stale keys once the old job is purged
  shepard.nomad.gc:
  register: gc

- name: What would go, changing nothing
  shepard.nomad.gc:
  check_mode: true
  register: would

- name: One node's trigger keys
  shepard.nomad.gc:
    scope: node
    node: client-07
"""

RETURN = r"""
report:
  description: The pass's report.
  returned: always
  type: dict
  contains:
    scope:
      description: V(cluster) or V(node).
      type: str
    node:
      description: The node of a V(node) pass, else V(null).
      type: str
    dry_run:
      description: Whether this was a dry run (check mode).
      type: bool
    scanned:
      description: Keys read under the prefix.
      type: int
    deleted_count:
      description: Keys deleted (in check mode, that would be deleted).
      type: int
    deleted_by_rule:
      description: Deleted keys counted by rule.
      type: dict
      sample: {"job_gone": 12, "alloc_gone": 3}
    skipped_by_reason:
      description: Stale-looking keys spared, counted by reason.
      type: dict
      sample: {"held": 1, "unknown_key": 2}
    deleted:
      description: Rule to the deleted keys, each with C(key) and C(why).
      type: dict
    skipped_keys:
      description: Reason to the spared keys, each with C(key) and C(why).
      type: dict
    failed_keys:
      description: Keys whose delete failed, each with C(key) and C(error).
      type: list
      elements: dict
"""

from ansible_collections.shepard.nomad.plugins.module_utils.shepard import ShepardModule, gc_report

ARGUMENT_SPEC = {
    "scope": {"type": "str", "choices": ["cluster", "node"], "default": "cluster"},
    "node": {"type": "str"},
}


def main():
    """Run the module."""
    shepard = ShepardModule(ARGUMENT_SPEC, supports_check_mode=True)
    params = shepard.params
    if params["node"] and params["scope"] != "node":
        shepard.fail("node is only used with scope=node")
    config = shepard.config()
    with shepard.library_errors(), shepard.backends(config) as (consul, nomad, clock):
        report = shepard.collect_garbage(
            consul,
            nomad,
            config,
            scope=params["scope"],
            node=params["node"],
            dry_run=shepard.module.check_mode,
            clock=clock,
        )
    data = gc_report(report)
    if not report.ok:
        shepard.fail(report.error or "some deletes failed", changed=bool(report.deleted), report=data)
    shepard.exit(changed=data["deleted_count"] > 0, report=data)


if __name__ == "__main__":
    main()
