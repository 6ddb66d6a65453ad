"""Typed values the backends return: the parts of Consul's and Nomad's JSON that Shepard uses.

Only ``shepard_lib.backends`` builds these from wire JSON; everything above them reads these
frozen dataclasses. Timestamps are Unix seconds as floats (Nomad mixes RFC 3339 strings,
nanoseconds and seconds on the wire; the backend normalises them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# --- Consul -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVEntry:
    """One Consul KV entry (``GET /v1/kv/<key>``), with the value decoded from base64."""

    key: str
    value: bytes | None
    create_index: int
    modify_index: int
    lock_index: int = 0
    flags: int = 0
    session: str | None = None

    def text(self) -> str:
        """The value as UTF-8 text (empty for a null value)."""
        return (self.value or b"").decode("utf-8")


class TxnVerb(enum.StrEnum):
    """The KV verbs of Consul's ``PUT /v1/txn``."""

    SET = "set"
    CAS = "cas"
    LOCK = "lock"
    UNLOCK = "unlock"
    GET = "get"
    GET_TREE = "get-tree"
    CHECK_INDEX = "check-index"
    CHECK_SESSION = "check-session"
    CHECK_NOT_EXISTS = "check-not-exists"
    DELETE = "delete"
    DELETE_TREE = "delete-tree"
    DELETE_CAS = "delete-cas"


@dataclass(frozen=True)
class TxnOp:
    """One KV operation of a transaction; ``index`` is the ModifyIndex for cas/check-index/delete-cas."""

    verb: TxnVerb
    key: str
    value: bytes | None = None
    index: int | None = None
    session: str | None = None
    flags: int | None = None


@dataclass(frozen=True)
class TxnResult:
    """The outcome of a transaction: applied with ``results``, or rolled back with ``errors``.

    ``errors`` holds ``(op_index, what)`` pairs as Consul reports them (HTTP 409).
    """

    ok: bool
    results: tuple[KVEntry, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()


class SessionBehavior(enum.StrEnum):
    """What Consul does with a session's locks when the session is invalidated."""

    RELEASE = "release"
    DELETE = "delete"


@dataclass(frozen=True)
class SessionInfo:
    """A Consul session (``GET /v1/session/info/<id>``)."""

    id: str
    name: str
    node: str
    ttl: float | None
    behavior: SessionBehavior
    lock_delay: float
    create_index: int


class CheckStatus(enum.StrEnum):
    """Consul health check states."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True)
class HealthCheck:
    """One Consul health check (``/v1/health/checks/<service>`` or ``/v1/health/node/<node>``)."""

    node: str
    check_id: str
    name: str
    status: CheckStatus
    service_id: str = ""
    service_name: str = ""
    output: str = ""


# --- Nomad ------------------------------------------------------------------------------------


class AllocClientStatus(enum.StrEnum):
    """Nomad allocation ``ClientStatus`` values."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    LOST = "lost"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class TaskState:
    """One task's state in an allocation (``TaskStates[<task>]``)."""

    state: str  # "pending" | "running" | "dead"
    failed: bool = False
    restarts: int = 0
    last_restart: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class Allocation:
    """A Nomad allocation; ``index`` is the ``NOMAD_ALLOC_INDEX`` parsed from ``Name`` (``job.group[i]``)."""

    id: str
    name: str
    namespace: str
    node_id: str
    node_name: str
    job_id: str
    task_group: str
    client_status: str
    desired_status: str
    index: int
    task_states: dict[str, TaskState] = field(default_factory=dict)
    modify_index: int = 0
    previous_allocation: str = ""
    next_allocation: str = ""

    @property
    def running(self) -> bool:
        """Nomad runs it and means to keep running it."""
        return self.client_status == AllocClientStatus.RUNNING and self.desired_status == "run"


@dataclass(frozen=True)
class Template:
    """A task's ``template`` block, as far as Shepard cares."""

    dest_path: str
    change_mode: str = "restart"
    embedded_tmpl: str = ""
    source_path: str = ""
    splay: float = 0.0  # seconds


@dataclass(frozen=True)
class Service:
    """A ``service`` block: its name, its ``provider`` (``consul`` or ``nomad``) and its number of checks."""

    name: str
    provider: str = "consul"
    checks: int = 0


@dataclass(frozen=True)
class Task:
    """A task of a task group."""

    name: str
    driver: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    templates: tuple[Template, ...] = ()
    services: tuple[str, ...] = ()
    service_blocks: tuple[Service, ...] = ()


@dataclass(frozen=True)
class TaskGroup:
    """A task group of a job; ``services`` are the group-level service names."""

    name: str
    count: int
    meta: dict[str, str] = field(default_factory=dict)
    tasks: tuple[Task, ...] = ()
    services: tuple[str, ...] = ()
    service_blocks: tuple[Service, ...] = ()

    def task(self, name: str) -> Task | None:
        """The task called ``name``, or None."""
        return next((t for t in self.tasks if t.name == name), None)


@dataclass(frozen=True)
class Job:
    """A Nomad job."""

    id: str
    name: str
    namespace: str
    status: str
    meta: dict[str, str] = field(default_factory=dict)
    groups: tuple[TaskGroup, ...] = ()
    stop: bool = False

    def group(self, name: str) -> TaskGroup | None:
        """The task group called ``name``, or None."""
        return next((g for g in self.groups if g.name == name), None)


@dataclass(frozen=True)
class NodeInfo:
    """A Nomad client node."""

    id: str
    name: str
    status: str  # "initializing" | "ready" | "down" | "disconnected"
    datacenter: str = ""
    status_updated_at: float = 0.0
    eligible: bool = True


@dataclass(frozen=True)
class AgentInfo:
    """What the local Nomad agent says of itself (``GET /v1/agent/self``)."""

    node_name: str
    node_id: str | None
    datacenter: str
    region: str


@dataclass(frozen=True)
class JobStub:
    """A job as ``GET /v1/jobs`` lists it."""

    id: str
    name: str
    namespace: str
    status: str  # "pending" | "running" | "dead"
    stop: bool = False


@dataclass(frozen=True)
class Listing(Generic[T]):
    """A Nomad list answered by a server that knew the cluster leader (``X-Nomad-KnownLeader: true``).

    ``server_time`` is Unix seconds from the answer's ``Date`` header (None when it had none):
    the answering agent's clock, so that ages of Nomad timestamps are measured on Nomad's side.
    """

    items: tuple[T, ...]
    index: int
    server_time: float | None = None
