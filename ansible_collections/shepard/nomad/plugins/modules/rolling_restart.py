#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Ansible module shepard.nomad.rolling_restart."""

from __future__ import annotations

DOCUMENTATION = r"""
module: rolling_restart
short_description: Restart a Nomad job's allocations a few at a time through Shepard
version_added: 0.1.0
description:
  - Restarts every running allocation of a Nomad job (or of one group, one task, or the allocations
    listed) through Shepard's plan and restart slots in Consul, the same ones the Shepard agents use,
    so an orchestrated restart cooperates with them instead of racing them.
  - At most O(concurrency) instances of a task restart at once; each must be healthy again (for
    O(min_healthy_time)) before its slot goes to the next; after more than O(max_failures) failed
    restarts the plan is C(failed) and the rollout stops, so a bad configuration halts at the first instances.
  - With O(method=consul_key) only tasks that render C(local/shepard.tpl) can be restarted (see
    M(shepard.nomad.template_info)); other tasks are returned in RV(skipped_tasks) with the reason.
  - The module fails, returning the same results, when an allocation failed or was skipped, or a plan
    halted; RV(plans) then shows the plan C(failed), and C(shepard.nomad.restart_control) resumes it.
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
    details: Returns the allocations that would restart, in order, and the plans it would use; writes nothing.
  diff_mode:
    support: none
options:
  job:
    description: ID of the Nomad job.
    type: str
    required: true
  group:
    description: Restart only this task group.
    type: str
  task:
    description: Restart only this task (in every group, unless O(group) is set).
    type: str
  alloc_ids:
    description:
      - Restart only these allocations (full IDs or unique prefixes).
    type: list
    elements: str
    default: []
  concurrency:
    description:
      - Instances of a task restarted at once.
      - Default from the configuration, overridden by the job's (or group's) meta C(shepard_concurrency).
      - A rollout already in progress for the task keeps its own; the module then warns.
    type: int
  method:
    description:
      - V(consul_key) writes the trigger key C(shepard.tpl) reads (fenced by the restart slot).
      - V(nomad_api) calls Nomad's allocation restart API for the task.
      - Default from the configuration (V(consul_key)).
    type: str
    choices: [consul_key, nomad_api]
  health_source:
    description:
      - Where the health of a restarted task is read, its Consul checks, Nomad's task state, or both.
      - Default from the configuration (V(consul)).
    type: str
    choices: [consul, nomad, both]
  min_healthy_time:
    description:
      - How long a restarted task must stay healthy to count as restarted, as a Go duration (V(10s), V(1m)).
    type: str
  healthy_deadline:
    description:
      - A restarted task not healthy by then has failed, as a Go duration (V(5m)).
    type: str
  max_failures:
    description:
      - Failed restarts the rollout tolerates; one more and the plan is C(failed) and no further restart starts
        (V(0) halts at the first failure).
      - Default from the configuration, overridden by the job's meta C(shepard_max_failures).
    type: int
  again:
    description:
      - By default a rollout joins a plan of the task that is in progress and restarts only what its current
        generation has not restarted yet. V(true) restarts every allocation once more.
    type: bool
    default: false
  wait:
    description:
      - Wait for the rollout to end (V(true)), or start it and return once its first plan is registered
        in Consul (V(false)), leaving a detached process to run it; follow it with
        M(shepard.nomad.restart_status_info).
    type: bool
    default: true
  start_timeout:
    description:
      - With O(wait=false), the longest wait (real seconds) for the rollout to register its plan. When it has not by
        then the module fails, but the detached rollout goes on.
    type: int
    default: 60
"""

EXAMPLES = r"""
- name: Roll a restart over the web job, two instances at a time
  shepard.nomad.rolling_restart:
    job: web
    concurrency: 2
    nomad_address: https://nomad.example.com:4646
    consul_address: https://consul.example.com:8501
    consul_token: "{{ vault_consul_token }}"

- name: Restart one task of one group through Nomad's API, health from Nomad only
  shepard.nomad.rolling_restart:
    job: web
    group: app
    task: server
    method: nomad_api
    health_source: nomad
    min_healthy_time: 30s
    healthy_deadline: 5m

- name: Show what would restart (check mode)
  shepard.nomad.rolling_restart:
    job: web
  check_mode: true
  register: would

- name: Start a long rollout and come back later
  shepard.nomad.rolling_restart:
    job: batch-workers
    wait: false
"""

RETURN = r"""
job:
  description: The job ID.
  returned: always
  type: str
  sample: web
dry_run:
  description: The module restarted nothing itself (check mode, or O(wait=false), where a detached process does).
  returned: always
  type: bool
ok:
  description: Every allocation asked for restarted and is healthy (always V(false) in check mode and with O(wait=false)).
  returned: always
  type: bool
started:
  description: With O(wait=false), a detached process is running the rollout.
  returned: always
  type: bool
planned:
  description: The allocations' tasks the rollout restarts, in rollout order.
  returned: always
  type: list
  elements: dict
  sample: [{"order": 0, "alloc_id": "5f1c...", "node": "node-1", "alloc_index": 0, "group": "app", "task": "server"}]
restarted_allocations:
  description: Allocations restarted and healthy, with C(duration) (seconds), C(by) and C(generation).
  returned: always
  type: list
  elements: dict
failed_allocations:
  description: Allocations whose restart failed, with the C(reason).
  returned: always
  type: list
  elements: dict
skipped_allocations:
  description: Allocations not restarted, with the C(reason) (for example stopped by Nomad meanwhile).
  returned: always
  type: list
  elements: dict
skipped_tasks:
  description: Tasks left out (with O(method=consul_key), those that do not render C(shepard.tpl)), with the C(reason).
  returned: always
  type: list
  elements: dict
plans:
  description:
    - One entry per task scope. After a rollout, its plan as the rollout left it (C(status) V(complete),
      V(failed) or V(aborted), C(halt_reason)); in check mode, the plan it would use (V(absent) if none exists);
      with O(wait=false), the plan as registered, with C(members) and C(slot_holders).
  returned: always
  type: list
  elements: dict
  sample: [{"job": "web", "group": "app", "task": "server", "node": null, "status": "complete", "generation": 1,
            "concurrency": 2, "max_failures": 1, "halt_reason": null}]
peak_concurrency:
  description: The most restarts this rollout had in flight at once.
  returned: always
  type: int
duration:
  description: Seconds the rollout took.
  returned: always
  type: float
"""

from dataclasses import replace

from ansible_collections.shepard.nomad.plugins.module_utils.background import run_detached
from ansible_collections.shepard.nomad.plugins.module_utils.shepard import ShepardModule, rollout_result

try:
    from shepard_lib.config import HealthSource, RestartMethod
    from shepard_lib.coordinator import EventKind
    from shepard_lib.rollout import RolloutOptions
except ImportError:
    pass  # ShepardModule fails with missing_required_lib

NAME = "shepard.nomad.rolling_restart"

ARGUMENT_SPEC = {
    "job": {"type": "str", "required": True},
    "group": {"type": "str"},
    "task": {"type": "str"},
    "alloc_ids": {"type": "list", "elements": "str", "default": []},
    "concurrency": {"type": "int"},
    "method": {"type": "str", "choices": ["consul_key", "nomad_api"]},
    "health_source": {"type": "str", "choices": ["consul", "nomad", "both"]},
    "min_healthy_time": {"type": "str"},
    "healthy_deadline": {"type": "str"},
    "max_failures": {"type": "int"},
    "again": {"type": "bool", "default": False},
    "wait": {"type": "bool", "default": True},
    "start_timeout": {"type": "int", "default": 60},
}


def main():
    """Run the module."""
    shepard = ShepardModule(ARGUMENT_SPEC, supports_check_mode=True)
    params = shepard.params
    config = shepard.config()
    with shepard.library_errors():
        options = RolloutOptions(
            group=params["group"],
            task=params["task"],
            alloc_ids=tuple(params["alloc_ids"]),
            concurrency=params["concurrency"],
            method=RestartMethod(params["method"]) if params["method"] else None,
            health_source=HealthSource(params["health_source"]) if params["health_source"] else None,
            min_healthy_time=shepard.duration("min_healthy_time"),
            healthy_deadline=shepard.duration("healthy_deadline"),
            max_failures=params["max_failures"],
            again=params["again"],
            dry_run=shepard.module.check_mode or not params["wait"],
        )
        with shepard.rolling_restart(NAME, config) as rolling:
            result, warnings = rollout_result(rolling.run(params["job"], options))
    result["ok"] = False if options.dry_run else result["ok"]
    for warning in warnings:
        shepard.module.warn(warning)
    if shepard.module.check_mode:
        shepard.exit(changed=bool(result["planned"]), started=False, **result)
    if not params["wait"]:
        start(shepard, config, params, options, result)
    changed = bool(result["restarted_allocations"])
    if not result["ok"]:
        shepard.fail(failure_message(result), changed=changed, started=False, **result)
    shepard.exit(changed=changed, started=False, **result)


def start(shepard, config, params, options, dry_run):
    """Start the rollout in a detached process; exit once its first plan is registered."""
    if not dry_run["planned"]:
        shepard.exit(changed=False, started=False, **dry_run)
    options = replace(options, dry_run=False)

    def work(report):
        def observe(event):
            if event.kind == EventKind.PLANNED:
                report({"planned": True})

        with shepard.rolling_restart(NAME, config, observer=observe) as rolling:
            rolling.run(params["job"], options)

    message = run_detached(work, params["start_timeout"])
    if "timeout" in message:
        shepard.fail(
            f"the rollout has not registered its plan within start_timeout={message['timeout']} s; it may "
            "still do so: follow it with shepard.nomad.restart_status_info",
            changed=True,
            started=True,
            **dry_run,
        )
    if "error" in message:
        shepard.fail(f"the rollout did not start: {message['error']}", changed=False, started=False, **dry_run)
    with shepard.library_errors(), shepard.rolling_restart(NAME, config) as rolling:
        views = rolling.status(params["job"], params["group"], params["task"])
    dry_run["plans"] = [view.to_dict() for view in views]
    shepard.exit(changed=True, started=True, **dry_run)


def failure_message(result):
    """Why a rollout that was not ok failed, plan halts first."""
    halted = [p for p in result["plans"] if p["status"] in ("failed", "aborted")]
    parts = [
        f"rollout halted: plan {p['job']}/{p['group']}/{p['task']} is {p['status']} ({p['halt_reason']})"
        for p in halted
    ]
    failed, skipped = result["failed_allocations"], result["skipped_allocations"]
    if failed or skipped:
        parts.append(f"{len(failed)} allocation(s) failed and {len(skipped)} were skipped")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
