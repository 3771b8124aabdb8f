"""The stage graph: the live config, bounded queues between steps, the workers on them.

`Pipeline` owns all of it and every edit to it: `add_worker`, `retire_worker`,
`reload_worker`, `reconfigure_worker` (hot reload, one worker at a time) and `swap_graph`
(a new step graph). Callers (daemon/service/reload/) plan; the pipeline changes. Each
finished batch goes to `advance`: the next step's queue (waiting while it is full: that is
the backpressure) or, after the last step, the job's files (daemon/runtime/outcomes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable

from daemon.config import Config, Step
from daemon.hosts.base import StageHost
from daemon.hosts.local import LocalHost, worker_devices
from daemon.io.records import Record
from daemon.metrics import Metrics
from daemon.runtime.batching import BatchLimits, batch_limits
from daemon.runtime.failures import Pauses
from daemon.runtime.outcomes import JobRun, Outcomes
from daemon.runtime.worker import Failure, Worker

log = logging.getLogger(__name__)

HostFactory = Callable[[Step, str, str], StageHost]


def local_host(step: Step, device: str, name: str) -> StageHost:
    return LocalHost(step.stage_cls, step.config, device, step.config.prep_workers, name)


class EditFailed(Exception):
    """A graph edit could not be made (a stage did not load); the graph is as it was before."""


async def close_quietly(host: StageHost, name: str) -> None:
    try:
        await host.close()
    except Exception as exc:
        log.warning("%s: closing its stage raised %s: %s", name, type(exc).__name__, exc)


class Pipeline:
    def __init__(self, config: Config, metrics: Metrics, host_factory: HostFactory = local_host):
        self.config = config  # the config in force: the one owner (the engine and daemon read it here)
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
        self._intake_open = asyncio.Event()  # cleared while a reload swaps the step graph
        self._intake_open.set()
        self._entering = 0  # submit/reject calls past the gate, not yet admitted
        self.pauses = Pauses(metrics)  # transient causes in force: intake waits while any lasts
        self.outcomes = Outcomes(self.jobs, metrics, self.pauses)

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.config.steps

    def workers_of(self, step: Step) -> tuple[Worker, ...]:
        return tuple(self.workers[step.index])

    # --- building ------------------------------------------------------------------------

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

    def _host(self, step: Step, device: str, name: str) -> StageHost:
        """Where one worker's stage lives: the host factory's, or a Ray actor for a Ray step."""
        if step.workers.backend == "ray":
            assert self.remote is not None, "Pipeline.connect() first: a step runs its workers on Ray"
            return self.remote.host(step, device, name)
        return self.host_factory(step, device, name)

    @staticmethod
    def limits_for(step: Step, host: StageHost) -> BatchLimits:
        """From what the host says its stage needs: the loaded stage where it is in this process
        (its backend may be chosen at load), else what the stage declares for the step's config."""
        return batch_limits(step, host.resources())

    def _worker(self, step: Step, host: StageHost, device: str, name: str, digest: str | None, queues=None) -> Worker:
        wiring = dict(queue=(queues or self.queues)[step.index], advance=self.advance, metrics=self.metrics)
        limits = self.limits_for(step, host)
        return Worker.for_step(step, host, device, name, pauses=self.pauses, limits=limits, digest=digest, **wiring)

    def _free_name(self, step: Step, device: str) -> str:
        used = {w.name for w in self.workers[step.index]}
        n = 0
        while Worker.name_for(step, n, device) in used:
            n += 1
        return Worker.name_for(step, n, device)

    def build_workers(self) -> None:
        for step in self.steps:
            self.metrics.efficiency.set_speed_of_light(step.label, step.config.speed_of_light_tokens_per_s)
            devices = self.worker_devices(step)
            for n, device in enumerate(devices):
                name = Worker.name_for(step, n, device)
                self.workers[step.index].append(
                    self._worker(step, self._host(step, device, name), device, name, self.config.digest)
                )

    async def _load(self, step: Step, host: StageHost, name: str) -> None:
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

    async def _loaded_host(self, step: Step, device: str, name: str) -> StageHost:
        """A new host with its stage loaded; closed again if the load fails."""
        host = self._host(step, device, name)
        try:
            await self._load(step, host, name)
        except BaseException:
            await close_quietly(host, name)
            raise
        return host

    async def load(self) -> None:
        """Load every worker's stage; the first failure stops start-up with its message. Then
        each worker's batch limits come from its loaded stage."""
        await asyncio.gather(
            *(self._load(step, w.host, w.name) for step in self.steps for w in self.workers[step.index])
        )
        for step in self.steps:
            workers = self.workers[step.index]
            for worker in workers:
                worker.set_limits(self.limits_for(step, worker.host))
            log.info(
                "%s: %d worker(s) on %s; batch_size=%d max_wait_ms=%d concurrency=%s queue_size=%d prep_workers=%d",
                step.label,
                len(workers),
                [w.device for w in workers],
                step.config.batch_size,
                step.config.max_wait_ms,
                workers[0].limits.concurrency if workers else "-",
                step.config.queue_size,
                step.config.prep_workers,
            )

    # --- running -------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            for workers in self.workers:
                for worker in workers:
                    self._start(worker)
            # Hot reload adds and retires workers in this group; it must outlive any one of them.
            await asyncio.get_running_loop().create_future()

    def _start(self, worker: Worker) -> None:
        assert self._group is not None, "Pipeline.run() first"
        self._tasks[worker] = self._group.create_task(worker.run(), name=worker.name)
        worker.resume()

    async def _quiesce(self, worker: Worker) -> None:
        """Stop feeding the worker, wait until it holds no record, end its loops (its host stays open)."""
        worker.pause()
        await worker.drain()
        task = self._tasks.pop(worker, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(w.host.close() for ws in self.workers for w in ws), return_exceptions=True)
        if self.remote is not None:
            await self.remote.close()

    # --- graph edits (hot reload) ----------------------------------------------------------

    async def reconfigure_worker(self, worker: Worker, step: Step, digest: str | None) -> None:
        """Light settings: drain the worker so no record straddles two configs, then hand them over."""
        await self._quiesce(worker)
        try:
            worker.host.reconfigure(step.config)
            worker.set_step(step, self.limits_for(step, worker.host), digest)
        finally:
            self._start(worker)

    async def reload_worker(
        self, worker: Worker, step: Step, device: str, digest: str | None, fallback: Step | None
    ) -> None:
        """Drain the worker, close its stage, load `step`'s on `device`, resume it.

        If the new stage does not load, `fallback`'s (the old step) is loaded back and the worker
        resumes as it was; without one (or if that fails too) the worker is retired. Either way
        the load's error is raised."""
        await self._quiesce(worker)
        old_device, old_name = worker.device, worker.name
        await close_quietly(worker.host, worker.name)
        name = old_name if device == old_device else self._free_name(step, device)
        try:
            host = await self._loaded_host(step, device, name)
        except Exception:
            if fallback is not None and await self._load_back(worker, fallback, old_device, old_name):
                self._start(worker)
            else:
                log.critical(
                    "%s has no stage loaded and is retired; the step has %d worker(s) left",
                    worker.name,
                    len(self.workers[worker.step_index]) - 1,
                )
                self.workers[worker.step_index].remove(worker)
            raise
        worker.host, worker.device, worker.name = host, device, name
        worker.set_step(step, self.limits_for(step, host), digest)
        self._start(worker)
        log.info("%s now runs the new stage", name)

    async def _load_back(self, worker: Worker, old: Step, device: str, name: str) -> bool:
        try:
            worker.host = await self._loaded_host(old, device, name)
        except Exception as exc:
            log.critical("%s: the old stage could not be loaded back (%s: %s)", name, type(exc).__name__, exc)
            return False
        return True

    async def retire_worker(self, worker: Worker) -> None:
        """Drain the worker, close its stage and take it off its step."""
        await self._quiesce(worker)
        await close_quietly(worker.host, worker.name)
        self.workers[worker.step_index].remove(worker)
        log.info("%s retired", worker.name)

    async def add_worker(self, step: Step, device: str, digest: str | None) -> Worker:
        """Load a new worker's stage on `device` and start it on the step's queue."""
        name = self._free_name(step, device)
        host = await self._loaded_host(step, device, name)
        worker = self._worker(step, host, device, name, digest)
        self.workers[step.index].append(worker)
        self._start(worker)
        log.info("%s added", name)
        return worker

    def adopt(self, config: Config) -> None:
        """`config` is in force: every worker now runs under its digest (the edits are made)."""
        self.config = config
        for workers in self.workers:
            for worker in workers:
                worker.config_digest = config.digest

    async def swap_graph(self, config: Config, keep: Callable[[Step, str], Hashable]) -> None:
        """Hold new records at the door, wait until none is left in the pipeline, stop every
        worker and assemble `config`'s graph, keeping each loaded stage whose `keep(step,
        device)` key a new worker shares (it only gets its new settings). If a load fails,
        the old graph is assembled again the same way and `EditFailed` is raised."""
        old = self.config
        self.close_intake()
        try:
            await self.wait_empty()
            spare: dict[Hashable, list[StageHost]] = {}
            for step in old.steps:
                for worker in self.workers[step.index]:
                    await self._quiesce(worker)
                    spare.setdefault(keep(step, worker.device), []).append(worker.host)
            try:
                await self._assemble(config, spare, keep)
            except Exception as exc:
                log.error("the new step graph failed to load (%s: %s); restoring the old one", type(exc).__name__, exc)
                await self._assemble(old, spare, keep)
                raise EditFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.open_intake()

    async def _assemble(self, config: Config, spare: dict, keep: Callable[[Step, str], Hashable]) -> None:
        wanted = [(step, n, device) for step in config.steps for n, device in enumerate(self.worker_devices(step))]
        reused: dict[int, StageHost] = {}
        for i, (step, _, device) in enumerate(wanted):
            hosts = spare.get(keep(step, device))
            if hosts:
                reused[i] = hosts.pop()
        for key, hosts in spare.items():  # free their devices before loading anything new
            for host in hosts:
                await close_quietly(host, str(key))
        spare.clear()
        loaded: dict[int, StageHost] = {}
        try:
            for i, (step, n, device) in enumerate(wanted):
                if i not in reused:
                    loaded[i] = await self._loaded_host(step, device, Worker.name_for(step, n, device))
        except BaseException:
            for i, host in loaded.items():
                await close_quietly(host, wanted[i][0].label)
            for i, host in reused.items():  # still loaded: the caller may assemble the old graph with them
                step, _, device = wanted[i]
                spare.setdefault(keep(step, device), []).append(host)
            raise
        queues = [asyncio.Queue(maxsize=step.config.queue_size) for step in config.steps]
        workers: list[list[Worker]] = [[] for _ in config.steps]
        for i, (step, n, device) in enumerate(wanted):
            host = reused.get(i) or loaded[i]
            if i in reused:
                host.reconfigure(step.config)
            workers[step.index].append(
                self._worker(step, host, device, Worker.name_for(step, n, device), config.digest, queues)
            )
        gone = {step.label for step in self.steps} - {step.label for step in config.steps}
        for metric in (self.metrics.queue_depth, self.metrics.inflight, self.metrics.model_load_seconds):
            for label in gone:
                with contextlib.suppress(KeyError):  # a series that was never set
                    metric.remove(label)
        for step, queue in zip(config.steps, queues, strict=True):
            self.metrics.queue_depth.labels(step.label).set_function(queue.qsize)
        self.config, self.queues, self.workers = config, queues, workers
        for step_workers in workers:
            for worker in step_workers:
                self._start(worker)
        log.info(
            "step graph: %s (%d stage(s) kept loaded, %d loaded)",
            " -> ".join(f"{s.type}/{s.name}" for s in config.steps),
            len(reused),
            len(loaded),
        )

    # --- records in and out ----------------------------------------------------------------

    def close_intake(self) -> None:
        """Hold new records at the door (submit/reject wait) until `open_intake`."""
        self._intake_open.clear()

    def open_intake(self) -> None:
        self._intake_open.set()

    async def wait_empty(self, poll_s: float = 0.02) -> None:
        """With intake closed: wait until no record is anywhere in the pipeline."""
        while self._entering or any(job.outstanding for job in self.jobs.values()):
            await asyncio.sleep(poll_s)

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
        await self.outcomes.failed(label, failed)
        going_on = await self.outcomes.passed(label, ok, last=step_index == len(self.steps) - 1)
        for record in going_on:
            await self.queues[step_index + 1].put(record)
