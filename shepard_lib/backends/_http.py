"""What the two backends share: the retry policy, error classification, durations, TLS, redaction.

Which failures are retried (``transient``):

- the request never reached a server (connection refused, DNS failure, connect timeout);
- HTTP 429, and 5xx that mean "not now" (e.g. Consul's 500 "No cluster leader", 502/503/504),
  except for calls that are not safe to repeat (the fenced trigger txn, Nomad's restart POST):
  for those only answers that say nothing was applied are retried (429, 503, "No cluster
  leader"), since a 500 or a proxy's 502/504 may come after the write took effect, and repeating
  it would restart the task twice;
- a read timeout or a connection dropped mid-request, but only for reads: a write may have been
  applied before the answer was lost, and repeating it (a CAS, a txn) could misreport or repeat it.

Never retried: TLS failures (a certificate that does not verify), every other 4xx, a 409 txn
rollback (an answer, not an error), and 500s that are semantic answers, which Consul and Nomad
give for a request that can never succeed (e.g. Consul's 500 "invalid session" on ``?acquire``,
"Missing check 'serfHealth' registration" on session create, Nomad's 500 "Unknown allocation" or
"task not found"). ``SEMANTIC_500`` lists them.

Connections (:func:`pinned_session`): ``requests`` re-reads the proxy variables, ``~/.netrc`` and the
CA-bundle variables from the environment on every request of a session that trusts the
environment (about 0.2 ms of CPU each). A backend reads them once, when it is built, and keeps up
to ``pool_size`` keep-alive connections, so each thread in flight (a worker, a watcher, a session
renewal) reuses its own connection instead of opening one and discarding it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import requests
import tenacity
import urllib3.exceptions

from shepard_lib.cancel import CancelEvent, wait_any
from shepard_lib.clock import REAL_CLOCK, Clock
from shepard_lib.durations import format_go_duration
from shepard_lib.errors import BackendError, Cancelled

from ._inflight import CancellableAdapter, cancellable
from ._outage import OUTAGES, unreachable

log = logging.getLogger("shepard_lib.backends")

T = TypeVar("T")
E = TypeVar("E", bound=BackendError)

SEMANTIC_500 = re.compile(
    r"invalid|missing (check|node)|not registered|unknown (allocation|task|node|job)|not found|"
    r"not running|permission denied",
    re.IGNORECASE,
)
"""5xx response bodies that are answers, not outages: retrying cannot change them."""

REDACTED = "<redacted>"
_TOKEN_IN_TEXT = re.compile(
    r"(?i)((?:^|[?&;\s])token=|x-(?:consul|nomad)-token['\"]?\s*[:=]\s*['\"]?)[^&\s'\",}]+"
)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: ``attempts`` tries in all, exponential backoff with jitter.

    Delays are cluster seconds (slept through the backend's clock): the n-th retry waits
    ``min(maximum, initial * multiplier**(n-1)) + uniform(0, jitter)``.
    """

    attempts: int = 5
    initial: float = 0.2
    maximum: float = 3.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        if min(self.initial, self.maximum, self.jitter) < 0 or self.multiplier < 1:
            raise ValueError("retry delays must be >= 0 and the multiplier >= 1")


NO_RETRY = RetryPolicy(attempts=1)
"""A policy that tries once (handy for tests and for callers that retry themselves)."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret, and anything that looks like a token parameter or header, replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _TOKEN_IN_TEXT.sub(lambda m: m.group(1) + REDACTED, text)


NOT_APPLIED = re.compile(r"no cluster leader|no leader", re.IGNORECASE)
"""5xx bodies that say the request was refused before anything was applied."""


def transient_status(status: int, body: str, *, repeatable: bool = True) -> bool:
    """Whether an HTTP error status may go away on retry (429 and 5xx that are not answers).

    ``repeatable`` is False for a call that must not be applied twice: then only a status that
    proves nothing was applied counts (429, 503, a "no cluster leader" refusal).
    """
    if status in (429, 503):
        return True
    if not 500 <= status < 600 or (status == 500 and SEMANTIC_500.search(body)):
        return False
    return repeatable or bool(NOT_APPLIED.search(body))


def transport_error(
    error_cls: type[E],
    call: str,
    exc: requests.RequestException,
    *,
    idempotent: bool,
    secrets: Iterable[str | None],
) -> E:
    """The backend error for a request that got no HTTP answer."""
    if isinstance(exc, requests.exceptions.SSLError):
        transient = False  # a certificate that does not verify will not verify on retry either
    else:
        transient = _never_sent(exc) or (
            idempotent and isinstance(exc, requests.ConnectionError | requests.Timeout)
        )
    return error_cls(
        call, redact(unreachable(error_cls.service.capitalize(), exc), secrets), transient=transient
    )


def _never_sent(exc: requests.RequestException) -> bool:
    """Whether the request failed before a connection existed (so the server cannot have seen it)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    return isinstance(getattr(reason, "reason", reason), urllib3.exceptions.NewConnectionError)


def call_with_retry(
    fn: Callable[[], T],
    *,
    call: str,
    policy: RetryPolicy,
    clock: Clock = REAL_CLOCK,
    server: str | None = None,
    cancel: tuple[CancelEvent, ...] = (),
) -> T:
    """Run ``fn``; on a transient :class:`BackendError` retry it as ``policy`` says, then re-raise.

    The waits between retries end when one of ``cancel`` is set (``fn`` then raises
    :class:`~shepard_lib.errors.Cancelled`: see :func:`send_cancellable`).

    The first attempt runs directly (most calls succeed at once, and building the retry machinery
    costs about a tenth of a request's CPU); after a transient failure the retries go on exactly as
    if every attempt had run under it, the first failure counting as attempt 1. With ``server``
    (``"Consul at http://..."``) failures are logged once per outage of it
    (:data:`~shepard_lib.backends._outage.OUTAGES`), not once per retry.
    """
    try:
        result = fn()
    except BackendError as exc:
        if not exc.transient or policy.attempts <= 1:
            raise
        first: BackendError | None = exc
    else:
        if server is not None:
            OUTAGES.answered(server)
        return result

    def attempt() -> T:
        nonlocal first
        if first is not None:
            failed, first = first, None
            raise failed
        return fn()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        # wait_exponential + wait_random rather than wait_exponential_jitter, whose arguments
        # changed between tenacity releases (``initial`` is deprecated in 9.x, absent ``multiplier`` in 8.x).
        wait=tenacity.wait_exponential(
            multiplier=policy.initial, max=policy.maximum, exp_base=policy.multiplier
        )
        + tenacity.wait_random(0, policy.jitter),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, BackendError) and e.transient),
        sleep=functools.partial(_sleep, clock, cancel),
        before_sleep=lambda state: _log_retry(call, policy, state, server),
        reraise=True,
    )
    result = retrying(attempt)
    if server is not None:
        OUTAGES.answered(server)
    return result


def _sleep(clock: Clock, cancel: tuple[CancelEvent, ...], seconds: float) -> None:
    """Sleep ``seconds`` cluster seconds, or until one of ``cancel`` is set."""
    if cancel:
        wait_any(clock, cancel, seconds)
    else:
        clock.sleep(seconds)


def _log_retry(call: str, policy: RetryPolicy, state: tenacity.RetryCallState, server: str | None) -> None:
    error = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    if server is not None:
        OUTAGES.failed(server, error, state.attempt_number, policy.attempts, delay)
        return
    log.warning(
        "%s: attempt %d/%d failed, retrying in %.2fs: %s",
        call,
        state.attempt_number,
        policy.attempts,
        delay,
        error,
    )


def send_cancellable(
    send: Callable[[], T], call: str, cancel: tuple[CancelEvent | None, ...]
) -> T:
    """``send()`` (one attempt of a request), aborted at once when one of ``cancel`` is set.

    Raises :class:`~shepard_lib.errors.Cancelled` instead of sending when one is set already, and
    instead of the transport error the abort causes (a request that answered before it was
    cancelled returns its answer). The socket of the request in flight is shut down (see
    :mod:`~shepard_lib.backends._inflight`).
    """
    if any(event is not None and event.is_set() for event in cancel):
        raise Cancelled(f"{call}: cancelled")
    with cancellable(*cancel) as in_flight:
        try:
            return send()
        except (requests.RequestException, BackendError):
            if in_flight.cancelled:
                raise Cancelled(f"{call}: cancelled while waiting for the answer") from None
            raise


def go_duration(seconds: float) -> str:
    """A Go duration for ``seconds``, to the millisecond and at least 1ms: ``"5s"``, ``"1.5s"``, ``"5m"``.

    Never ``"0s"``: Consul and Nomad read ``?wait=0s`` as "the default wait" (minutes).
    """
    return format_go_duration(max(1, round(seconds * 1000)) / 1000)


def tls_settings(
    verify: bool, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> tuple[bool | str, str | tuple[str, str] | None]:
    """``requests``' ``verify`` and ``cert`` arguments from the TLS settings of a config.

    Verification stays on unless ``verify`` is False; ``ca_file`` replaces the system CAs.
    """
    verify_arg: bool | str = ca_file if (verify and ca_file) else verify
    if cert_file and key_file:
        return verify_arg, (cert_file, key_file)
    return verify_arg, cert_file or None


DEFAULT_POOL_SIZE = 128
"""Keep-alive connections a backend keeps per scheme. Every thread talking at once (rollout workers,
health watchers, session renewals) needs its own; Consul allows 200 per client address by default
(``limits.http_max_conns_per_client``)."""


def pinned_session(
    session: requests.Session, url: str, verify: bool | str, pool_size: int = DEFAULT_POOL_SIZE
) -> bool | str:
    """Fix ``session``'s environment settings for ``url`` now, give it ``pool_size`` connections.

    The proxies of ``HTTP(S)_PROXY``/``NO_PROXY`` and, when ``verify`` is True, a CA bundle named by
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are read once here, as ``requests`` would read them on
    each request, and the session stops reading the environment (``~/.netrc`` is not used: Consul
    and Nomad take tokens). Returns the ``verify`` argument to send with each request.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    settings = session.merge_environment_settings(url, {}, None, verify, None)
    session.trust_env = False
    session.proxies.update(settings["proxies"])
    adapter = CancellableAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    resolved: bool | str | None = settings["verify"]
    return verify if resolved is None else resolved


def blocking_timeout(wait: float, clock: Clock, margin: float) -> float:
    """Real seconds to wait for the answer to a blocking query of ``wait`` cluster seconds.

    The server holds the query for ``wait`` plus up to ``wait/16`` of jitter before it answers.
    """
    return clock.real(wait + wait / 16) + margin
