"""The ``http`` sink: Loki's push API (``loki``) or newline-delimited JSON (``ndjson``).

``loki``: ``POST`` ``{"streams": [{"stream": {labels}, "values": [["<ns>", "<line>", {metadata}]]}]}``
(``Content-Type: application/json``). The labels are the low-cardinality tags (namespace, job,
group, task, node, datacenter, stream) and the static tags, with ``.`` written ``_`` as Loki label
names require (``nomad_job_name``); the per-allocation and per-line tags (allocation ID, name and
index, file, offset, cut) are structured metadata (Loki 3, or 2.9 with
``allow_structured_metadata``), so they do not multiply Loki's streams. Timestamps are the read
time in nanoseconds plus the line's position in the batch, so equal lines stay distinct.

``ndjson``: the same JSON objects as the file sink, one a line (``application/x-ndjson``).

2xx is success; 400 and 422 (the receiver refuses the content) reject the batch for good; any
other answer or a transport error is retried.
"""

from __future__ import annotations

import json
from typing import Any

import requests

from shepard_lib.config import HttpFormat, redact_url
from shepard_lib.logship.records import Batch, JsonEncoder, SinkError, SinkRejected
from shepard_lib.logship.tags import (
    ALLOC_ID,
    ALLOC_INDEX,
    ALLOC_NAME,
    BUILTIN,
    CUT,
    FILE_PATH,
    LOW_CARDINALITY,
    OFFSET,
)
from shepard_lib.logship.tailer import Stream

__all__ = ["HttpSink", "loki_label"]

_TIMEOUT = 10.0
_REJECTED = (400, 422)
_PER_ALLOCATION = (ALLOC_ID, ALLOC_NAME, ALLOC_INDEX)


def loki_label(tag: str) -> str:
    """A tag name as a Loki label name (``[a-zA-Z_][a-zA-Z0-9_]*``)."""
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in tag)
    return name if name[:1].isalpha() or name[:1] == "_" else f"_{name}"


class HttpSink:
    """POSTs each batch to ``url`` in ``fmt``."""

    name = "http"

    def __init__(self, url: str, fmt: HttpFormat, *, timeout: float = _TIMEOUT) -> None:
        self.url = url
        self.format = fmt
        self.timeout = timeout
        self._session = requests.Session()
        self._json = JsonEncoder()
        self._labels: dict[Stream, tuple[tuple[str, str], ...]] = {}

    def _stream_labels(self, stream: Stream) -> tuple[tuple[str, str], ...]:
        labels = self._labels.get(stream)
        if labels is None:
            if len(self._labels) > 4096:
                self._labels.clear()
            labels = tuple(
                (loki_label(k), v) for k, v in stream.tags.items() if k in LOW_CARDINALITY or k not in BUILTIN
            )
            self._labels[stream] = labels
        return labels

    def loki_body(self, batch: Batch) -> dict[str, Any]:
        """The push API body of ``batch``."""
        streams: dict[tuple[tuple[str, str], ...], list[list[Any]]] = {}
        base = int(batch.time * 1e9)
        for n, line in enumerate(batch.lines):
            tags = line.stream.tags
            metadata = {loki_label(k): tags[k] for k in _PER_ALLOCATION}
            metadata[loki_label(FILE_PATH)] = line.stream.path(line.file)
            metadata[loki_label(OFFSET)] = str(line.offset)
            if line.cut:
                metadata[loki_label(CUT)] = "true"
            entry = [str(base + n), line.data.decode("utf-8", "replace"), metadata]
            streams.setdefault(self._stream_labels(line.stream), []).append(entry)
        return {"streams": [{"stream": dict(labels), "values": values} for labels, values in streams.items()]}

    def send(self, batch: Batch) -> None:
        """POST the batch; SinkRejected on 400/422, SinkError on anything else but 2xx."""
        if self.format is HttpFormat.LOKI:
            body = json.dumps(self.loki_body(batch)).encode("utf-8")
            content_type = "application/json"
        else:
            body = self._json.encode(batch)
            content_type = "application/x-ndjson"
        where = redact_url(self.url)
        try:
            response = self._session.post(
                self.url, data=body, headers={"Content-Type": content_type}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise SinkError(f"http sink: POST {where} failed: {type(exc).__name__}") from None
        if 200 <= response.status_code < 300:
            return
        detail = response.text[:200].strip()
        message = f"http sink: POST {where} answered {response.status_code}: {detail}"
        if response.status_code in _REJECTED:
            raise SinkRejected(message)
        raise SinkError(message)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._session.close()

