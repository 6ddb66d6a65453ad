"""Helpers of the log shipping tests, imported as ``logship_support``: allocations with Nomad's log
files (written by the simulator's logmon-alike), a configuration, and an in-memory sink."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from shepard_lib.config import LogShippingConfig, ShepardConfig, default_config
from shepard_lib.logship.records import Batch
from shepard_lib.logship.sinks import SinkError
from shepard_lib.model import Allocation
from shepard_lib.sim.nomad.logs import TaskLogs


def allocation(n: int, job: str = "web", group: str = "app", node: str = "n1") -> Allocation:
    """A running allocation ``<job>.<group>[n]`` on ``node`` with a UUID-like ID."""
    return Allocation(
        id=f"{n:08x}-0000-4000-8000-{n:012x}",
        name=f"{job}.{group}[{n}]",
        namespace="default",
        node_id="node-1",
        node_name=node,
        job_id=job,
        task_group=group,
        client_status="running",
        desired_status="run",
        index=n,
    )


class Node:
    """A Nomad client's data dir with allocations whose tasks write logs like logmon."""

    def __init__(self, root: Path, max_file_size: int = 1 << 20, max_files: int = 10) -> None:
        self.data_dir = root / "data"
        self.max_file_size = max_file_size
        self.max_files = max_files
        self.allocations: dict[str, Allocation] = {}
        self._logs: dict[tuple[str, str], TaskLogs] = {}

    def __call__(self) -> list[Allocation]:
        """The allocations source: what Nomad lists on this node now."""
        return list(self.allocations.values())

    def logs_dir(self, alloc: Allocation) -> Path:
        return self.data_dir / "alloc" / alloc.id / "alloc" / "logs"

    def add(self, alloc: Allocation, tasks: tuple[str, ...] = ("server",)) -> Allocation:
        self.allocations[alloc.id] = alloc
        self.logs_dir(alloc).mkdir(parents=True, exist_ok=True)
        for task in tasks:
            logs = TaskLogs(self.logs_dir(alloc), task, self.max_file_size, self.max_files)
            self._logs[(alloc.id, task)] = logs
        return alloc

    def write(self, alloc: Allocation, text: str, task: str = "server", stream: str = "stdout") -> None:
        self._logs[(alloc.id, task)].write(stream, text)

    def remove(self, alloc: Allocation, delete_files: bool = True) -> None:
        """Nomad forgets the allocation; with ``delete_files`` the client GCs its directory too."""
        del self.allocations[alloc.id]
        if delete_files:
            self.delete_files(alloc)

    def delete_files(self, alloc: Allocation) -> None:
        """The client garbage-collects the allocation's directory."""
        root = self.data_dir / "alloc" / alloc.id
        for path in sorted(root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        root.rmdir()


def config(tmp_path: Path, node: Node, **shipping: Any) -> ShepardConfig:
    """Defaults, with the node's data dir and the checkpoint and file sink under ``tmp_path``."""
    settings: dict[str, Any] = {
        "checkpoint_path": str(tmp_path / "checkpoints.json"),
        "path": str(tmp_path / "out" / "tasks.jsonl"),
    }
    settings.update(shipping)
    return dataclasses.replace(
        default_config(), nomad_data_dir=str(node.data_dir), log_shipping=LogShippingConfig(**settings)
    )


Record = tuple[str, str, str, bytes, bool]
"""What MemorySink keeps of a line: alloc id, task, stream, the bytes, cut."""


class MemorySink:
    """Keeps what it is sent; ``down`` makes it fail like an unreachable server."""

    name = "memory"

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.batches: list[int] = []
        self.down = False
        self.attempts = 0

    def send(self, batch: Batch) -> None:
        self.attempts += 1
        if self.down:
            raise SinkError("memory sink is down")
        self.batches.append(len(batch.lines))
        self.records.extend((*line.stream.key, line.data, line.cut) for line in batch.lines)

    def close(self) -> None:
        pass

    def lines(self, alloc: Allocation, task: str = "server", stream: str = "stdout") -> list[str]:
        return [r[3].decode() for r in self.records if r[:3] == (alloc.id, task, stream)]

    def duplicates(self) -> Counter[Record]:
        """Each record received more than once, with how many extra times."""
        return self.duplicates_of(self.records)

    @staticmethod
    def duplicates_of(records: list[Record]) -> Counter[Record]:
        return Counter({k: n - 1 for k, n in Counter(records).items() if n > 1})
