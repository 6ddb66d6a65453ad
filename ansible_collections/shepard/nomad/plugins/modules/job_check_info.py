#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Ansible module shepard.nomad.job_check_info."""

from __future__ import annotations

DOCUMENTATION = r"""
module: job_check_info
short_description: Is a Nomad job ready for Shepard, task by task
version_added: 0.1.0
description:
  - Reads a job from Nomad and reports, per task, what C(shepard job check) reports. C(local/shepard.tpl) must
    have C(change_mode = "restart") and really read the task's trigger key (the template is evaluated for the
    job's names); no other template may have C(change_mode = "restart") (Nomad would restart every instance
    at once); a Consul service check should cover the task; C(splay) on C(shepard.tpl) only delays restarts.
  - "Reports only: a job that is not ready does not fail the task; test RV(ready)."
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
    description: The job ID. An unknown job fails the module.
    type: str
    required: true
"""

EXAMPLES = r"""
- name: Check the web job before trusting Shepard with it
  shepard.nomad.job_check_info:
    job: web
  register: check

- name: Stop here when it is not ready
  ansible.builtin.assert:
    that: check.ready
    fail_msg: "{{ check.tasks | map(attribute='findings') | flatten | map(attribute='message') | list }}"
"""

RETURN = r"""
job:
  description: The job ID.
  returned: always
  type: str
namespace:
  description: The job's namespace.
  returned: always
  type: str
ready:
  description: Every task is ready and at least one renders C(local/shepard.tpl).
  returned: always
  type: bool
managed_tasks:
  description: How many tasks render C(local/shepard.tpl).
  returned: always
  type: int
tasks:
  description: One entry per task.
  returned: always
  type: list
  elements: dict
  contains:
    group:
      description: The task group.
      type: str
    task:
      description: The task.
      type: str
    managed:
      description: It renders C(local/shepard.tpl).
      type: bool
    ready:
      description: It has no error.
      type: bool
    findings:
      description: Each with C(severity) (V(error) or V(warning)), a stable C(code) and a C(message).
      type: list
      elements: dict
"""

from ansible_collections.shepard.nomad.plugins.module_utils.shepard import ShepardModule

ARGUMENT_SPEC = {"job": {"type": "str", "required": True}}


def main():
    """Run the module."""
    shepard = ShepardModule(ARGUMENT_SPEC, supports_check_mode=True)
    config = shepard.config()
    with shepard.library_errors(), shepard.backends(config) as (_consul, nomad, _clock):
        report = shepard.check_job(nomad, shepard.params["job"], config)
    shepard.exit(changed=False, **report.to_dict())


if __name__ == "__main__":
    main()
