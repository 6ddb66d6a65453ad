"""The tags of a shipped record: where each line came from.

Field names follow Filebeat's Nomad metadata (``add_nomad_metadata``) where it has one, and
Filebeat's log input for the file fields; the rest are Shepard's own:

=========================  ============================================  =========
tag                        value                                         from
=========================  ============================================  =========
``nomad.allocation.id``    allocation ID                                 Filebeat
``nomad.allocation.name``  allocation name, ``<job>.<group>[<index>]``   Filebeat
``nomad.job.name``         job                                           Filebeat
``nomad.task.name``        task                                          Filebeat
``nomad.namespace``        namespace                                     Filebeat
``nomad.datacenter``       the node's datacenter                         Filebeat
``nomad.group.name``       task group                                    Shepard
``nomad.allocation.index`` ``NOMAD_ALLOC_INDEX``                         Shepard
``nomad.node.name``        node name                                     Shepard
``stream``                 ``stdout`` or ``stderr``                      Filebeat (container input)
``log.file.path``          the log file the line was read from           Filebeat
``log.offset``             byte offset of the line in that file          Filebeat
``log.cut``                ``true`` on each piece of an over-long line   Shepard
=========================  ============================================  =========

plus the static tags of ``log_shipping.tags``. :data:`LOW_CARDINALITY` are the tags that stay the
same for every line of a task (Loki labels); the others vary per allocation or per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shepard_lib.model import Allocation

__all__ = [
    "ALLOC_ID",
    "ALLOC_INDEX",
    "ALLOC_NAME",
    "BUILTIN",
    "CUT",
    "DATACENTER",
    "FILE_PATH",
    "GROUP",
    "JOB",
    "LOW_CARDINALITY",
    "NAMESPACE",
    "NODE",
    "OFFSET",
    "STREAM",
    "TASK",
    "AllocationLogs",
]

ALLOC_ID = "nomad.allocation.id"
ALLOC_NAME = "nomad.allocation.name"
JOB = "nomad.job.name"
TASK = "nomad.task.name"
NAMESPACE = "nomad.namespace"
DATACENTER = "nomad.datacenter"
GROUP = "nomad.group.name"
ALLOC_INDEX = "nomad.allocation.index"
NODE = "nomad.node.name"
STREAM = "stream"
FILE_PATH = "log.file.path"
OFFSET = "log.offset"
CUT = "log.cut"

LOW_CARDINALITY = (NAMESPACE, JOB, GROUP, TASK, NODE, DATACENTER, STREAM)
"""Tags shared by every line of a task's stream (Loki labels); static tags are low-cardinality too."""

BUILTIN = frozenset(
    {ALLOC_ID, ALLOC_NAME, JOB, TASK, NAMESPACE, DATACENTER, GROUP, ALLOC_INDEX, NODE, STREAM}
    | {FILE_PATH, OFFSET, CUT}
)
"""Every tag name Shepard sets itself (a static tag may not reuse one)."""


@dataclass(frozen=True)
class AllocationLogs:
    """One allocation as the shipper sees it: its tags and the directory of its task logs."""

    alloc_id: str
    alloc_name: str
    namespace: str
    job: str
    group: str
    index: int
    node: str
    datacenter: str
    logs_dir: Path

    @classmethod
    def of(cls, alloc: Allocation, data_dir: str | Path, datacenter: str) -> AllocationLogs:
        """The logs of ``alloc`` under the Nomad client's ``data_dir`` (``alloc/<id>/alloc/logs``)."""
        return cls(
            alloc_id=alloc.id,
            alloc_name=alloc.name,
            namespace=alloc.namespace,
            job=alloc.job_id,
            group=alloc.task_group,
            index=alloc.index,
            node=alloc.node_name,
            datacenter=datacenter,
            logs_dir=Path(data_dir) / "alloc" / alloc.id / "alloc" / "logs",
        )

    def tags(self, task: str, stream: str) -> dict[str, str]:
        """The tags of every line of ``task``'s ``stream`` (without the per-line file and offset)."""
        return {
            ALLOC_ID: self.alloc_id,
            ALLOC_NAME: self.alloc_name,
            JOB: self.job,
            TASK: task,
            NAMESPACE: self.namespace,
            DATACENTER: self.datacenter,
            GROUP: self.group,
            ALLOC_INDEX: str(self.index),
            NODE: self.node,
            STREAM: stream,
        }

    def to_json(self) -> dict[str, object]:
        """Plain data for the checkpoint file (so a gone allocation's last lines keep their tags)."""
        return {
            "alloc_id": self.alloc_id,
            "alloc_name": self.alloc_name,
            "namespace": self.namespace,
            "job": self.job,
            "group": self.group,
            "index": self.index,
            "node": self.node,
            "datacenter": self.datacenter,
            "logs_dir": str(self.logs_dir),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> AllocationLogs:
        """The inverse of :meth:`to_json`; KeyError or ValueError on a malformed entry."""
        text = {k: str(data[k]) for k in ("alloc_id", "alloc_name", "namespace", "job", "group", "node")}
        index = data["index"]
        if not isinstance(index, int):
            raise ValueError(f"index is not an integer: {index!r}")
        return cls(
            **text, index=index, datacenter=str(data["datacenter"]), logs_dir=Path(str(data["logs_dir"]))
        )
