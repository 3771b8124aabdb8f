"""Apply a validated config to a running pipeline, as one transaction.

Two strategies (daemon/service/reload/reloader.py picks one per reload):

- `Rollout`: the steps are the same (same types and names, same order). Per step, per
  worker: light changes drain that worker, hand the stage its new settings and resume it;
  model changes (a `heavy_keys` key, a device move) drain the worker, close its stage,
  load the new one and resume it. One worker at a time, so the step's other workers keep
  serving; `devices`/`workers_per_device` changes add or retire workers. A worker keeps
  its model when its device and the model keys are unchanged. If a load fails, every
  change made so far is undone in reverse order (the old model is loaded back where it
  had been closed) and the reload fails: the old config stays in force.
- `Rebuild`: steps added, removed or reordered (or a queue resized). Hold new records at
  the door, wait until no record is left anywhere in the pipeline, stop every worker,
  and assemble the new graph, keeping each loaded stage whose type, name, device and
  model keys match a new worker (it only gets its new settings) and closing the others
  before loading what is missing. If a load fails, the old graph is assembled again the
  same way. Then intake opens again. No record is ever inside a worker during a swap, so
  none is lost or run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from daemon.config import Config, Step
from daemon.hosts.base import StageHost
from daemon.runtime.pipeline import Pipeline, batch_limits
from daemon.runtime.worker import Worker

log = logging.getLogger(__name__)

PLACEMENT_KEYS = frozenset({"devices", "workers_per_device"})


def model_keys(step: Step) -> frozenset[str]:
    """The step's keys whose change needs the model loaded again (placement aside)."""
    return frozenset(step.stage_cls.Config.heavy_keys) - PLACEMENT_KEYS


def host_key(step: Step, device: str) -> tuple:
    """Two workers with the same key can share one loaded stage (only light settings differ)."""
    config = step.config
    return (step.type, step.name, device, repr(sorted((k, getattr(config, k, None)) for k in model_keys(step))))


@dataclass
class StepChange:
    old: Step
    new: Step
    changed: frozenset[str]

    @property
    def reloads_model(self) -> bool:
        return bool(self.changed & model_keys(self.new))


async def close_quietly(host: StageHost, name: str) -> None:
    try:
        await host.close()
    except Exception as exc:
        log.warning("%s: closing its stage raised %s: %s", name, type(exc).__name__, exc)


class ReloadFailed(Exception):
    """A new stage could not be loaded; the old config is back in force."""


class Rollout:
    def __init__(self, pipeline: Pipeline, digest: str, old_digest: str):
        self.pipeline = pipeline
        self.digest = digest
        self.old_digest = old_digest
        self.undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self.loads = 0  # model loads this rollout did

    async def apply(self, changes: list[StepChange]) -> None:
        try:
            for change in changes:
                if change.changed:
                    await self._step(change)
        except Exception as exc:
            log.error("reload: %s: %s; undoing the %d change(s) made so far", type(exc).__name__, exc, len(self.undo))
            await self._rollback()
            raise ReloadFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _rollback(self) -> None:
        for what, action in reversed(self.undo):
            try:
                await action()
            except Exception as exc:  # keep undoing the rest; the worker is gone (see _swap)
                log.error("reload: undoing %s failed: %s: %s", what, type(exc).__name__, exc)
        self.undo.clear()

    async def _step(self, change: StepChange) -> None:
        new, old = change.new, change.old
        remaining = list(self.pipeline.workers[new.index])
        kept: list[tuple[Worker, str]] = []  # same device: the model stays unless a model key changed
        unplaced: list[str] = []
        for device in self.pipeline.worker_devices(new):
            match = next((w for w in remaining if w.device == device), None)
            if match is None:
                unplaced.append(device)
            else:
                remaining.remove(match)
                kept.append((match, device))
        moved: list[tuple[Worker, str]] = []
        while unplaced and remaining:
            moved.append((remaining.pop(0), unplaced.pop(0)))
        # Retire first (frees its device), then move or reload, then add, then light changes.
        for worker in remaining:
            await self._retire(worker, old, undo_digest=self.old_digest)
        for worker, device in moved + (kept if change.reloads_model else []):
            await self._swap(worker, new, device, self.digest, back_to=(old, self.old_digest))
        for device in unplaced:
            await self._add(new, device, self.digest, undoable=True)
        if not change.reloads_model:
            for worker, _ in kept:
                await self._light(worker, new, self.digest, old, self.old_digest)

    def _name(self, step: Step, device: str) -> str:
        used = {w.name for w in self.pipeline.workers[step.index]}
        n = 0
        while f"{step.label}/w{n}@{device}" in used:
            n += 1
        return f"{step.label}/w{n}@{device}"

    async def _load(self, step: Step, device: str, name: str) -> StageHost:
        host = self.pipeline.host_for(step, device, name)
        try:
            await self.pipeline.load_host(step, host, name)
        except BaseException:
            await close_quietly(host, name)
            raise
        self.loads += 1
        return host

    async def _quiesce(self, worker: Worker) -> None:
        """Stop feeding the worker, wait until it holds no record, end its loops."""
        worker.pause()
        await worker.drain()
        await self.pipeline.stop_worker(worker)

    def _restart(self, worker: Worker) -> None:
        self.pipeline.start_worker(worker)
        worker.resume()

    async def _light(self, worker: Worker, step: Step, digest: str, old: Step, old_digest: str) -> None:
        """Settings only: drain the worker so no record straddles two configs, then hand them over."""
        await self._quiesce(worker)
        try:
            worker.host.reconfigure(step.config)
            worker.set_limits(batch_limits(step))
            worker.config_digest = digest
        finally:
            self._restart(worker)
        self.undo.append((f"settings of {worker.name}", lambda: self._light(worker, old, old_digest, step, digest)))

    async def _swap(
        self, worker: Worker, step: Step, device: str, digest: str, back_to: tuple[Step, str] | None
    ) -> None:
        """Stop feeding the worker, drain it, close its stage, load the new one, resume.

        If the new one does not load, the old one (`back_to`) is loaded again; without
        `back_to` (or if that fails too) the worker is retired.
        """
        await self._quiesce(worker)
        old_step = self.pipeline.config.steps[worker.step_index]
        old_device, old_name, old_digest = worker.device, worker.name, worker.config_digest
        await close_quietly(worker.host, worker.name)
        name = old_name if device == old_device else self._name(step, device)
        try:
            host = await self._load(step, device, name)
        except Exception:
            if back_to is not None and await self._reload_old(worker, back_to[0], old_device, old_name):
                self._restart(worker)
            else:
                await self._drop(worker)
            raise
        worker.host, worker.device, worker.name = host, device, name
        worker.set_limits(batch_limits(step))
        worker.config_digest = digest
        self._restart(worker)
        log.info("%s now runs the new stage", name)
        self.undo.append(
            (f"the stage of {name}", lambda: self._swap(worker, old_step, old_device, old_digest, back_to=None))
        )

    async def _reload_old(self, worker: Worker, old: Step, device: str, name: str) -> bool:
        try:
            worker.host = await self._load(old, device, name)
        except Exception as exc:
            log.critical("%s: the old stage could not be loaded back (%s: %s)", name, type(exc).__name__, exc)
            return False
        return True

    async def _drop(self, worker: Worker) -> None:
        log.critical(
            "%s has no stage loaded and is retired; the step has %d worker(s) left",
            worker.name,
            len(self.pipeline.workers[worker.step_index]) - 1,
        )
        self.pipeline.workers[worker.step_index].remove(worker)

    async def _retire(self, worker: Worker, old: Step, undo_digest: str | None) -> None:
        await self._quiesce(worker)
        await close_quietly(worker.host, worker.name)
        self.pipeline.workers[worker.step_index].remove(worker)
        log.info("%s retired", worker.name)
        if undo_digest is not None:
            device = worker.device
            self.undo.append((f"retiring {worker.name}", lambda: self._add(old, device, undo_digest, undoable=False)))

    async def _add(self, step: Step, device: str, digest: str, undoable: bool) -> None:
        name = self._name(step, device)
        host = await self._load(step, device, name)
        worker = Worker(
            step.index,
            step.label,
            host,
            self.pipeline.queues[step.index],
            self.pipeline.advance,
            self.pipeline.metrics,
            batch_limits(step),
            name,
            digest,
            device,
        )
        self.pipeline.workers[step.index].append(worker)
        self.pipeline.start_worker(worker)
        log.info("%s added", name)
        if undoable:
            self.undo.append((f"adding {name}", lambda: self._retire(worker, step, undo_digest=None)))


class Rebuild:
    """Drain the whole pipeline and assemble the new step graph (see the module docstring)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.loads = 0

    async def apply(self, old: Config, new: Config) -> None:
        pipeline = self.pipeline
        pipeline.close_intake()
        try:
            await pipeline.wait_empty()
            spare: dict[tuple, list[StageHost]] = {}
            for step in old.steps:
                for worker in pipeline.workers[step.index]:
                    worker.pause()
                    await worker.drain()
                    await pipeline.stop_worker(worker)
                    spare.setdefault(host_key(step, worker.device), []).append(worker.host)
            try:
                await self._assemble(new, spare)
            except Exception as exc:
                log.error(
                    "reload: the new step graph failed to load (%s: %s); restoring the old one", type(exc).__name__, exc
                )
                await self._assemble(old, spare)
                raise ReloadFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            pipeline.open_intake()

    async def _assemble(self, config: Config, spare: dict[tuple, list[StageHost]]) -> None:
        pipeline = self.pipeline
        wanted = [(step, n, device) for step in config.steps for n, device in enumerate(pipeline.worker_devices(step))]
        reused: dict[int, StageHost] = {}
        for i, (step, _, device) in enumerate(wanted):
            hosts = spare.get(host_key(step, device))
            if hosts:
                reused[i] = hosts.pop()
        for key, hosts in spare.items():  # free their devices before loading anything new
            for host in hosts:
                await close_quietly(host, f"{key[0]}/{key[1]}@{key[2]}")
        spare.clear()
        loaded: dict[int, StageHost] = {}
        try:
            for i, (step, n, device) in enumerate(wanted):
                if i not in reused:
                    name = f"{step.label}/w{n}@{device}"
                    loaded[i] = pipeline.host_for(step, device, name)
                    await pipeline.load_host(step, loaded[i], name)
                    self.loads += 1
        except BaseException:
            for i, host in loaded.items():
                await close_quietly(host, wanted[i][0].label)
            for i, host in reused.items():  # still loaded: the caller may assemble the old graph with them
                step, _, device = wanted[i]
                spare.setdefault(host_key(step, device), []).append(host)
            raise
        queues = [asyncio.Queue(maxsize=step.config.queue_size) for step in config.steps]
        workers: list[list[Worker]] = [[] for _ in config.steps]
        for i, (step, n, device) in enumerate(wanted):
            host = reused.get(i) or loaded[i]
            if i in reused:
                host.reconfigure(step.config)
            name = f"{step.label}/w{n}@{device}"
            workers[step.index].append(
                Worker(
                    step.index,
                    step.label,
                    host,
                    queues[step.index],
                    pipeline.advance,
                    pipeline.metrics,
                    batch_limits(step),
                    name,
                    config.digest,
                    device,
                )
            )
        gone = {step.label for step in pipeline.config.steps} - {step.label for step in config.steps}
        for metric in (pipeline.metrics.queue_depth, pipeline.metrics.inflight, pipeline.metrics.model_load_seconds):
            for label in gone:
                with contextlib.suppress(KeyError):  # a series that was never set
                    metric.remove(label)
        for step, queue in zip(config.steps, queues, strict=True):
            pipeline.metrics.queue_depth.labels(step.label).set_function(queue.qsize)
        pipeline.config, pipeline.queues, pipeline.workers = config, queues, workers
        for step_workers in workers:
            for worker in step_workers:
                pipeline.start_worker(worker)
        log.info(
            "step graph: %s (%d stage(s) kept loaded, %d loaded)",
            " -> ".join(f"{s.type}/{s.name}" for s in config.steps),
            len(reused),
            len(loaded),
        )
