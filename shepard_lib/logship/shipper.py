"""One shipping round: every new complete line of the node's task logs to every sink.

:meth:`LogShipper.ship_once` is the whole job; the agent calls it every ``ship_log_interval`` and
``shepard logs ship --once`` calls it once. Per sink and stream it reads from that sink's
checkpoint, fills a batch (``batch_size`` lines, or up to the line that reaches ``batch_bytes``
bytes, whichever comes first: a batch may pass ``batch_bytes`` by less than one line), sends it
(retrying with exponential backoff), and only then moves the sink's checkpoints and persists them.
A sink that stays down is left at its checkpoint until the next round: its reading pauses, memory
stays at two batches (one in flight), and the other sinks go on. A stream that cannot be read (an
unreadable file, a damaged checkpoint) is reported and skipped for the round; the other streams go
on. Nothing is dropped but what ``buffer_limit`` forces (counted as ``dropped_lines``), what a sink
refuses for good (counted as ``rejected_lines``), and what Nomad deletes before it was shipped
(counted, in files, as ``fell_behind``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import tenacity

from shepard_lib.backends import NomadAPI
from shepard_lib.config import ShepardConfig, StartAt
from shepard_lib.errors import ShepardError
from shepard_lib.logship.checkpoints import Checkpoints
from shepard_lib.logship.metrics import ShipperMetrics
from shepard_lib.logship.records import Batch
from shepard_lib.logship.sinks import Sink, SinkError, SinkRejected, build_sinks
from shepard_lib.logship.source import NodeAllocations
from shepard_lib.logship.tags import AllocationLogs
from shepard_lib.logship.tailer import LogFile, Position, Stream, StreamReader, end_position, list_streams
from shepard_lib.model import Allocation

__all__ = ["AllocationsSource", "LogShipper", "RetryPolicy", "ShipReport", "SinkReport"]

log = logging.getLogger(__name__)

AllocationsSource = Callable[[], Iterable[Allocation]]
"""Yields this node's allocations (e.g. :class:`~shepard_lib.logship.source.NodeAllocations`)."""

_SKIP_READ = 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed send is retried within one round: ``attempts`` in all, waits doubling from
    ``initial`` seconds up to ``maximum``."""

    attempts: int = 3
    initial: float = 0.5
    maximum: float = 5.0


@dataclass
class SinkReport:
    """What one round did for one sink."""

    name: str
    lines: int = 0
    bytes: int = 0
    lag_bytes: int = 0
    error: str | None = None
    """Why the sink's reading paused this round (it stayed down after the retries), else None."""


@dataclass
class ShipReport:
    """What one round did: a :class:`SinkReport` per sink."""

    sinks: list[SinkReport] = field(default_factory=list)
    source_error: str | None = None
    """Why this node's allocations could not be listed (only the known ones were shipped), else None."""
    stream_errors: list[str] = field(default_factory=list)
    """Streams (or allocations' log directories) skipped this round because they could not be read,
    or whose checkpoint was invalid (``<sink>: <path>: <why>``)."""

    @property
    def ok(self) -> bool:
        """The allocations were listed, every stream was read, and every sink took everything it was given."""
        listed_and_read = self.source_error is None and not self.stream_errors
        return listed_and_read and all(s.error is None for s in self.sinks)


class LogShipper:
    """Ships the task logs of the allocations ``allocations_source`` yields, as ``cfg.log_shipping`` says.

    ``datacenter`` is the node's (a tag), or a callable asked at each round (so that a Nomad outage
    when the shipper is made is just a failed listing). ``sinks`` replaces the configured ones
    (tests, custom sinks). Call :meth:`close` when done. :meth:`for_node` builds one for a node.
    """

    def __init__(
        self,
        cfg: ShepardConfig,
        allocations_source: AllocationsSource,
        *,
        datacenter: str | Callable[[], str] = "",
        sinks: list[Sink] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._cfg = cfg
        self._shipping = cfg.log_shipping
        self._source = allocations_source
        self._datacenter = datacenter
        self._sinks = build_sinks(self._shipping) if sinks is None else sinks
        self._retry = retry or RetryPolicy()
        self._checkpoints = Checkpoints(self._shipping.checkpoint_path)
        self._first_round = False
        self._stream_errors: list[str] = []
        self.metrics = ShipperMetrics([s.name for s in self._sinks])
        """Counters and gauges per sink (see :mod:`shepard_lib.logship.metrics`)."""

    @classmethod
    def for_node(cls, cfg: ShepardConfig, nomad: NomadAPI, node_name: str | None = None) -> LogShipper:
        """A shipper of the allocations Nomad placed on ``node_name`` (else ``cfg.node_name``, else
        the local agent's node), with the configured sinks: what the agent and the CLI run."""
        source = NodeAllocations(nomad, node_name or cfg.node_name)
        return cls(cfg, source, datacenter=lambda: source.datacenter)

    def close(self) -> None:
        """Close every sink."""
        for sink in self._sinks:
            sink.close()

    # --- one round ------------------------------------------------------------------------

    def ship_once(self) -> ShipReport:
        """Ship every complete line not yet shipped, to every sink; persist checkpoints as it goes.

        One round at a time per checkpoint file (a file lock, so also across processes); the round
        starts from the checkpoints as the file has them.

        Raises CheckpointError when checkpoints cannot be written (shipping further would only
        repeat lines); a sink that fails, and a stream that cannot be read, are reported in the
        :class:`ShipReport`, not raised.
        """
        with self._checkpoints.locked():
            # The first run lasts until a round could list the allocations (``start_at`` applies to
            # what was there then): a round that could not writes no checkpoint file.
            self._first_round = not self._checkpoints.path.exists()
            self._checkpoints.reload()
            self._stream_errors = []
            streams, source_error = self._streams()
            sinks = [self._ship_sink(sink, streams) for sink in self._sinks]
            report = ShipReport(sinks, source_error, self._stream_errors)
            if not (self._first_round and source_error):
                self._checkpoints.save()
        return report

    def _streams(self) -> tuple[list[Stream], str | None]:
        """The streams of every allocation listed now or remembered (forgetting those whose files are
        gone), and why the listing failed, if it did."""
        listed: set[str] = set()
        try:
            datacenter = self._datacenter if isinstance(self._datacenter, str) else self._datacenter()
            for allocation in self._source():
                logs = AllocationLogs.of(allocation, self._cfg.nomad_data_dir, datacenter)
                self._checkpoints.remember(logs)
                listed.add(allocation.id)
            error = None
        except ShepardError as exc:
            log.warning("log shipping: cannot list this node's allocations (%s); shipping known ones", exc)
            error = str(exc)  # and forget nothing on a partial list
        streams: list[Stream] = []
        for alloc in self._checkpoints.allocations():
            try:
                present = alloc.logs_dir.is_dir()
                found = list_streams(alloc.alloc_id, alloc.logs_dir) if present else []
            except OSError as exc:  # e.g. no permission: this allocation waits, the others go on
                for sink in self._sinks:
                    self._unreadable(sink, str(alloc.logs_dir), exc)
                continue
            if not present:
                if error is None and alloc.alloc_id not in listed:
                    self._forget(alloc.alloc_id)
                continue
            for stream in found:
                stream.tags = alloc.tags(stream.task, stream.name) | self._shipping.tags
                newest = stream.files[-1]
                self._checkpoints.listed(stream.key, newest.index, newest.size)
                streams.append(stream)
        return streams, error

    def _forget(self, alloc_id: str) -> None:
        """Forget an allocation whose files are gone, counting what a sink had not shipped of them."""
        log.info("log shipping: allocation %s is gone; forgetting it", alloc_id)
        for sink in self._sinks:
            files = self._checkpoints.unshipped(alloc_id, sink.name)
            if files:
                log.warning(
                    "log shipping fell behind: the files of allocation %s were deleted before sink %s"
                    " shipped them; %d files were not shipped to their end", alloc_id, sink.name, files,
                )
                self.metrics.add("fell_behind", sink.name, files)
        self._checkpoints.forget(alloc_id)

    def _ship_sink(self, sink: Sink, streams: list[Stream]) -> SinkReport:
        report = SinkReport(sink.name)
        size, max_bytes = self._shipping.batch_size, self._shipping.batch_bytes
        batch, ends = Batch(), dict[tuple[str, str, str], Position]()
        with _Outbox(self, sink, report) as outbox:
            for n, stream in enumerate(streams):
                try:
                    start = self._start(sink.name, stream)
                    reader = StreamReader(stream, start, self._shipping.max_line_bytes)
                except OSError as exc:
                    self._unreadable(sink, stream.prefix.rstrip("."), exc)
                    continue
                try:
                    while True:
                        taken = self._read(sink, reader, batch)
                        if reader.position != start:
                            ends[stream.key] = reader.position
                        if len(batch.lines) >= size or batch.size >= max_bytes:
                            if not outbox.put(batch, ends):
                                for waiting in streams[n + 1 :]:  # where each would start, for the lag
                                    with contextlib.suppress(OSError):  # reported when it is read
                                        self._start(sink.name, waiting)
                                return self._finish(sink, streams, report)
                            batch, ends = Batch(), {}
                        if not taken:  # nothing more, or an error (a batch always has room before a read)
                            break
                finally:
                    reader.close()
            if outbox.put(batch, ends):
                outbox.put(Batch(), {})  # waits for the last batch
        return self._finish(sink, streams, report)

    def _read(self, sink: Sink, reader: StreamReader, batch: Batch) -> int:
        """Lines ``reader`` adds to ``batch``, as far as the batch has room; 0 when the stream cannot
        be read (reported; the lines taken before the error stay, ``reader.position`` after them)."""
        room = self._shipping.batch_size - len(batch.lines), self._shipping.batch_bytes - batch.size
        lost, before = reader.lost_files, len(batch.lines)
        try:
            taken, taken_bytes = reader.take(*room, batch.lines)
        except OSError as exc:
            self._unreadable(sink, reader.stream.prefix.rstrip("."), exc)
            taken, taken_bytes = 0, sum(len(line.data) for line in batch.lines[before:])
        batch.size += taken_bytes
        batch.lost_files += reader.lost_files - lost
        return taken

    def _unreadable(self, sink: Sink, what: str, exc: OSError) -> None:
        """Report a stream (or a log directory) that cannot be read this round (the others go on)."""
        problem = f"{sink.name}: {exc.filename or what}: {exc.strerror or exc}"
        log.error("log shipping: cannot read %s; skipping it this round", problem)
        self._stream_errors.append(problem)
        self.metrics.add("stream_errors", sink.name)

    def _finish(self, sink: Sink, streams: list[Stream], report: SinkReport) -> SinkReport:
        lag = 0
        for stream in streams:
            position = self._checkpoints.position(sink.name, stream.key)
            if position is not None:
                lag += stream.lag(position)
        report.lag_bytes = lag
        self.metrics.set("lag_bytes", sink.name, lag)
        return report

    def _delivered(self, sink: Sink, batch: Batch, outcome: BaseException | None, report: SinkReport) -> bool:
        """Account for a sent batch; False when the sink stayed down (its checkpoints stay)."""
        if isinstance(outcome, SinkRejected):
            refused = batch.lines if outcome.refused is None else outcome.refused
            log.error("log shipping: %s; %d lines skipped", outcome, len(refused))
            self.metrics.add("rejected_lines", sink.name, len(refused))
            refused_size = sum(len(line.data) for line in refused)
            self._shipped(sink, report, len(batch.lines) - len(refused), batch.size - refused_size)
        elif isinstance(outcome, SinkError):
            log.warning("log shipping: %s; %s waits at its checkpoint for the next round", outcome, sink.name)
            report.error = str(outcome)
            return False
        elif outcome is not None:
            raise outcome
        else:
            self._shipped(sink, report, len(batch.lines), batch.size)
        return True

    def _shipped(self, sink: Sink, report: SinkReport, lines: int, size: int) -> None:
        report.lines += lines
        report.bytes += size
        self.metrics.add("lines_shipped", sink.name, lines)
        self.metrics.add("bytes_shipped", sink.name, size)

    def _commit(self, sink: Sink, batch: Batch, ends: dict[tuple[str, str, str], Position]) -> None:
        """Move ``sink``'s checkpoints to ``ends`` (past ``batch``) and persist them."""
        if batch.lost_files:
            self.metrics.add("fell_behind", sink.name, batch.lost_files)
        if ends:
            for key, position in ends.items():
                self._checkpoints.set(sink.name, key, position)
            self._checkpoints.save()

    def _send(self, sink: Sink, batch: Batch) -> None:
        def attempt() -> None:
            try:
                sink.send(batch)
            except SinkError:
                self.metrics.add("errors", sink.name)
                raise

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._retry.attempts),
            wait=tenacity.wait_exponential(multiplier=self._retry.initial, max=self._retry.maximum),
            retry=tenacity.retry_if_exception_type(SinkError),
            reraise=True,
        )
        retrying(attempt)

    # --- where a sink starts in a stream --------------------------------------------------

    def _start(self, sink: str, stream: Stream) -> Position:
        """``sink``'s position in ``stream``: its checkpoint, checked against the files, or a fresh start.

        A changed position is recorded at once (nothing was shipped from it yet).
        """
        position = self._checkpoints.position(sink, stream.key)
        first = stream.files[0]
        if position is None:
            fresh = self._first_round or self._checkpoints.known(stream.key)
            if fresh and self._shipping.start_at is StartAt.END:
                position = end_position(stream, self._shipping.max_line_bytes)
            else:
                position = Position(first.index, 0, first.inode)
        else:
            position = self._checked(sink, stream, position)
        if self._shipping.buffer_limit:
            position = self._limit(sink, stream, position)
        self._checkpoints.set(sink, stream.key, position)
        return position

    def _checked(self, sink: str, stream: Stream, position: Position) -> Position:
        """``position``, or where to go on when its file was deleted or replaced (reported), or when
        the checkpoint itself is invalid (a negative offset: that file ships again from its start)."""
        current = stream.file(position.index)
        if current is not None and current.inode == position.inode:
            if 0 <= position.offset <= current.size:
                return position
            if position.offset < 0:
                problem = f"{sink}: {current.path}: invalid checkpoint offset {position.offset}"
                log.error("log shipping: %s; shipping that file again from its start", problem)
                self._stream_errors.append(problem)
                self.metrics.add("stream_errors", sink)
                return Position(current.index, 0, current.inode)
        later = [f for f in stream.files if f.index > position.index]
        if current is not None:
            what, resume = "was truncated or replaced", current
        elif later:
            what, resume = "was deleted by Nomad's log rotation", later[0]
        else:
            what, resume = "is gone", stream.files[0]
        lost = max(1, resume.index - position.index)  # files: the checkpoint's, and any before resume
        log.warning(
            "log shipping fell behind: %s%d %s before sink %s shipped it from offset %d; going on with %s",
            stream.prefix, position.index, what, sink, position.offset, resume.path,
        )
        self.metrics.add("fell_behind", sink, lost)
        return Position(resume.index, 0, resume.inode)

    def _limit(self, sink: str, stream: Stream, position: Position) -> Position:
        """``position`` moved forward so that at most ``buffer_limit`` bytes are left (drops counted)."""
        excess = stream.lag(position) - self._shipping.buffer_limit
        if excess <= 0:
            return position
        dropped = 0
        for f in stream.files:
            if f.index < position.index:
                continue
            begin = position.offset if f.index == position.index else 0
            span = min(f.size - begin, excess)
            dropped += _count_newlines(f.path, begin, span)
            excess -= span
            position = Position(f.index, begin + span, f.inode)
            if excess <= 0:
                break
        # Go on at the next line start: the byte before the new position may already end a line.
        limit = self._shipping.max_line_bytes
        newline = _find_newline(stream.file(position.index), position.offset - 1, limit)
        if newline is not None and newline >= position.offset:
            dropped += 1
        if newline is not None:
            position = Position(position.index, newline + 1, position.inode)
        log.warning(
            "log shipping: sink %s is more than buffer_limit=%d bytes behind in %s; dropped %d lines",
            sink, self._shipping.buffer_limit, stream.prefix.rstrip("."), dropped,
        )
        self.metrics.add("dropped_lines", sink, dropped)
        return position


def _count_newlines(path: str, offset: int, length: int) -> int:
    count = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = f.read(min(_SKIP_READ, length))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                length -= len(chunk)
    except FileNotFoundError:
        pass
    return count


def _find_newline(file: LogFile | None, offset: int, limit: int) -> int | None:
    """The offset of the first newline at or after ``offset`` within ``limit`` bytes, or None."""
    if file is None or offset < 0:
        return None
    try:
        with open(file.path, "rb") as f:
            f.seek(offset)
            found = f.read(limit).find(b"\n")
    except FileNotFoundError:
        return None
    return None if found < 0 else offset + found


class _Outbox:
    """Sends a sink's batches from one worker thread, so that reading the next batch (and saving the
    checkpoints of the previous one) overlaps the sink's I/O. At most one batch is in flight, and
    checkpoints move in order, only past batches the sink took: a crash repeats at most one batch.
    """

    def __init__(self, shipper: LogShipper, sink: Sink, report: SinkReport) -> None:
        self._shipper = shipper
        self._sink = sink
        self._report = report
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"logship-{sink.name}")
        self._in_flight: tuple[Future[None], Batch, dict[tuple[str, str, str], Position]] | None = None

    def __enter__(self) -> _Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)

    def put(self, batch: Batch, ends: dict[tuple[str, str, str], Position]) -> bool:
        """Wait for the batch in flight, then send ``batch`` (moving the checkpoints to ``ends`` once
        it is taken). False, sending nothing, when the batch in flight failed."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            future, sent, sent_ends = previous
            if not self._shipper._delivered(self._sink, sent, future.exception(), self._report):
                return False
        if batch.lines:
            self._in_flight = (self._pool.submit(self._shipper._send, self._sink, batch), batch, ends)
        if previous is not None:
            self._shipper._commit(self._sink, sent, sent_ends)
        if not batch.lines:
            self._shipper._commit(self._sink, batch, ends)
        return True
