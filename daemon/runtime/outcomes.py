"""Where a record ends: `JobRun` (a job's live state) and `Outcomes`, which files each finished
batch: failures in the job's errors, filtered records in its filtered file, split records as
children (on their way again), successes in the step's intermediate file and, after the last
step, the results. A record leaves the pipeline exactly once, and its job hears about it.

Writes follow the failure contract (daemon/runtime/failures.py): a transient failure
(disk full) is outlasted, with intake paused (`pauses`), and marks nothing; a job-level one
fails that job alone (`JobRun.fail`), whose records still in flight are then dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from daemon.io.outbox import JobWriter
from daemon.io.records import Record
from daemon.metrics import Metrics
from daemon.runtime.failures import OUTBOX, JobFailed, Pauses, describe
from daemon.runtime.worker import Failure
from stages.base import Filtered

log = logging.getLogger(__name__)


def _by_job(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        grouped[record.job].append(record)
    return grouped


class JobRun:
    """A job's live state: its writer and how many of its records are still on their way."""

    def __init__(self, name: str, writer: JobWriter):
        self.name = name
        self.writer = writer
        self.outstanding = 0
        self.reading_done = False
        self.ok = 0
        self.errors = 0
        self.filtered = 0
        self.expanded = 0  # parents that fanned out into children (each child ends on its own)
        self.skipped = 0
        self.done = None  # the resume ledger (IdSet): children already written are not run again
        self.interrupted = False  # reading was stopped by a shutdown; the job stays claimed
        self.failure: Exception | None = None  # job-level failure, or the pipeline's death
        self.finished = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    def fail(self, failure: Exception) -> None:
        """The job cannot go on (its outbox cannot be written, or the pipeline died): wake its waiter."""
        if self.failure is None:
            self.failure = failure
        self.finished.set()
        self.idle.set()

    def settle(self, ok: int = 0, errors: int = 0, filtered: int = 0) -> None:
        self.ok += ok
        self.errors += errors
        self.filtered += filtered
        self.outstanding -= ok + errors + filtered
        self._check()

    def expand(self, parents: int, children: int) -> None:
        """`parents` records became `children` records, each of which is still on its way."""
        self.expanded += parents
        self.outstanding += children - parents
        self._check()

    def mark_read(self) -> None:
        self.reading_done = True
        self._check()

    def admit(self) -> None:
        self.outstanding += 1
        self.idle.clear()

    def _check(self) -> None:
        if self.outstanding == 0:
            self.idle.set()
            if self.reading_done:
                self.finished.set()


class Outcomes:
    """Files finished records in their jobs' outbox files; `jobs` is the pipeline's live jobs."""

    def __init__(self, jobs: dict[str, JobRun], metrics: Metrics, pauses: Pauses):
        self.jobs = jobs
        self.metrics = metrics
        self.pauses = pauses

    async def failed(self, label: str, failed: list[Failure]) -> None:
        """Records that failed at step `label`: one errors write per job."""
        if not failed:
            return
        self.metrics.records.labels(label, "error").inc(len(failed))
        by_job: dict[str, list] = defaultdict(list)
        for record, kind, message in failed:
            by_job[record.job].append((record, label, kind, message))
        for job_name, entries in by_job.items():
            job = self._live_job(job_name, len(entries))
            if job is not None and await self._write(job, "errors", job.writer.write_errors, entries):
                job.settle(errors=len(entries))

    async def passed(self, label: str, ok: list[Record], last: bool) -> list[Record]:
        """Records step `label` finished; returns those that go on to the next step."""
        ok = await self._filtered_and_children(label, ok)
        if not ok:
            return []
        self.metrics.records.labels(label, "ok").inc(len(ok))
        going_on: list[Record] = []
        for job_name, records in _by_job(ok).items():
            job = self._live_job(job_name, len(records))
            # Two writes, each retried alone: a retry of the results never repeats the step file's lines.
            if job is None or not await self._write(job, label, job.writer.write_intermediate, label, records):
                continue
            if last and not await self._write(job, "results", job.writer.write_results, records):
                continue
            if last:
                job.settle(ok=len(records))
            else:
                going_on.extend(records)
        return going_on

    async def _filtered_and_children(self, label: str, ok: list[Record]) -> list[Record]:
        """File the records a stage filtered, fan out the ones it split; return the rest, which go on."""
        plain = [r for r in ok if r.filtered is None and r.children is None]
        if len(plain) == len(ok):
            return ok
        for record in ok:
            if record.children == []:  # a split that yields nothing is a filter with that reason
                record.children = None
                record.filtered = Filtered(f"{label} produced no output records (e.g. no clip long enough)")
        filtered = [r for r in ok if r.filtered is not None]
        parents = [r for r in ok if r.children is not None]
        if filtered:
            self.metrics.records.labels(label, "filtered").inc(len(filtered))
        for job_name, records in _by_job(filtered).items():
            job = self._live_job(job_name, len(records))
            entries = [(r, label) for r in records]
            if job is not None and await self._write(job, "filtered", job.writer.write_filtered, entries):
                job.settle(filtered=len(records))
        for job_name, records in _by_job(parents).items():
            job = self._live_job(job_name, len(records))
            if job is None or not await self._write(job, label, job.writer.write_expansions, label, records):
                continue
            children = [
                child
                for parent in records
                for child in (parent.child(k, own) for k, own in enumerate(parent.children))
                if job.done is None or child.key not in job.done  # written by an earlier run
            ]
            job.expand(len(records), len(children))
            plain.extend(children)
        return plain

    def _live_job(self, name: str, count: int) -> JobRun | None:
        """The job's run, or None when it failed (or ended) meanwhile: its records are dropped."""
        job = self.jobs.get(name)
        if job is None or job.failure is not None:
            if job is not None:
                job.outstanding -= count
            return None
        return job

    async def _write(self, job: JobRun, what: str, write: Callable, *args) -> bool:
        """One blocking write in a thread, under the failure contract: a transient failure is
        outlasted (intake paused); a job-level one fails the job (False)."""
        try:
            await self.pauses.call(
                f"job {job.name}: writing {what}", lambda: asyncio.to_thread(write, *args), where=OUTBOX
            )
        except Exception as exc:  # OUTBOX: whatever is not transient is the job's
            path = getattr(exc, "filename", None)
            where = f" {path}" if path else ""
            failure = JobFailed(f"cannot write the job's outbox file{where} ({what}): {describe(exc)}")
            log.error("job %s failed: %s", job.name, failure)
            job.fail(failure)
            return False
        return True
