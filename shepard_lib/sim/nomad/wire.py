"""Nomad's JSON shapes for the simulated objects.

List endpoints return stubs (``AllocListStub``, ``NodeListStub``, ``JobListStub``); single-object
endpoints return the full structs. Times follow Nomad: ``CreateTime``/``ModifyTime``/``SubmitTime``
and event ``Time`` in Unix nanoseconds, task ``StartedAt``/``FinishedAt``/``LastRestart`` as
RFC 3339 strings (null when unset), node ``StatusUpdatedAt`` in Unix seconds; durations (splay,
restart delay) in nanoseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shepard_lib.sim.nomad.state import SimAlloc, SimJob, SimNode, SimTaskState, TaskEvent
from shepard_lib.sim.scenario import GroupSpec, LogSpec, Parameterized, RestartPolicy, TaskSpec, TemplateSpec

__all__ = [
    "NOMAD_VERSION",
    "PORT_LABEL",
    "agent_self_json",
    "alloc_json",
    "alloc_stub",
    "job_json",
    "job_stub",
    "node_json",
    "node_stub",
    "ns",
    "rfc3339",
]

NOMAD_VERSION = "1.7.7"
PORT_LABEL = "http"
"""The dynamic port label every simulated group network declares; services use it."""

_EVENT_DEFAULTS: dict[str, Any] = {
    "DiskLimit": 0,
    "DownloadError": "",
    "DriverError": "",
    "DriverMessage": "",
    "ExitCode": 0,
    "FailedSibling": "",
    "FailsTask": False,
    "GenericSource": "",
    "KillError": "",
    "KillReason": "",
    "KillTimeout": 0,
    "Message": "",
    "RestartReason": "",
    "SetupError": "",
    "Signal": 0,
    "StartDelay": 0,
    "TaskSignal": "",
    "TaskSignalReason": "",
    "ValidationError": "",
    "VaultError": "",
}


def ns(seconds: float) -> int:
    """Unix nanoseconds."""
    return round(seconds * 1e9)


def rfc3339(seconds: float | None) -> str | None:
    """Go's RFC3339Nano in UTC (``2017-07-25T23:36:26.106431265Z``), or None."""
    if seconds is None:
        return None
    nanos = ns(seconds)
    whole, frac = divmod(nanos, 1_000_000_000)
    text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def _event_json(event: TaskEvent) -> dict[str, Any]:
    out = dict(_EVENT_DEFAULTS)
    out.update(event.fields)
    details = {_snake(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in event.fields.items()}
    out.update({"Type": event.type, "Time": ns(event.time), "DisplayMessage": event.display_message})
    out["Details"] = details
    return out


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def task_state_json(ts: SimTaskState) -> dict[str, Any]:
    """One ``TaskStates`` entry."""
    return {
        "State": ts.state,
        "Failed": ts.failed,
        "Restarts": ts.restarts,
        "LastRestart": rfc3339(ts.last_restart),
        "StartedAt": rfc3339(ts.started_at),
        "FinishedAt": rfc3339(ts.finished_at),
        "Events": [_event_json(e) for e in ts.events],
        "TaskHandle": None,
    }


def alloc_stub(alloc: SimAlloc, task_states: bool = True) -> dict[str, Any]:
    """``AllocListStub``."""
    return {
        "ID": alloc.id,
        "EvalID": alloc.eval_id,
        "Name": alloc.name,
        "Namespace": alloc.job.namespace,
        "NodeID": alloc.node.id,
        "NodeName": alloc.node.name,
        "JobID": alloc.job.id,
        "JobType": job_type(alloc.job),
        "JobVersion": alloc.job_version,
        "TaskGroup": alloc.group,
        "AllocatedResources": None,
        "DesiredStatus": alloc.desired_status,
        "DesiredDescription": alloc.desired_description,
        "ClientStatus": alloc.client_status,
        "ClientDescription": alloc.client_description,
        "DesiredTransition": {
            "Migrate": True if alloc.migrate else None,
            "Reschedule": None,
            "ForceReschedule": None,
        },
        "TaskStates": {n: task_state_json(ts) for n, ts in alloc.task_states.items()}
        if task_states
        else None,
        "DeploymentStatus": None,
        "FollowupEvalID": "",
        "RescheduleTracker": None,
        "PreemptedAllocations": None,
        "PreemptedByAllocation": "",
        "CreateIndex": alloc.create_index,
        "ModifyIndex": alloc.modify_index,
        "CreateTime": ns(alloc.create_time),
        "ModifyTime": ns(alloc.modify_time),
    }


def alloc_json(alloc: SimAlloc, region: str, logs: LogSpec, policy: RestartPolicy) -> dict[str, Any]:
    """The full ``Allocation`` (with its ``Job``)."""
    out = alloc_stub(alloc)
    port = {"Label": PORT_LABEL, "Value": alloc.port, "To": 0, "HostIP": "127.0.0.1"}
    out.update(
        {
            "Job": job_json(alloc.job, region, logs, policy),
            "AllocatedResources": {
                "Tasks": {
                    t: {"Cpu": {"CpuShares": 100}, "Memory": {"MemoryMB": 128}} for t in alloc.task_states
                },
                "Shared": {"DiskMB": 300, "Ports": [port], "Networks": None},
            },
            "Resources": None,
            "SharedResources": None,
            "TaskResources": None,
            "Metrics": {"NodesEvaluated": 1, "NodesFiltered": 0, "NodesExhausted": 0, "CoalescedFailures": 0},
            "PreviousAllocation": alloc.previous_allocation,
            "NextAllocation": alloc.next_allocation,
            "AllocModifyIndex": alloc.create_index,
            "NetworkStatus": None,
        }
    )
    return out


def _template_json(tpl: TemplateSpec) -> dict[str, Any]:
    return {
        "SourcePath": "",
        "DestPath": tpl.destination,
        "EmbeddedTmpl": tpl.data,
        "ChangeMode": tpl.change_mode,
        "ChangeSignal": tpl.change_signal,
        "ChangeScript": None,
        "Splay": ns(tpl.splay),
        "Perms": "0644",
        "Uid": None,
        "Gid": None,
        "LeftDelim": "{{",
        "RightDelim": "}}",
        "Envvars": False,
        "VaultGrace": 0,
        "Wait": None,
        "ErrMissingKey": False,
    }


def _service_json(name: str, task: str) -> dict[str, Any]:
    check = {
        "Name": f'service: "{name}" check',
        "Type": "http",
        "Path": "/health",
        "Protocol": "",
        "PortLabel": "",
        "Interval": ns(10),
        "Timeout": ns(2),
        "InitialStatus": "",
    }
    return {
        "Name": name,
        "TaskName": task,
        "PortLabel": PORT_LABEL,
        "AddressMode": "auto",
        "Tags": None,
        "Checks": [check],
        "Provider": "consul",
        "Meta": None,
    }


def _task_json(task: TaskSpec, templates: tuple[TemplateSpec, ...], logs: LogSpec) -> dict[str, Any]:
    return {
        "Name": task.name,
        "Driver": task.driver,
        "User": "",
        "Config": {"image": f"{task.name}:latest"} if task.driver == "docker" else {"command": task.name},
        "Env": None,
        "Services": [_service_json(task.service, task.name)] if task.service else None,
        "Templates": [_template_json(t) for t in templates] or None,
        "Meta": dict(task.meta) or None,
        "KillTimeout": ns(5),
        "LogConfig": {
            "MaxFiles": logs.max_files,
            "MaxFileSizeMB": max(1, logs.max_file_size // (1024 * 1024)),
        },
        "Leader": False,
        "Lifecycle": None,
    }


def _group_json(job: SimJob, group: GroupSpec, logs: LogSpec, policy: RestartPolicy) -> dict[str, Any]:
    return {
        "Name": group.name,
        "Count": group.count,
        "Tasks": [_task_json(t, job.templates[(group.name, t.name)], logs) for t in group.tasks],
        "Services": None,
        "RestartPolicy": {
            "Attempts": policy.attempts,
            "Interval": ns(policy.interval),
            "Delay": ns(policy.delay),
            "Mode": "fail",
            "RenderTemplates": False,
        },
        "Networks": [{"Mode": "host", "DynamicPorts": [{"Label": PORT_LABEL, "Value": 0, "To": 0}]}],
        "Meta": dict(group.meta) or None,
    }


def job_type(job: SimJob) -> str:
    """``service``, or ``batch`` for a parameterized job and its dispatched children."""
    return "batch" if job.spec.batch else "service"


def _job_common(job: SimJob, region: str) -> dict[str, Any]:
    return {
        "ID": job.id,
        "ParentID": job.spec.parent_id,
        "Name": job.spec.name,
        "Namespace": job.namespace,
        "Region": region,
        "Datacenters": ["*"],
        "NodePool": "default",
        "Type": job_type(job),
        "Priority": 50,
        "Stop": job.stop,
        "Status": job.status,
        "StatusDescription": "",
        "CreateIndex": job.create_index,
        "ModifyIndex": job.modify_index,
        "JobModifyIndex": job.create_index,
        "SubmitTime": ns(job.submit_time),
    }


def job_json(job: SimJob, region: str, logs: LogSpec, policy: RestartPolicy) -> dict[str, Any]:
    """The full ``Job``."""
    out = _job_common(job, region)
    out.update(
        {
            "AllAtOnce": False,
            "Constraints": None,
            "Affinities": None,
            "Spreads": None,
            "TaskGroups": [_group_json(job, g, logs, policy) for g in job.spec.groups],
            "Update": {"Stagger": ns(30), "MaxParallel": 1},
            "Periodic": None,
            "ParameterizedJob": _parameterized_json(job.spec.parameterized),
            "Dispatched": bool(job.spec.parent_id),
            "Payload": None,
            "Meta": dict(job.spec.meta) or None,
            "Stable": False,
            "Version": 0,
        }
    )
    return out


def _parameterized_json(p: Parameterized | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "Payload": p.payload,
        "MetaRequired": list(p.meta_required) or None,
        "MetaOptional": list(p.meta_optional) or None,
    }


def job_stub(
    job: SimJob, allocs: list[SimAlloc], meta: bool = False, children: Sequence[SimJob] = ()
) -> dict[str, Any]:
    """``JobListStub`` with its ``JobSummary`` counted from ``allocs`` and its dispatched ``children``;
    ``Meta`` only when asked."""
    summary: dict[str, dict[str, int]] = {}
    for g in job.spec.groups:
        counts = dict.fromkeys(("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown"), 0)
        for a in allocs:
            if a.group == g.name:
                key = {
                    "pending": "Starting",
                    "running": "Running",
                    "complete": "Complete",
                    "failed": "Failed",
                }
                counts[key.get(a.client_status, "Lost")] += 1
        summary[g.name] = counts
    out = _job_common(job, "")
    del out["Region"]
    out.update(
        {
            "Multiregion": None,
            "Periodic": False,
            "ParameterizedJob": job.spec.parameterized is not None,
            "JobSummary": {
                "JobID": job.id,
                "Namespace": job.namespace,
                "Summary": summary,
                "Children": {
                    status.capitalize(): sum(c.status == status for c in children)
                    for status in ("pending", "running", "dead")
                },
                "CreateIndex": job.create_index,
                "ModifyIndex": job.modify_index,
            },
        }
    )
    if meta:
        out["Meta"] = dict(job.spec.meta) or None
    return out


def node_attributes(node: SimNode) -> dict[str, str]:
    """The fingerprinted attributes (``attr.*`` in templates)."""
    return {
        "unique.hostname": node.name,
        "unique.network.ip-address": "127.0.0.1",
        "kernel.name": "linux",
        "os.name": "ubuntu",
        "cpu.arch": "amd64",
        "nomad.version": NOMAD_VERSION,
        "driver.docker": "1",
        "driver.raw_exec": "1",
    }


def node_stub(node: SimNode) -> dict[str, Any]:
    """``NodeListStub``."""
    return {
        "Address": "127.0.0.1",
        "ID": node.id,
        "Attributes": None,
        "Datacenter": node.spec.datacenter,
        "Name": node.name,
        "NodeClass": node.spec.node_class,
        "NodePool": "default",
        "Version": NOMAD_VERSION,
        "Drain": node.drain_deadline is not None,
        "SchedulingEligibility": node.eligibility,
        "Status": node.status,
        "StatusDescription": "",
        "Drivers": {"docker": {"Detected": True, "Healthy": True}},
        "NodeResources": None,
        "ReservedResources": None,
        "LastDrain": _last_drain(node),
        "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    }


def _drain_strategy(node: SimNode) -> dict[str, Any] | None:
    """``DrainStrategy`` while the node drains (the simulator migrates at once, so it is brief)."""
    if node.drain_deadline is None:
        return None
    return {
        "Deadline": ns(node.drain_deadline),
        "IgnoreSystemJobs": False,
        "ForceDeadline": "0001-01-01T00:00:00Z",
        "StartedAt": rfc3339(node.status_updated_at),
    }


def _last_drain(node: SimNode) -> dict[str, Any] | None:
    if node.last_drain is None:
        return None
    at = rfc3339(node.last_drain)
    return {"StartedAt": at, "UpdatedAt": at, "Status": "complete", "AccessorID": "", "Meta": None}


def node_json(node: SimNode) -> dict[str, Any]:
    """The full ``Node`` (without ``SecretID``, as Nomad redacts it)."""
    return {
        "ID": node.id,
        "Datacenter": node.spec.datacenter,
        "Name": node.name,
        "HTTPAddr": node.http_addr,
        "TLSEnabled": False,
        "Attributes": node_attributes(node),
        "Meta": dict(node.spec.meta),
        "NodeClass": node.spec.node_class,
        "NodePool": "default",
        "ComputedClass": "",
        "Drain": node.drain_deadline is not None,
        "DrainStrategy": _drain_strategy(node),
        "SchedulingEligibility": node.eligibility,
        "Status": node.status,
        "StatusDescription": "",
        "StatusUpdatedAt": int(node.status_updated_at),
        "Events": [{"Message": "Node registered", "Subsystem": "Cluster", "Details": None, "CreateIndex": 0}],
        "Drivers": {"docker": {"Detected": True, "Healthy": True}},
        "HostVolumes": None,
        "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    }


def agent_self_json(node: SimNode, region: str, data_dir: Path, num_allocs: int) -> dict[str, Any]:
    """``GET /v1/agent/self`` of the client agent running on ``node`` (also a server, as in dev mode)."""
    return {
        "config": {
            "Region": region,
            "Datacenter": node.spec.datacenter,
            "NodeName": node.name,
            "DataDir": str(data_dir),
            "Client": {"Enabled": True, "NodeClass": node.spec.node_class, "Meta": dict(node.spec.meta)},
            "Server": {"Enabled": True},
            "Version": {
                "Version": NOMAD_VERSION,
                "VersionPrerelease": "",
                "VersionMetadata": "",
                "Revision": "",
            },
        },
        "member": {
            "Name": f"{node.name}.{region}",
            "Addr": "127.0.0.1",
            "Port": 4648,
            "Status": "alive",
            "Tags": {"role": "nomad", "region": region, "dc": node.spec.datacenter, "build": NOMAD_VERSION},
        },
        "stats": {
            "client": {
                "node_id": node.id,
                "known_servers": "127.0.0.1:4647",
                "num_allocations": str(num_allocs),
            },
            "nomad": {
                "server": "true",
                "leader": "true",
                "leader_addr": "127.0.0.1:4647",
                "known_regions": "1",
            },
        },
    }
