# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Run work in a detached process that outlives the module (``rolling_restart`` with ``wait: false``).

The module forks twice, as Ansible's own ``async_wrapper`` does: the grandchild is in a new
session, points stdin/stdout/stderr at ``/dev/null`` (Ansible waits for the module's stdout to
close) and closes every other inherited descriptor, then runs the work. The module waits only
until the work reports, through a pipe, that it has got far enough (say, its plan is registered in
Consul), or failed before that.
"""

from __future__ import annotations

import json
import os
import select


def run_detached(work, timeout):
    """Run ``work(report)`` in a detached process; return the first message it reports.

    ``report(message)`` sends one JSON-serialisable message to the module (only the first one
    counts); an exception escaping ``work`` before that is reported as ``{"error": "<message>"}``,
    and work that ends without reporting as ``{"error": "ended without reporting"}``. Returns
    ``{"timeout": <timeout>}`` if nothing arrives in ``timeout`` real seconds (the work goes on).
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        try:
            _grandchild(work, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(child, 0)
    with os.fdopen(read_fd, "r", encoding="utf-8") as reader:
        ready = select.select([reader], [], [], timeout)[0]
        line = reader.readline() if ready else ""
    if not ready:
        return {"timeout": timeout}
    return json.loads(line) if line else {"error": "ended without reporting"}


def _grandchild(work, write_fd):
    os.setsid()
    if os.fork() != 0:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # Nothing inherited may keep a pipe of the caller open (it would wait for EOF until the work ends).
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
    writer = os.fdopen(write_fd, "w", encoding="utf-8")

    def report(message):
        if not writer.closed:
            writer.write(json.dumps(message) + "\n")
            writer.close()

    try:
        work(report)
    except Exception as exc:  # pylint: disable=broad-except  # reported to the module, which fails with it
        report({"error": str(exc)})
    finally:
        if not writer.closed:
            writer.close()
    os._exit(0)
