#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Ansible module shepard.nomad.restart_control."""

from __future__ import annotations

DOCUMENTATION = r"""
module: restart_control
short_description: Resume or abort a Shepard restart plan
version_added: 0.1.0
description:
  - Sets the plan of a task (C(job/group/task)) to O(state=resumed) or O(state=aborted), as
    C(shepard resume) and C(shepard abort) do.
  - V(aborted) stops the plan; no new restart starts, restarts in flight finish. A plan already
    aborted, or complete, is left alone.
  - V(resumed) resumes a C(failed) or C(aborted) plan (its failed members are pending again), or an orphaned
    one (C(planned), but nobody drives it), and restarts its pending members, waiting for them like
    M(shepard.nomad.rolling_restart); the module fails if the resumed rollout fails. A plan that is complete,
    or planned and driven by someone, is left alone.
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
    details: Tells whether the plan would change and shows the diff; writes nothing.
  diff_mode:
    support: full
    details: The status, halt reason and orphaned flag of each plan before and after.
options:
  job:
    description: Job of the plan.
    type: str
    required: true
  group:
    description: Task group of the plan.
    type: str
    required: true
  task:
    description: Task of the plan.
    type: str
    required: true
  state:
    description: What the plan should be.
    type: str
    required: true
    choices: [resumed, aborted]
  reason:
    description: With O(state=aborted), the reason recorded in the plan (its C(halt_reason)).
    type: str
    default: aborted by an operator (Ansible)
"""

EXAMPLES = r"""
- name: Stop the web rollout while we look at the failed instance
  shepard.nomad.restart_control:
    job: web
    group: app
    task: server
    state: aborted
    reason: investigating the failed restart of web[0]

- name: Resume it once the configuration is fixed
  shepard.nomad.restart_control:
    job: web
    group: app
    task: server
    state: resumed
"""

RETURN = r"""
plans:
  description: The plans of the task after the module ran (several only with C(lock_scope=node)), as in M(shepard.nomad.restart_status_info).
  returned: always
  type: list
  elements: dict
rollout:
  description:
    - With O(state=resumed), when a plan was resumed, what the resumed rollout did, as the results of
      M(shepard.nomad.rolling_restart) (C(restarted_allocations), C(failed_allocations), C(skipped_allocations),
      C(plans), C(peak_concurrency)).
  returned: when a plan was resumed
  type: dict
"""

from ansible_collections.shepard.nomad.plugins.module_utils.shepard import ShepardModule, rollout_result

NAME = "shepard.nomad.restart_control"
HALTED = ("failed", "aborted")
STOPPED = ("aborted", "complete")
VERB = {"resumed": "resume", "aborted": "abort"}

ARGUMENT_SPEC = {
    "job": {"type": "str", "required": True},
    "group": {"type": "str", "required": True},
    "task": {"type": "str", "required": True},
    "state": {"type": "str", "required": True, "choices": ["resumed", "aborted"]},
    "reason": {"type": "str", "default": "aborted by an operator (Ansible)"},
}


def main():
    """Run the module."""
    shepard = ShepardModule(ARGUMENT_SPEC, supports_check_mode=True)
    params = shepard.params
    scope = (params["job"], params["group"], params["task"])
    label = "/".join(scope)
    with shepard.library_errors(), shepard.rolling_restart(NAME) as rolling:
        views = [view for view in rolling.status(*scope) if view.plan is not None]
        if not views:
            shepard.fail(f"no plan for {label}: nothing to {VERB[params['state']]}")
        before = {view.key: _state(view) for view in views}
        after = dict(before)
        for key, state in before.items():
            if params["state"] == "aborted" and state["status"] not in STOPPED:
                after[key] = dict(state, status="aborted", halt_reason=params["reason"])
            elif params["state"] == "resumed" and (state["status"] in HALTED or state["orphaned"]):
                after[key] = dict(state, status="planned", halt_reason=None, orphaned=False)
        changed = after != before
        result = {"changed": changed, "diff": {"before": before, "after": after}}
        if shepard.module.check_mode or not changed:
            shepard.exit(plans=[view.to_dict() for view in views], **result)
        if params["state"] == "aborted":
            rolling.abort(*scope, reason=params["reason"])
        else:
            result["rollout"], warnings = rollout_result(rolling.resume(*scope))
            for warning in warnings:
                shepard.module.warn(warning)
        views = [view for view in rolling.status(*scope) if view.plan is not None]
    result["diff"]["after"] = {view.key: _state(view) for view in views}
    result["plans"] = [view.to_dict() for view in views]
    if "rollout" in result and not result["rollout"]["ok"]:
        shepard.fail(f"the resumed rollout of {label} did not restart every allocation", **result)
    shepard.exit(**result)


def _state(view):
    """What the diff shows of a plan."""
    return {"status": view.plan.status.value, "halt_reason": view.plan.halt_reason, "orphaned": view.orphaned}


if __name__ == "__main__":
    main()
