"""The only layer that talks HTTP to Consul and Nomad.

``ConsulAPI`` and ``NomadAPI`` are the small typed interfaces the coordination core needs.
``consul.ConsulBackend`` and ``nomad.NomadBackend`` implement them over python-consul2 (or its
fork py-consul) and python-nomad; tests may pass any other implementation.

All durations are cluster seconds (see :mod:`shepard_lib.clock`). Every method raises
:class:`shepard_lib.errors.ConsulError` / :class:`~shepard_lib.errors.NomadError` (after retrying
transient failures) with a message that names the call, never a token. A call that takes
``cancel`` (a :class:`~shepard_lib.cancel.CancelEvent`) raises :class:`~shepard_lib.errors.Cancelled`
at once when it is set, even while its request waits for the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shepard_lib.cancel import CancelEvent
from shepard_lib.model import (
    AgentInfo,
    Allocation,
    HealthCheck,
    Job,
    JobStub,
    KVEntry,
    Listing,
    NodeInfo,
    SessionBehavior,
    SessionInfo,
    TxnOp,
    TxnResult,
)


class ConsulAPI(Protocol):
    """What Shepard needs of Consul."""

    def get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        """The entry at ``key``, or None when it does not exist."""
        ...

    def get_tree(self, prefix: str, *, consistent: bool = False) -> list[KVEntry]:
        """Every entry under ``prefix`` (``?recurse``); empty when there is none."""
        ...

    def keys(self, prefix: str, separator: str | None = None) -> list[str]:
        """Key names under ``prefix`` (``?keys``), folded at ``separator`` when given."""
        ...

    def watch(
        self,
        key: str,
        index: int,
        wait: float,
        *,
        recurse: bool = False,
        cancel: CancelEvent | None = None,
    ) -> tuple[int, list[KVEntry]]:
        """Blocking query: return once the key (or prefix) changes past ``index``, or after ``wait``.

        Returns the new ``X-Consul-Index`` and the entries (an empty list for a missing key).
        Setting ``cancel`` ends it at once: it raises :class:`~shepard_lib.errors.Cancelled`.
        """
        ...

    def put(self, key: str, value: bytes | str, *, cas: int | None = None, flags: int | None = None) -> bool:
        """Write ``value``; with ``cas`` only if ModifyIndex matches (0: only if absent)."""
        ...

    def acquire(self, key: str, value: bytes | str, session: str) -> bool:
        """``PUT ?acquire=session``: take the lock at ``key`` and store ``value``."""
        ...

    def release(self, key: str, session: str, value: bytes | str | None = None) -> bool:
        """``PUT ?release=session``; the body (when not None) becomes the new value."""
        ...

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete a key (or a prefix); with ``cas`` only if ModifyIndex matches."""
        ...

    def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        """Apply up to 64 KV operations atomically; a rollback is ``TxnResult(ok=False)``."""
        ...

    def session_create(
        self,
        name: str,
        ttl: float,
        *,
        behavior: SessionBehavior = SessionBehavior.RELEASE,
        lock_delay: float = 15.0,
        node: str | None = None,
        node_checks: Sequence[str] | None = None,
    ) -> str:
        """Create a session and return its ID."""
        ...

    def session_renew(self, session: str, *, cancel: CancelEvent | None = None) -> bool:
        """Renew a session; False when Consul no longer knows it (404); ``cancel`` as for ``watch``."""
        ...

    def session_destroy(self, session: str) -> None:
        """Destroy a session (idempotent)."""
        ...

    def session_info(self, session: str) -> SessionInfo | None:
        """The session, or None when it does not exist."""
        ...

    def service_checks(
        self, service: str, index: int = 0, wait: float | None = None, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[HealthCheck]]:
        """Checks of every instance of ``service`` (``/v1/health/checks/<service>``).

        Blocks like ``watch`` when ``index`` is non-zero; ``cancel`` as for ``watch``.
        """
        ...

    def node_checks(
        self, node: str, index: int = 0, wait: float | None = None, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[HealthCheck]]:
        """Checks of a Consul node, its own and its services' (``/v1/health/node/<node>``).

        Blocks like ``service_checks`` when ``index`` is non-zero (woken by this node's checks only).
        """
        ...

    def agent_node_name(self) -> str | None:
        """The Consul node name of the local agent, or None when unknown."""
        ...


class NomadAPI(Protocol):
    """What Shepard needs of Nomad."""

    def allocation(self, alloc_id: str) -> Allocation:
        """One allocation; raises NotFound when Nomad does not know it."""
        ...

    def watch_allocation(
        self, alloc_id: str, index: int, wait: float, *, cancel: CancelEvent | None = None
    ) -> tuple[int, Allocation]:
        """Blocking query on one allocation: returns after it changes past ``index`` or after ``wait``.

        Setting ``cancel`` ends it at once: it raises :class:`~shepard_lib.errors.Cancelled`.
        """
        ...

    def node_allocations(self, node_id: str) -> list[Allocation]:
        """The allocations placed on a node."""
        ...

    def watch_node_allocations(
        self, node_id: str, index: int, wait: float, *, cancel: CancelEvent | None = None
    ) -> tuple[int, list[Allocation]]:
        """Blocking query on a node's allocations: returns after one changes past ``index`` or ``wait``.

        Setting ``cancel`` ends it at once: it raises :class:`~shepard_lib.errors.Cancelled`.
        """
        ...

    def job_allocations(self, job_id: str) -> list[Allocation]:
        """The allocations of a job."""
        ...

    def job(self, job_id: str) -> Job:
        """A job; raises NotFound when it does not exist."""
        ...

    def jobs(self) -> list[str]:
        """The IDs of every job in the namespace."""
        ...

    def nodes(self) -> list[NodeInfo]:
        """Every client node."""
        ...

    def node(self, node_id: str) -> NodeInfo:
        """One node; raises NotFound when it does not exist."""
        ...

    def restart_task(self, alloc_id: str, task: str) -> None:
        """``POST /v1/client/allocation/<id>/restart`` with ``{"TaskName": task}``."""
        ...

    def agent_self(self) -> AgentInfo:
        """The local agent's node name, node ID, datacenter and region."""
        ...


class NomadListAPI(Protocol):
    """The fresh lists garbage collection decides on: each answer comes from a server that knows
    the cluster leader (``X-Nomad-KnownLeader: true``), or the call raises NomadError."""

    def list_jobs(self) -> Listing[JobStub]:
        """Every job of every namespace."""
        ...

    def list_nodes(self) -> Listing[NodeInfo]:
        """Every client node (without ``StatusUpdatedAt``: see :meth:`node_status`)."""
        ...

    def node_status(self, node_id: str) -> Listing[NodeInfo]:
        """One node, with its ``StatusUpdatedAt``."""
        ...

    def list_allocations(self, node_id: str | None = None) -> Listing[Allocation]:
        """The allocations of every namespace, or those on one node."""
        ...

    def agent_self(self) -> AgentInfo:
        """The local agent's node name, node ID, datacenter and region."""
        ...
