"""The engine both modes share: a loaded pipeline plus `run_job`, which streams one file through it.

`reelflow serve` feeds it files from the inbox; `reelflow run` feeds it `meta_path` once.
When the pipeline task dies, every `run_job` waiting wakes and raises `PipelineDied` with the
cause; a job whose outbox cannot be written raises `JobFailed` (daemon/runtime/failures.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config
from daemon.io.intake import Checked, RowChecker, RowRules
from daemon.io.outbox import JobWriter, OutboxLayout
from daemon.io.readers import RowProblem, UnreadableFile, read_rows
from daemon.io.records import Record, unreadable_row_key
from daemon.io.remote import MediaCache, RemoteFetchError, is_remote
from daemon.io.sinks import JobSinks, ShardSink
from daemon.metrics import Metrics
from daemon.runtime.failures import OUTBOX, JobFailed, PipelineDied, describe
from daemon.runtime.outcomes import JobRun
from daemon.runtime.pipeline import HostFactory, Pipeline, local_host

log = logging.getLogger(__name__)

READ_CHUNK = 256


@dataclass(frozen=True)
class JobInput:
    name: str
    path: Path  # the file to read (already claimed)
    fmt: str  # jsonl | json | csv | tsv | parquet | video
    display_name: str  # the name the user gave the file, used in messages
    meta_root: Path  # where relative media paths resolve when meta_folder is not set


class FileUnreadable(Exception):
    """Not one row could be read: the file is not what its name says."""


class Engine:
    def __init__(
        self,
        config: Config,
        layout: OutboxLayout,
        metrics: Metrics,
        host_factory: HostFactory = local_host,
        tag_results: bool = False,
    ):
        self.layout = layout
        self.metrics = metrics
        self.pipeline = Pipeline(config, metrics, host_factory)
        self.tag_results = tag_results
        self._task: asyncio.Task | None = None
        self._feeds: set[asyncio.Task] = set()
        self._intake_stopped = False
        self._media_cache: MediaCache | None = None  # remote media, fetched on first use

    @property
    def config(self) -> Config:
        """The config in force: the pipeline owns it (a hot reload replaces it there)."""
        return self.pipeline.config

    async def start(self) -> None:
        await self.pipeline.connect()
        self.pipeline.build_workers()
        await self.pipeline.load()
        self._task = asyncio.create_task(self.pipeline.run(), name="pipeline")
        self._task.add_done_callback(self._pipeline_ended)

    def _pipeline_ended(self, task: asyncio.Task) -> None:
        """The pipeline stopped: no record can move on, so every job waiting on it wakes with the cause."""
        if task.cancelled():  # stop(): the caller is shutting down and handles its own jobs
            return
        error = task.exception()
        while isinstance(error, BaseExceptionGroup) and error.exceptions:  # a worker's, inside task groups
            error = error.exceptions[0]
        cause = describe(error) if error is not None else "it returned"
        for run in list(self.pipeline.jobs.values()):
            run.fail(
                PipelineDied(
                    f"job {run.name}: the pipeline stopped ({cause}); its unwritten records run again at the next start"
                )
            )

    @property
    def task(self) -> asyncio.Task:
        assert self._task is not None, "Engine.start() first"
        return self._task

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pipeline.close()
        if self._media_cache is not None:
            self._media_cache.close()

    def stop_intake(self) -> None:
        """Stop reading every job's file; records already read still finish."""
        self._intake_stopped = True  # also for jobs still opening their writer: they must not start reading
        for feed in list(self._feeds):
            feed.cancel()

    def _rules(self, job: JobInput) -> RowRules:
        file = self.config.file
        first = self.config.steps[0].config
        meta_folder = file.meta_folder.resolve() if file.meta_folder else None
        base = meta_folder or job.meta_root.resolve()
        required = dict(first.input_fields())
        path_keys = {file.video_key, file.image_key} | {k for k, kind in required.items() if kind in ("video", "image")}
        if job.fmt == "video":
            # The row names the dropped file, which is the claimed file itself (no longer in the
            # inbox, maybe renamed to <stem>-2): `_feed` sets its real path, nothing to resolve here.
            required.pop(file.video_key, None)
            path_keys.discard(file.video_key)
        return RowRules(
            required=required,
            path_keys=frozenset(path_keys),
            roots=(base,),
            base=base,
            remote_allow=tuple(file.daemon.remote.allow),
        )

    async def _fetch_remote(self, chunk: list[Checked], path_keys: frozenset[str], file_name: str) -> None:
        """Fetch the allowed URLs of a chunk's rows into the media cache; a URL that cannot be had fails its row."""
        wanted = [
            (checked, key)
            for checked in chunk
            if checked.problem is None
            for key in path_keys
            if is_remote(checked.record.fields.get(key))
        ]
        if not wanted:
            return
        cache = self._cache()

        def fetch(checked: Checked, key: str):
            url = checked.record.fields[key]
            what = f"{file_name}: row {checked.record.row_number}: fetching {url}"
            return self.pipeline.pauses.call(what, lambda: cache.fetch(url))  # a dead server pauses intake

        fetched = await asyncio.gather(*(fetch(checked, key) for checked, key in wanted), return_exceptions=True)
        for (checked, key), outcome in zip(wanted, fetched, strict=True):
            if isinstance(outcome, RemoteFetchError):
                if checked.problem is None:
                    where = f"{file_name}: row {checked.record.row_number}: field {key!r}"
                    checked.problem = RowProblem(f"{where}: {outcome}", outcome.kind)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                checked.record.fields[key] = outcome

    async def run_job(self, job: JobInput) -> JobRun:
        paths = self.layout.for_job(job.name)
        digest = self.config.digest if self.tag_results else None
        writer = JobWriter(job.name, paths, self.layout.relative_to, digest)
        done = await self._open_writer(job, writer)
        run = JobRun(job.name, writer)
        run.skipped = len(done)
        run.done = done
        self.pipeline.open_job(run)
        if self._task is not None and self._task.done():  # died before this job began: fail it at once
            self._pipeline_ended(self._task)
        checker = RowChecker(job.name, job.display_name, self._rules(job), done, paths.media, paths.embeddings.parent)
        feed = asyncio.create_task(self._feed(job, run, checker), name=f"read-{job.name}")
        self._feeds.add(feed)
        if self._intake_stopped:
            feed.cancel()
        try:
            async with self._sinks(job.name, paths.results) as sinks:
                # The feed ends when the file is read; the run ends early when the job fails or the pipeline dies.
                ended = asyncio.create_task(run.finished.wait(), name=f"ended-{job.name}")
                try:
                    await asyncio.wait({feed, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ended.cancel()
                    await asyncio.gather(ended, return_exceptions=True)
                if run.failure is not None:
                    feed.cancel()
                    await asyncio.gather(feed, return_exceptions=True)
                    raise run.failure
                try:
                    await feed
                except asyncio.CancelledError:
                    if not feed.cancelled() or asyncio.current_task().cancelling():
                        raise
                    # stop_intake(): no more rows; let what is in flight finish and keep the job claimed.
                    run.interrupted = True
                    await run.idle.wait()
                    if run.failure is not None:
                        raise run.failure from None
                    return run
                except Exception:
                    # The reader broke off (a job-level failure for the caller): the rows it already
                    # handed on are still written before the job is given up.
                    await run.idle.wait()
                    raise
                await run.finished.wait()
                if run.failure is not None:
                    raise run.failure
                await sinks.finish()
        finally:
            if not feed.done():
                feed.cancel()
                await asyncio.gather(feed, return_exceptions=True)
            self._feeds.discard(feed)
            self.pipeline.jobs.pop(job.name, None)
            try:
                await asyncio.to_thread(writer.close)
            except OSError as exc:  # every batch was fsynced when written; this loses nothing
                log.warning("job %s: closing its outbox files: %s", job.name, describe(exc))
        return run

    def _cache(self) -> MediaCache:
        if self._media_cache is None:
            remote = self.config.file.daemon.remote
            self._media_cache = MediaCache(remote, remote.cache_dir or self.layout.results_dir / ".reelflow" / "remote")
        return self._media_cache

    def _remote_file(self, url: str) -> Path:
        return self._cache().fetch_blocking(url)

    def _sinks(self, job: str, results: Path) -> JobSinks:
        """The job's `daemon.outputs` shard sinks, following its results file."""
        file = self.config.file
        return JobSinks(
            [
                ShardSink(spec, job, results, self.layout.relative_to, file.video_key, file.text_key, self._remote_file)
                for spec in file.daemon.outputs
            ]
        )

    async def _open_writer(self, job: JobInput, writer: JobWriter):
        """Open the job's outbox files: transient failures outlasted, others the job's (JobFailed)."""
        try:
            return await self.pipeline.pauses.call(
                f"job {job.name}: opening its outbox files", lambda: asyncio.to_thread(writer.open), where=OUTBOX
            )
        except Exception as exc:
            path = getattr(exc, "filename", None) or writer.paths.results
            raise JobFailed(f"cannot open the job's outbox file or folder {path}: {describe(exc)}") from exc

    async def _feed(self, job: JobInput, run: JobRun, checker: RowChecker) -> None:
        video_key = self.config.file.video_key
        rows = read_rows(job.path, job.fmt, video_key, job.display_name)
        state = {"rows": 0}

        def next_chunk() -> tuple[list[Checked], Exception | None, bool]:
            """Read up to READ_CHUNK rows; also say whether the file is at its end."""
            chunk: list[Checked] = []
            pulled = 0
            try:
                for number, row in itertools.islice(rows, READ_CHUNK):
                    pulled += 1
                    state["rows"] = number
                    checked = checker.check(number, row)
                    if checked is not None:
                        if job.fmt == "video" and checked.problem is None:
                            checked.record.fields[video_key] = job.path.resolve()
                        chunk.append(checked)
            except UnreadableFile as exc:
                return chunk, exc, True
            return chunk, None, pulled < READ_CHUNK

        path_keys = checker.rules.path_keys
        while True:
            chunk, failure, at_end = await asyncio.to_thread(next_chunk)
            await self._fetch_remote(chunk, path_keys, job.display_name)
            rejected = [(c.record, c.problem.error_type, c.problem.message) for c in chunk if c.problem]
            if rejected:  # one write (and fsync) for the chunk's bad rows, not one each
                await self.pipeline.reject(rejected)
            for checked in chunk:
                if not checked.problem:
                    await self.pipeline.submit(checked.record)
            if failure is not None:
                if state["rows"] == 0 and run.outstanding == 0 and run.skipped == 0:
                    run.mark_read()
                    raise FileUnreadable(str(failure))
                await self._reject_rest(job, state["rows"] + 1, failure, checker)
            if at_end:
                break
        run.mark_read()

    async def _reject_rest(self, job: JobInput, row_number: int, failure: Exception, checker: RowChecker) -> None:
        """The file broke off mid-way: one error line stands for everything after the last good row."""
        key = unreadable_row_key(row_number)
        if key in checker.done:
            return
        record = Record(id=None, job=job.name, row_number=row_number, row={}, fields={}, key=key)
        await self.pipeline.reject(
            [(record, "UnreadableFile", f"{failure}; rows from {row_number} on could not be read")]
        )
