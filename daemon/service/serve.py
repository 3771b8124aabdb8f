"""`reelflow serve`: the long-running daemon over an inbox and an outbox.

Start-up: metrics server, load every stage, write `<outbox>/.reelflow/daemon.json`, resume
the jobs left in `inbox/.work/`, then claim settled files as they arrive. SIGTERM/SIGINT:
stop reading, let in-flight records finish for up to `drain_timeout_s`, exit 0; unfinished
jobs stay claimed for the next start. A second signal exits at once. SIGHUP (and a change
of the config file) reloads the config (daemon/service/reload/reloader.py). Under systemd it reports its
state over sd_notify (daemon/service/notify.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from daemon.config import Config
from daemon.io.inbox import DEFAULT_IGNORE, Inbox
from daemon.io.jobs import (
    DONE,
    WORK,
    JobEntry,
    JobLedger,
    claimed_files,
    fingerprint,
    move_unique,
    record_failure,
    remove_state_file,
    write_json_atomic,
)
from daemon.io.outbox import STATE_DIR, OutboxLayout
from daemon.io.readers import input_format
from daemon.io.sources import SourcePoller
from daemon.metrics import Metrics, MetricsServer
from daemon.runtime.engine import Engine, FileUnreadable, JobInput
from daemon.runtime.failures import OUTBOX, PipelineDied, describe
from daemon.service.notify import Notifier
from daemon.service.reload.reloader import Reloader

log = logging.getLogger("reelflow")

MAX_ACTIVE_JOBS = 64
ABANDON_GRACE_S = 1.0  # after a drain timeout: how long stages may take to close
DRAIN_LOG_S = 5.0  # while draining: how often the progress is logged


def inbox_ignore(config: Config) -> tuple[str, ...]:
    return (*DEFAULT_IGNORE, *config.daemon.ignore)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None, log_level_pinned: bool = False):
        self.config_path = config_path
        self.log_level_pinned = log_level_pinned  # --log-level given: a reload does not change it
        section = config.daemon
        self.inbox_dir = section.inbox.resolve()
        self.outbox_dir = section.outbox.resolve()
        self.state_dir = self.outbox_dir / STATE_DIR
        self.metrics = Metrics()
        self.server = MetricsServer(
            self.metrics, section.metrics.host, section.metrics.port, self.is_ready, self.not_ready_reason
        )
        self.engine = Engine(config, OutboxLayout.daemon(self.outbox_dir), self.metrics, tag_results=True)
        self.ledger: JobLedger | None = None
        self.ready = False
        self._stop = asyncio.Event()
        self._signals = 0
        self._job_tasks: set[asyncio.Task] = set()
        self._interrupted: set[str] = set()  # jobs a stop left unfinished: they resume at the next start
        self._active_jobs = asyncio.Semaphore(MAX_ACTIVE_JOBS)
        self.notifier = Notifier.from_environment()
        self.reloader = Reloader(
            config_path, self.engine.pipeline, self.notifier, self.apply_settings, self.status_line
        )
        self.inbox: Inbox | None = None
        self.metrics.set_config(config.digest)
        self._throughput = (time.monotonic(), 0.0, 0.0)  # (when, records finished, records/s)
        self._stopping = False

    @property
    def config(self) -> Config:
        """The config in force (the pipeline holds it; a reload replaces it there)."""
        return self.engine.pipeline.config

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)  # served once ready
        heartbeat = asyncio.create_task(self.notifier.heartbeat(self.healthy, self.status_line), name="sd-notify")
        self.reloader.watch()
        self.notifier.status("loading models")
        try:
            return await self._serve()
        finally:
            await self.reloader.stop()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            self.notifier.close()
            await asyncio.to_thread(remove_state_file, self.state_dir / "daemon.json")  # every way out, errors too

    async def _serve(self) -> int:
        self.ledger = await asyncio.to_thread(self._open_ledger)
        url = await self.server.start()
        log.info("metrics at %s (also /healthz, /readyz)", url)
        try:
            await self.engine.start()
        except Exception:
            await self.server.stop()
            raise
        self.ready = True
        state = {
            "pid": os.getpid(),
            "metrics_url": url,
            "config": str(self.config_path or ""),
            "started_at": time.time(),
        }
        await asyncio.to_thread(write_json_atomic, self.state_dir / "daemon.json", state)
        log.info("ready: watching %s, writing to %s", self.inbox_dir, self.outbox_dir)
        self.reloader.start()
        self.notifier.ready(self.status_line())
        intake = asyncio.create_task(self._intake(), name="intake")
        stop = asyncio.create_task(self._stop.wait(), name="stop-signal")
        watched = {intake, stop, self.engine.task} | ({self.reloader.task} if self.reloader.task else set())
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        failure = next((t.exception() for t in done if t is not stop and not t.cancelled() and t.exception()), None)
        if failure is not None:  # said before draining: a drain timeout ends the process in _shutdown
            causes = _leaves(failure)  # a worker's errors inside the pipeline's task groups
            more = f" (and {len(causes) - 1} more)" if len(causes) > 1 else ""
            log.error("stopping: %s: %s%s", type(causes[0]).__name__, causes[0], more)
        await self._shutdown(intake, stop, failed=failure is not None)
        if failure is not None:
            raise failure
        return 0

    def _open_ledger(self) -> JobLedger:
        for folder in (self.inbox_dir / WORK, self.outbox_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return JobLedger(self.state_dir, self.inbox_dir)  # settles what a crash left half-recorded

    async def _drain_jobs(self, timeout: float) -> set[asyncio.Task]:
        """Wait for the jobs to finish their records in flight, logging the progress; returns those still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        written = self._records_written()
        pending = set(self._job_tasks)
        while pending and (left := deadline - loop.time()) > 0:
            _, pending = await asyncio.wait(pending, timeout=min(DRAIN_LOG_S, left))
            if pending:
                log.info(
                    "draining: %d job(s), %d record(s) still in flight, %d written since the signal, %.0f s left",
                    len(pending),
                    sum(run.outstanding for run in self.engine.pipeline.jobs.values()),
                    self._records_written() - written,
                    max(deadline - loop.time(), 0),
                )
        return pending

    def _records_written(self) -> int:
        return sum(run.ok + run.errors for run in self.engine.pipeline.jobs.values())

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now without draining", sig.name)
            remove_state_file(self.state_dir / "daemon.json")  # os._exit skips every finally
            os._exit(1)
        log.info(
            "%s: stopping intake and draining (up to %.0f s; send it again to exit at once)",
            sig.name,
            self.config.daemon.drain_timeout_s,
        )
        self._stop.set()

    async def _shutdown(self, intake: asyncio.Task, stop: asyncio.Task, failed: bool = False) -> None:
        self.ready = False
        self._stopping = True
        await self.reloader.stop()  # a reload in progress ends first (with its READY=1)
        self.notifier.stopping(f"draining (up to {self.config.daemon.drain_timeout_s:.0f} s)")
        intake.cancel()
        stop.cancel()
        await asyncio.gather(intake, stop, return_exceptions=True)
        self.engine.stop_intake()
        abandoned = False
        if self._job_tasks:
            pending = await self._drain_jobs(self.config.daemon.drain_timeout_s)
            if pending:
                self._interrupted.update(task.get_name().removeprefix("job-") for task in pending)
                abandoned = True
                log.warning(
                    "drain timeout: %d job(s) still had records in flight; they stay claimed and resume next start",
                    len(pending),
                )
        if abandoned:
            # A stage call still running in its thread cannot be interrupted, and closing the stage
            # waits behind it: give it a moment, no more.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ABANDON_GRACE_S):
                    await self.engine.stop()
        else:
            await self.engine.stop()
        for task in self._job_tasks:
            task.cancel()
        await asyncio.gather(*self._job_tasks, return_exceptions=True)
        await self.server.stop()
        await asyncio.to_thread((self.state_dir / "daemon.json").unlink, missing_ok=True)
        if self._interrupted:
            log.info(
                "stopped; job(s) %s stay claimed in %s and resume at the next start, skipping the records already written",
                ", ".join(sorted(self._interrupted)),
                self.inbox_dir / ".work",
            )
        else:
            log.info("stopped (no job left unfinished)")
        if abandoned:
            # Python would join those busy threads at exit, outliving drain_timeout_s. Every line
            # written is already flushed and fsynced, so leaving now loses nothing.
            logging.shutdown()
            os._exit(1 if failed else 0)

    # --- reload, health, sd_notify --------------------------------------------------------

    def apply_settings(self, config: Config) -> None:
        """The daemon's own light settings, after a reload (the steps are the reloader's)."""
        section = config.daemon
        if not self.log_level_pinned:
            logging.getLogger().setLevel(section.log_level)
        if self.inbox is not None:
            self.inbox.configure(section.settle_ms, section.rescan_s, inbox_ignore(config))

    def is_ready(self) -> bool:
        """/readyz: models loaded and intake not paused by a transient cause (disk full, ...)."""
        return self.ready and not self.engine.pipeline.pauses.active

    def not_ready_reason(self) -> str:
        if self.ready:
            return f"paused: {self.engine.pipeline.pauses.summary()}"
        return "stopping" if self._stopping else "loading"

    def healthy(self) -> bool:
        """What WATCHDOG=1 vouches for: the loop runs (this is called from it), the pipeline
        task is alive and, once ready, every step has a worker."""
        if not self.ready:
            return True  # loading: the loop answers, which is all there is to check yet
        if self.engine.task.done() or (self.reloader.task is not None and self.reloader.task.done()):
            return False
        return all(self.engine.pipeline.workers)

    def status_line(self) -> str:
        if not self.ready:
            return "stopping" if self._stopping else "loading models"
        when, before, rate = self._throughput
        ok = errors = 0.0
        last = self.config.steps[-1].label
        for family in self.metrics.records.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                if sample.labels["status"] == "error":
                    errors += sample.value
                elif sample.labels["step"] == last:
                    ok += sample.value
        now = time.monotonic()
        if now - when >= 1.0:
            rate = (ok + errors - before) / (now - when)
            self._throughput = (now, ok + errors, rate)
        queued = sum(q.qsize() for q in self.engine.pipeline.queues)
        return (
            f"{ok:.0f} records ok, {errors:.0f} errors, {rate:.1f} records/s, {queued} queued, "
            f"{len(self._job_tasks)} job(s) in progress, config {self.config.digest}"
        )

    # --- intake ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        for path in await asyncio.to_thread(claimed_files, self.inbox_dir):
            await self._resume(path)
        section = self.config.daemon
        self.inbox = Inbox(self.inbox_dir, section.settle_ms, section.rescan_s, inbox_ignore(self.config))
        poller = await asyncio.to_thread(SourcePoller, section.sources, self.inbox_dir, self.state_dir / "sources.json")
        sources = poller.start()
        try:
            async for path in self.inbox.settled():
                try:
                    await self._claim(path)
                except FileNotFoundError:
                    log.info("%s vanished before it could be claimed", path.name)
        finally:
            await sources.stop()  # owned by intake: it ends with it

    async def _resume(self, path: Path) -> None:
        def entry() -> JobEntry:
            found = self.ledger.entries.get(path.stem)
            if found is None:  # claimed just before a crash, before its ledger entry was written
                found = JobEntry(path.stem, path.name, path.suffix, fingerprint(path), "claimed", time.time())
                self.ledger.save(found)
            return found

        resumed = await asyncio.to_thread(entry)
        log.info("resuming job %s", resumed.name)
        self._start_job(resumed, path)

    async def _claim(self, path: Path) -> None:
        fmt = input_format(path)
        if fmt is None:
            message = f"{path.name}: unsupported file type {path.suffix!r}; expected a meta file (.jsonl .json .csv .tsv .parquet) or a video (.mp4 .mkv .mov .webm ...)"
            await asyncio.to_thread(record_failure, self.inbox_dir, path, message)
            self.metrics.jobs.labels("failed").inc()
            log.warning("%s", message)
            return
        print_ = await asyncio.to_thread(fingerprint, path)
        known = await asyncio.to_thread(self.ledger.known, print_)
        if known is not None and known.state in ("done", "claimed"):
            target = await asyncio.to_thread(move_unique, path, self.inbox_dir / DONE)
            log.info(
                "%s has the same content as job %s (%s): nothing to do, moved to %s",
                path.name,
                known.name,
                known.state,
                target,
            )
            return
        name, claimed = await asyncio.to_thread(self.ledger.claim, path, self.inbox_dir, known)
        entry = JobEntry(name, path.name, path.suffix, print_, "claimed", time.time())
        await self._save(entry)
        log.info("claimed %s as job %s", path.name, name)
        self._start_job(entry, claimed)

    def _start_job(self, entry: JobEntry, path: Path) -> None:
        task = asyncio.create_task(self._run_job(entry, path), name=f"job-{entry.name}")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_ended)

    def _job_ended(self, task: asyncio.Task) -> None:
        """Owned to the end: a job task's exception is retrieved and logged, never left to asyncio."""
        self._job_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended with %s", task.get_name(), describe(task.exception()))

    async def _run_job(self, entry: JobEntry, path: Path) -> None:
        async with self._active_jobs:
            self.metrics.jobs.labels("claimed").inc()
            try:
                job = JobInput(entry.name, path, input_format(path) or "", entry.source, self.inbox_dir)
                try:
                    run = await self.engine.run_job(job)
                except PipelineDied as exc:  # not the job's fault: it stays claimed and resumes next start
                    log.error("%s", exc)
                    return
                except Exception as exc:  # job-level (JobFailed, FileUnreadable, a reader's error): this job alone
                    await self._fail_job(entry, path, exc)
                    return
                if run.interrupted:
                    self._interrupted.add(entry.name)
                    return
                await asyncio.to_thread(move_unique, path, self.inbox_dir / DONE)
                entry.state, entry.finished_at = "done", time.time()
                entry.ok, entry.errors = run.writer.results_written, run.writer.errors_written
                await self._save(entry)
                self.metrics.jobs.labels("done").inc()
                log.info(
                    "job %s done: %d ok, %d errors, %d filtered (%d skipped as already written)",
                    entry.name,
                    run.ok,
                    run.errors,
                    run.filtered,
                    run.skipped,
                )
            finally:
                self.metrics.jobs.labels("claimed").dec()

    async def _save(self, entry: JobEntry) -> None:
        """Write a job's ledger entry (in the outbox): a full disk is outlasted, with intake paused."""
        await self.engine.pipeline.pauses.call(
            f"job {entry.name}: writing its ledger entry",
            lambda: asyncio.to_thread(self.ledger.save, entry),
            where=OUTBOX,
        )

    async def _fail_job(self, entry: JobEntry, path: Path, exc: Exception) -> None:
        """Move the job's file to inbox/.failed/ with `<name>.error.json`; rows already written stay."""
        message = str(exc) if isinstance(exc, FileUnreadable) else f"job {entry.name} ({entry.source}): {describe(exc)}"
        target = await asyncio.to_thread(record_failure, self.inbox_dir, path, message)
        entry.state, entry.finished_at = "failed", time.time()
        await self._save(entry)
        self.metrics.jobs.labels("failed").inc()
        log.warning("job %s failed: %s; moved to %s", entry.name, message, target)
