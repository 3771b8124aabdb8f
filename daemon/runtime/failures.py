"""The failure contract (DESIGN.md, "Failure contract"): what kind each exception is, decided here alone,
and the pauses that transient failures hold while they last.

`classify(exc, where)` answers one of:

- `RECORD`: the record's own data is bad. An error line, permanent; the next record goes on.
- `TRANSIENT`: the cause is outside the record and may pass. Nothing is marked done or
  failed; the call is retried with backoff (0.5 s doubling to 30 s) and intake pauses while
  it lasts (`reelflow_paused{reason}` = 1, `/readyz` 503, one log line when it starts and
  one when it ends).
- `JOB`: the job's own outbox files cannot be opened or written for a reason that will not
  pass by itself. The job fails (its inbox file goes to `inbox/.failed/`); other jobs go on.
- `FATAL`: the pipeline cannot go on (`WorkerGone`: a remote host spent its own
  replacements). The pipeline stops and every waiting job wakes with the cause.

The rule depends on where the exception was raised (`where`):

- `STAGE` (a stage's `prepare` or model call, raised or returned in a record's slot): a
  `StageError` is record-level, except one that says the endpoint is down or throttling
  after the stage's own retries (`APIConnectionError`, `RateLimitError`, HTTP 502/503/504):
  that is transient, and the record is asked again later (a timeout answered for one
  record stays its own: its request may be what is slow). An `OSError`
  is transient when its errno says the machine is short of something (ENOSPC, EDQUOT:
  disk full; EIO, EAGAIN, EBUSY: io_error; ENOMEM: out_of_memory), or it is a connection
  error or a timeout (endpoint); any other `OSError` there (ENOENT, ENAMETOOLONG, EISDIR of
  the record's media path, a decode error) names the record's own file and is
  record-level. A host `MemoryError` is transient (the worker still halves a batch that
  ran out of memory first, and a record out of memory alone stays an error, as before).
  Client errors of HTTP libraries are recognised by name (no import of them here).
  `WorkerLost` is transient (the worker's crash isolation retries it), `WorkerGone` fatal.
  Everything else is the record's data: record-level.
- `OUTBOX` (opening or appending a job's results, errors or intermediate files): the
  transient errnos above are transient; every other failure there is job-level (EISDIR,
  ENOTDIR, EACCES, EPERM, EROFS, ENAMETOOLONG on the outbox path, or anything else that
  stops the writer): retrying it would not help and no record is to blame.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from daemon.hosts.base import WorkerGone, WorkerLost
from stages.base import StageError

log = logging.getLogger(__name__)

RECORD, TRANSIENT, JOB, FATAL = "record", "transient", "job", "fatal"
STAGE, OUTBOX = "stage", "outbox"

DISK_FULL, IO_ERROR, OUT_OF_MEMORY, ENDPOINT, WORKER_LOST = (
    "disk_full",
    "io_error",
    "out_of_memory",
    "endpoint",
    "worker_lost",
)
REASONS = (DISK_FULL, IO_ERROR, OUT_OF_MEMORY, ENDPOINT, WORKER_LOST)

TRANSIENT_ERRNOS = {
    errno.ENOSPC: DISK_FULL,
    errno.EDQUOT: DISK_FULL,
    errno.EIO: IO_ERROR,
    errno.EAGAIN: IO_ERROR,
    errno.EBUSY: IO_ERROR,
    errno.ENOMEM: OUT_OF_MEMORY,
}
# HTTP clients' connection and timeout errors (httpx, openai, requests, aiohttp), by class name.
ENDPOINT_ERRORS = frozenset(
    {
        "APIConnectionError",
        "APITimeoutError",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "WriteTimeout",
        "PoolTimeout",
        "RemoteProtocolError",
        "ClientConnectionError",
        "ServerDisconnectedError",
    }
)

# Error types the API stages give a record after their own retries, when the endpoint is the cause.
ENDPOINT_STAGE_ERRORS = frozenset({"APIConnectionError", "RateLimitError"})
GATEWAY_STATUS = re.compile(r"\bHTTP 50[234]\b")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


def transient_reason(exc: BaseException) -> str | None:
    """The `reelflow_paused` reason when `exc` may pass by itself, else None (any `where`)."""
    if isinstance(exc, StageError):
        if exc.errno in TRANSIENT_ERRNOS:  # an OSError turned into a slot (a Ray actor's prepare): disk full, EIO
            return TRANSIENT_ERRNOS[exc.errno]
        down = exc.error_type in ENDPOINT_STAGE_ERRORS
        down = down or (exc.error_type == "InternalServerError" and GATEWAY_STATUS.search(exc.message) is not None)
        return ENDPOINT if down else None
    if isinstance(exc, WorkerLost):
        return WORKER_LOST
    if isinstance(exc, MemoryError):
        return OUT_OF_MEMORY
    if isinstance(exc, ConnectionError | TimeoutError):
        return ENDPOINT
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return TRANSIENT_ERRNOS[exc.errno]
    if any(cls.__name__ in ENDPOINT_ERRORS for cls in type(exc).__mro__):
        return ENDPOINT
    return None


def classify(exc: BaseException, where: str = STAGE) -> str:
    """RECORD, TRANSIENT, JOB or FATAL for an exception raised at `where` (STAGE or OUTBOX)."""
    if isinstance(exc, WorkerGone):
        return FATAL
    if transient_reason(exc) is not None:
        return TRANSIENT
    return JOB if where == OUTBOX else RECORD


def describe(exc: BaseException) -> str:
    """`OSError [Errno 28] No space left on device: 'outbox/a.jsonl'`: the type, errno, cause and path."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)


class JobFailed(Exception):
    """A job-level failure: its outbox cannot be written. The message names the path and the cause."""


class PipelineDied(Exception):
    """The pipeline task ended with an error: no record of any job can make progress."""


T = TypeVar("T")


class Pauses:
    """The transient causes in force. Intake waits (`wait_clear`) while any lasts.

    `outlast(exc, what, call)` is how a caller that met a transient failure waits it out:
    the cause is held (metric, log line) until `call` succeeds; a failure of another kind
    on the way is raised to the caller, which handles it by its own kind.
    """

    def __init__(self, metrics=None):
        self.metrics = metrics
        self._held: Counter[str] = Counter()
        self._clear = asyncio.Event()
        self._clear.set()
        self._why: dict[str, str] = {}

    @property
    def active(self) -> list[str]:
        return sorted(reason for reason, n in self._held.items() if n > 0)

    def summary(self) -> str:
        return "; ".join(f"{reason}: {self._why.get(reason, '')}" for reason in self.active)

    async def wait_clear(self) -> None:
        await self._clear.wait()

    def _hold(self, reason: str, what: str, exc: BaseException) -> None:
        if self._held[reason] == 0:
            self._why[reason] = f"{what}: {describe(exc)}"
            log.warning(
                "pausing intake (%s): %s: %s; retrying with backoff until it passes", reason, what, describe(exc)
            )
            if self.metrics is not None:
                self.metrics.paused.labels(reason).set(1)
        self._held[reason] += 1
        self._clear.clear()

    def _release(self, reason: str) -> None:
        self._held[reason] -= 1
        if self._held[reason] > 0:
            return
        del self._held[reason]
        log.warning("resuming intake: %s has passed (%s)", reason, self._why.pop(reason, ""))
        if self.metrics is not None:
            self.metrics.paused.labels(reason).set(0)
        if not self._held:
            self._clear.set()

    async def outlast(self, exc: BaseException, what: str, call: Callable[[], Awaitable[T]], where: str = STAGE) -> T:
        """Retry `call` (which just raised the transient `exc`) with capped backoff until it succeeds."""
        reason = transient_reason(exc)
        assert reason is not None, f"outlast() is for transient failures; {describe(exc)} is not one"
        self._hold(reason, what, exc)
        delay = BACKOFF_START_S
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                try:
                    return await call()
                except Exception as again:
                    # A lost worker goes back to the worker's crash isolation, which retries it its way.
                    if isinstance(again, WorkerLost) or classify(again, where) != TRANSIENT:
                        raise
                    log.debug("%s: still failing: %s", what, describe(again))
        finally:
            self._release(reason)

    async def call(self, what: str, call: Callable[[], Awaitable[T]], where: str = STAGE) -> T:
        """`call()`, outlasting transient failures; failures of other kinds are raised."""
        try:
            return await call()
        except Exception as exc:
            if classify(exc, where) != TRANSIENT:
                raise
            return await self.outlast(exc, what, call, where)
