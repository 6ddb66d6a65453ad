#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Ansible module shepard.nomad.restart_status_info."""

from __future__ import annotations

DOCUMENTATION = r"""
module: restart_status_info
short_description: Shepard's restart plans, their members and who holds their restart slots
version_added: 0.1.0
description:
  - Reads Shepard's restart plans from Consul (all of them, or those of one job, group or task) with
    each plan's members and the holders of its restart slots, as C(shepard status) shows them.
author:
  - Shepard contributors (@shepard-nomad)
extends_documentation_fragment:
  - shepard.nomad.attributes.info_module
  - shepard.nomad.attributes
  - shepard.nomad.attributes.action_group
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.actiongroups
  - shepard.nomad.connection
options:
  job:
    description: Only the plans of this job.
    type: str
  group:
    description: Only the plans of this task group.
    type: str
  task:
    description: Only the plans of this task.
    type: str
"""

EXAMPLES = r"""
- name: Wait until the web job's rollout has ended
  shepard.nomad.restart_status_info:
    job: web
  register: status
  until: status.plans | map(attribute='plan.status') | reject('equalto', 'planned') | list | length == status.plans | length
  retries: 60
  delay: 10

- name: Every plan in the cluster
  shepard.nomad.restart_status_info:
  register: all_plans
"""

RETURN = r"""
plans:
  description: One entry per plan.
  returned: always
  type: list
  elements: dict
  contains:
    key:
      description: The plan's Consul key.
      type: str
      sample: shepard/locks/web/app/server/task_lock
    job:
      description: Job of the plan.
      type: str
    group:
      description: Task group of the plan.
      type: str
    task:
      description: Task of the plan.
      type: str
    node:
      description: Node of the plan with C(lock_scope=node), else V(null).
      type: str
    plan:
      description:
        - The plan as stored (C(status) V(planned), V(complete), V(failed) or V(aborted), C(generation),
          C(concurrent_lock_count), C(max_failures), C(halt_reason), C(members) by allocation ID with
          their C(state)); V(null) if the value is not a readable plan.
      type: dict
    slot_holders:
      description: Restart slot number to the name of the participant holding it.
      type: dict
      sample: {"0": "ansible shepard.nomad.rolling_restart worker 0"}
    orphaned:
      description:
        - The plan is C(planned) with work left but nobody drives it (no live session holds a slot or a restarting
          member); M(shepard.nomad.restart_control) with O(shepard.nomad.restart_control#module:state=resumed) drives it.
      type: bool
"""

from ansible_collections.shepard.nomad.plugins.module_utils.shepard import ShepardModule

ARGUMENT_SPEC = {
    "job": {"type": "str"},
    "group": {"type": "str"},
    "task": {"type": "str"},
}


def main():
    """Run the module."""
    shepard = ShepardModule(ARGUMENT_SPEC, supports_check_mode=True)
    params = shepard.params
    with shepard.library_errors(), shepard.rolling_restart("shepard.nomad.restart_status_info") as rolling:
        views = rolling.status(params["job"], params["group"], params["task"])
    shepard.exit(changed=False, plans=[view.to_dict() for view in views])


if __name__ == "__main__":
    main()
