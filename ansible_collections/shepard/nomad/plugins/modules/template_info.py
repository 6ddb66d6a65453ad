#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Ansible module shepard.nomad.template_info."""

from __future__ import annotations

DOCUMENTATION = r"""
module: template_info
short_description: The shepard.tpl template that makes a Nomad task restartable by Shepard
version_added: 0.1.0
description:
  - Returns the exact text of C(local/shepard.tpl) and a whole Nomad C(template) block rendering it,
    as C(shepard template) prints them, for playbooks that render jobspecs.
  - A task with this template (C(change_mode = "restart")) and C(change_mode = "noop") on its other
    templates restarts only when Shepard writes its trigger key.
author:
  - Shepard contributors (@shepard-nomad)
extends_documentation_fragment:
  - shepard.nomad.attributes
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Computes text only; the same in check mode.
  diff_mode:
    support: none
options:
  prefix:
    description: Consul KV prefix of Shepard's keys (the configuration's C(key_prefix)).
    type: str
    default: shepard
requirements:
  - Shepard (the C(shepard) Python package) on the host the module runs on, with Python 3.11 or later.
"""

EXAMPLES = r"""
- name: Get the template
  shepard.nomad.template_info:
  register: shepard_tpl
  delegate_to: localhost
  run_once: true

- name: Render a jobspec whose task includes it
  ansible.builtin.template:
    src: web.nomad.hcl.j2  # holds {{ shepard_tpl.template_block | indent(6) }} inside the task
    dest: /srv/jobs/web.nomad.hcl
    mode: "0644"
"""

RETURN = r"""
template:
  description: The text of C(local/shepard.tpl) (ends with a newline).
  returned: always
  type: str
template_block:
  description: A Nomad C(template { ... }) block rendering RV(template) into RV(destination) with C(change_mode = "restart").
  returned: always
  type: str
destination:
  description: Where the task must render the template.
  returned: always
  type: str
  sample: local/shepard.tpl
"""

from ansible_collections.shepard.nomad.plugins.module_utils.shepard import ShepardModule

try:
    from shepard_lib.keyspace import TEMPLATE_DESTINATION, check_prefix, nomad_template_block, shepard_template
except ImportError:
    pass  # ShepardModule fails with missing_required_lib

ARGUMENT_SPEC = {"prefix": {"type": "str", "default": "shepard"}}


def main():
    """Run the module."""
    shepard = ShepardModule(ARGUMENT_SPEC, connection=False, supports_check_mode=True)
    prefix = shepard.params["prefix"]
    try:
        check_prefix(prefix)
    except ValueError as exc:
        shepard.fail(f"prefix: {exc}")
    shepard.exit(
        changed=False,
        template=shepard_template(prefix),
        template_block=nomad_template_block(prefix),
        destination=TEMPLATE_DESTINATION,
    )


if __name__ == "__main__":
    main()
