"""Carry out a reload plan (plan.py) on a running pipeline, as one transaction.

The pipeline makes every edit (daemon/runtime/pipeline.py); this module decides which, in
what order, and how to undo them:

- `Rollout`: the steps are the same (same types and names, same order). Per step, per
  worker: `IN_PLACE` changes drain that worker, hand the stage its new settings and resume
  it; `RELOAD` changes (a model key) and device moves reload it. One worker at a time, so
  the step's other workers keep serving; `PLACE` changes (devices, workers_per_device) add
  or retire workers. A worker keeps its model when its device and the model keys are
  unchanged. If a load fails, every edit made so far is undone in reverse order (the old
  model is loaded back where it had been closed) and the reload fails: the old config stays.
- `swap`: `SWAP_GRAPH` (steps added, removed or reordered, a queue resized): the pipeline
  drains and assembles the new graph, keeping each loaded stage whose type, name, device and
  model keys match a new worker (plan.same_stage). No record is inside a worker during a swap,
  so none is lost or run twice; if a load fails, the old graph is back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from daemon.config import Config, Step
from daemon.runtime.pipeline import EditFailed, Pipeline
from daemon.runtime.worker import Worker
from daemon.service.reload.plan import StepChange, same_stage

log = logging.getLogger(__name__)


class ReloadFailed(Exception):
    """A new stage could not be loaded; the old config is back in force."""


async def swap(pipeline: Pipeline, new: Config) -> None:
    try:
        await pipeline.swap_graph(new, keep=same_stage)
    except EditFailed as exc:
        raise ReloadFailed(str(exc)) from exc


class Rollout:
    def __init__(self, pipeline: Pipeline, digest: str, old_digest: str):
        self.pipeline = pipeline
        self.digest = digest
        self.old_digest = old_digest
        self.undo: list[tuple[str, Callable[[], Awaitable[object]]]] = []

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
            except Exception as exc:  # keep undoing the rest; the worker is gone (see Pipeline.reload_worker)
                log.error("reload: undoing %s failed: %s: %s", what, type(exc).__name__, exc)
        self.undo.clear()

    async def _step(self, change: StepChange) -> None:
        new, old = change.new, change.old
        remaining = list(self.pipeline.workers_of(new))
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
            await self._retire(worker, old)
        for worker, device in moved + (kept if change.reloads_model else []):
            await self._reload(worker, new, device, old)
        for device in unplaced:
            await self._add(new, device)
        if not change.reloads_model:
            for worker, _ in kept:
                await self._light(worker, new, old)

    async def _light(self, worker: Worker, step: Step, old: Step) -> None:
        await self.pipeline.reconfigure_worker(worker, step, self.digest)
        self.undo.append(
            (f"settings of {worker.name}", lambda: self.pipeline.reconfigure_worker(worker, old, self.old_digest))
        )

    async def _reload(self, worker: Worker, step: Step, device: str, old: Step) -> None:
        old_device, old_digest = worker.device, worker.config_digest
        await self.pipeline.reload_worker(worker, step, device, self.digest, fallback=old)
        self.undo.append(
            (
                f"the stage of {worker.name}",
                lambda: self.pipeline.reload_worker(worker, old, old_device, old_digest, fallback=None),
            )
        )

    async def _retire(self, worker: Worker, old: Step) -> None:
        device = worker.device
        await self.pipeline.retire_worker(worker)
        self.undo.append((f"retiring {worker.name}", lambda: self.pipeline.add_worker(old, device, self.old_digest)))

    async def _add(self, step: Step, device: str) -> None:
        worker = await self.pipeline.add_worker(step, device, self.digest)
        self.undo.append((f"adding {worker.name}", lambda: self.pipeline.retire_worker(worker)))
