"""The stage graph: bounded queues between steps, the workers on them, and where records end.

`Pipeline` owns the queues and workers and routes each finished batch: successes go to the
next step's queue (waiting while it is full: that is the backpressure) or, after the last
step, into the job's results; failures go to the job's errors. A record leaves the
pipeline exactly once, and its job hears about it.

Writes follow the failure contract (daemon/runtime/failures.py): a transient failure
(disk full) is outlasted, with intake paused (`pauses`), and marks nothing; a job-level one
fails that job alone (`JobRun.fail`), whose records still in flight are then dropped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

from daemon.config import Config, Step
from daemon.hosts.base import StageHost
from daemon.hosts.local import LocalHost
from daemon.io.outbox import JobWriter
from daemon.io.records import Record
from daemon.metrics import Metrics
from daemon.runtime.batching import BatchLimits
from daemon.runtime.failures import OUTBOX, JobFailed, Pauses, describe
from daemon.runtime.worker import Failure, Worker
from stages.base import Filtered, is_async

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


def visible_gpus() -> list[str]:
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_devices(step: Step, gpus: Callable[[], list[str]] = visible_gpus) -> list[str]:
    """One entry per worker: a device, or a comma-joined group for tensor parallelism."""
    config = step.config
    if config.devices:
        devices = config.devices
    elif step.stage_cls.uses_accelerator(config):
        devices = gpus() or ["cpu"]
    else:
        devices = ["cpu"]  # CPU tools and API stages (whose concurrency is max_num_seqs, not devices)
    group = max(1, int(getattr(config, "tensor_parallel_size", 1) or 1))
    groups = [",".join(devices[i : i + group]) for i in range(0, len(devices) - group + 1, group)] or [
        ",".join(devices)
    ]
    return [device for device in groups for _ in range(config.workers_per_device)]


def batch_limits(step: Step) -> BatchLimits:
    config = step.config
    concurrency = 1
    if is_async(step.stage_cls):
        slots = int(getattr(config, "max_num_seqs", 0) or 0)
        concurrency = max(1, math.ceil(slots / config.batch_size)) if slots else 1
    if step.workers.backend == "ray":  # keep the next batch at the actor so the RPC hides behind model time
        concurrency = max(concurrency, step.workers.calls_in_flight)
    return BatchLimits(batch_size=config.batch_size, max_wait_s=config.max_wait_ms / 1000, concurrency=concurrency)


HostFactory = Callable[[Step, str, str], StageHost]


def local_host(step: Step, device: str, name: str) -> StageHost:
    return LocalHost(step.stage_cls, step.config, device, step.config.prep_workers, name)


class Pipeline:
    def __init__(self, config: Config, metrics: Metrics, host_factory: HostFactory = local_host):
        self.config = config
        self.metrics = metrics
        self.host_factory = host_factory
        self.queues: list[asyncio.Queue[Record]] = [asyncio.Queue(maxsize=s.config.queue_size) for s in config.steps]
        self.workers: list[list[Worker]] = [[] for _ in config.steps]
        self.jobs: dict[str, JobRun] = {}
        self.remote = None  # the Ray cluster (daemon.hosts.ray.cluster.RayCluster) when a step's workers run there
        for step, queue in zip(config.steps, self.queues, strict=True):
            metrics.queue_depth.labels(step.label).set_function(queue.qsize)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[Worker, asyncio.Task] = {}
        self._intake_open = asyncio.Event()  # cleared while a reload rebuilds the step graph
        self._intake_open.set()
        self._entering = 0  # submit/reject calls past the gate, not yet admitted
        self.pauses = Pauses(metrics)  # transient causes in force: intake waits while any lasts

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.config.steps

    async def connect(self) -> None:
        """Join the Ray cluster if a step's workers run there (`workers: {backend: ray}`); before build_workers."""
        if self.remote is None and any(step.workers.backend == "ray" for step in self.steps):
            from daemon.hosts.ray.cluster import RayCluster

            self.remote = RayCluster(self.config.file.workers, lambda: self.steps, self.metrics)
            await self.remote.connect()

    def worker_devices(self, step: Step) -> list[str]:
        """One entry per worker of the step: a device, or for a Ray step an actor slot (`ray:<n>`)."""
        if step.workers.backend != "ray":
            return worker_devices(step)
        if self.remote is None:
            raise RuntimeError(
                f"{step.label}: workers.backend: ray, but the daemon did not join a Ray cluster at start-up "
                "(no step used Ray then); restart it to move a step to Ray"
            )
        return self.remote.slots(step)

    def host_for(self, step: Step, device: str, name: str) -> StageHost:
        """Where one worker's stage lives: the host factory's, or a Ray actor for a Ray step."""
        if step.workers.backend == "ray":
            assert self.remote is not None, "Pipeline.connect() first: a step runs its workers on Ray"
            return self.remote.host(step, device, name)
        return self.host_factory(step, device, name)

    def make_worker(self, step: Step, device: str, n: int, digest: str | None) -> Worker:
        name = f"{step.label}/w{n}@{device}"
        host = self.host_for(step, device, name)
        queue = self.queues[step.index]
        return Worker(
            step.index,
            step.label,
            host,
            queue,
            self.advance,
            self.metrics,
            batch_limits(step),
            name,
            digest,
            device,
            pauses=self.pauses,
        )

    def build_workers(self) -> None:
        for step in self.steps:
            limits = batch_limits(step)
            self.metrics.efficiency.set_speed_of_light(step.label, step.config.speed_of_light_tokens_per_s)
            devices = self.worker_devices(step)
            for n, device in enumerate(devices):
                self.workers[step.index].append(self.make_worker(step, device, n, self.config.digest))
            log.info(
                "%s: %d worker(s) on %s; batch_size=%d max_wait_ms=%d concurrency=%d queue_size=%d prep_workers=%d",
                step.label,
                len(devices),
                devices,
                limits.batch_size,
                step.config.max_wait_ms,
                limits.concurrency,
                step.config.queue_size,
                step.config.prep_workers,
            )

    async def load_host(self, step: Step, host: StageHost, name: str) -> None:
        """Load one stage copy and count it (reelflow_model_loads_total, reelflow_model_load_seconds)."""
        started = time.perf_counter()
        try:
            await host.load()
        except Exception as exc:
            exc.add_note(f"{name} ({step.type}/{step.name}) loading its model")  # the CLI's one-line message names it
            raise
        self.metrics.model_load_seconds.labels(step.label).set(time.perf_counter() - started)
        self.metrics.model_loads.labels(step.label).inc()
        log.info("%s loaded in %.1f s", name, time.perf_counter() - started)

    async def load(self) -> None:
        """Load every worker's stage; the first failure stops start-up with its message."""
        await asyncio.gather(
            *(self.load_host(step, w.host, w.name) for step in self.steps for w in self.workers[step.index])
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            for workers in self.workers:
                for worker in workers:
                    self.start_worker(worker)
            # Hot reload adds and retires workers in this group; it must outlive any one of them.
            await asyncio.get_running_loop().create_future()

    def start_worker(self, worker: Worker) -> None:
        assert self._group is not None, "Pipeline.run() first"
        self._tasks[worker] = self._group.create_task(worker.run(), name=worker.name)

    async def stop_worker(self, worker: Worker) -> None:
        """End a worker's loops (pause and drain it first, or its records are lost); its host stays open."""
        task = self._tasks.pop(worker, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def close_intake(self) -> None:
        """Hold new records at the door (submit/reject wait) until `open_intake`."""
        self._intake_open.clear()

    def open_intake(self) -> None:
        self._intake_open.set()

    async def wait_empty(self, poll_s: float = 0.02) -> None:
        """With intake closed: wait until no record is anywhere in the pipeline."""
        while self._entering or any(job.outstanding for job in self.jobs.values()):
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        await asyncio.gather(*(w.host.close() for ws in self.workers for w in ws), return_exceptions=True)
        if self.remote is not None:
            await self.remote.close()

    def open_job(self, job: JobRun) -> None:
        self.jobs[job.name] = job

    async def submit(self, record: Record) -> None:
        """Enter a record at step 0; waits while the queue is full (or a reload or a transient cause holds intake)."""
        await self._intake_open.wait()
        await self.pauses.wait_clear()
        self._entering += 1
        try:
            await self.queues[0].put(record)
            self.jobs[record.job].admit()  # after put: a put cancelled by shutdown admits nothing
        finally:
            self._entering -= 1

    async def reject(self, failures: list[Failure]) -> None:
        """Records that failed before any step (bad rows): straight to errors, in one write."""
        await self._intake_open.wait()
        await self.pauses.wait_clear()
        for record, _, _ in failures:
            self.jobs[record.job].admit()
        # Shielded: once admitted they must be settled, also when the reader is cancelled (shutdown).
        await asyncio.shield(self.advance(-1, [], failures))

    async def advance(self, step_index: int, ok: list[Record], failed: list[Failure]) -> None:
        label = self.steps[step_index].label if step_index >= 0 else "read"
        if failed:
            self.metrics.records.labels(label, "error").inc(len(failed))
            by_job: dict[str, list] = defaultdict(list)
            for record, kind, message in failed:
                by_job[record.job].append((record, label, kind, message))
            for job_name, entries in by_job.items():
                job = self._live_job(job_name, len(entries))
                if job is not None and await self._write(job, "errors", job.writer.write_errors, entries):
                    job.settle(errors=len(entries))
        ok = await self._route_filtered_and_children(step_index, label, ok)
        if not ok:
            return
        self.metrics.records.labels(label, "ok").inc(len(ok))
        by_job_ok: dict[str, list[Record]] = defaultdict(list)
        for record in ok:
            by_job_ok[record.job].append(record)
        last = step_index == len(self.steps) - 1
        going_on: list[Record] = []
        for job_name, records in by_job_ok.items():
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
        for record in going_on:
            await self.queues[step_index + 1].put(record)

    async def _route_filtered_and_children(self, step_index: int, label: str, ok: list[Record]) -> list[Record]:
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
