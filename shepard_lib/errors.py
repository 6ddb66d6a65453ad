"""The one exception hierarchy of Shepard.

Every error says what failed and, where it can, what to do about it. Messages never contain
tokens: the backends redact them before an error is raised.
"""

from __future__ import annotations


class ShepardError(Exception):
    """Base class of every error Shepard raises on purpose."""


class ConfigError(ShepardError):
    """The configuration (file, environment or arguments) is invalid.

    ``problems`` holds one message per problem, each naming the key path and what was expected.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class BackendError(ShepardError):
    """A call to Consul or Nomad failed.

    ``call`` names the operation (``"kv.get shepard/locks/web"``), ``status`` is the HTTP status
    when there was a response, ``transient`` tells whether a retry may help.
    """

    service = "backend"

    def __init__(self, call: str, reason: str, status: int | None = None, transient: bool = False) -> None:
        self.call = call
        self.reason = reason
        self.status = status
        self.transient = transient
        where = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{self.service} {call} failed{where}: {reason}")


class ConsulError(BackendError):
    """A Consul API call failed."""

    service = "consul"


class NomadError(BackendError):
    """A Nomad API call failed."""

    service = "nomad"


class NotFound(BackendError):
    """The object asked for does not exist (HTTP 404 where 404 is not an ordinary answer)."""


class Cancelled(ShepardError):
    """A call was cancelled (its :class:`~shepard_lib.cancel.CancelEvent` was set, or its backend
    closed) while it waited: the caller is stopping, this is not a failure."""


class LockLost(ShepardError):
    """A lock or restart slot was lost (its session was invalidated) while it was needed."""


class LockTimeout(ShepardError):
    """A lock or slot could not be acquired before the timeout."""


class HealthTimeout(ShepardError):
    """A restarted task did not become healthy before its deadline."""


class TaskFailed(ShepardError):
    """A restarted task failed (crashed, or its checks went critical) instead of becoming healthy."""


class PlanError(ShepardError):
    """A restart plan could not be created or updated (e.g. it is failed and must be resumed)."""
