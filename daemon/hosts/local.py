"""`LocalHost`: a worker's stage in this process, blocking calls in threads; and where a step's
local workers go (`worker_devices`), from what the stage declares it needs."""

from __future__ import annotations

import asyncio
import importlib.util
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from daemon.hosts.devices import local_device
from stages.base import MODEL_LOADING, Resources, Stage, StageConfig, StageError

if TYPE_CHECKING:
    from daemon.config import Step


def visible_gpus() -> list[str]:
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_devices(step: Step, gpus: Callable[[], list[str]] = visible_gpus) -> list[str]:
    """One entry per worker: a device, or a comma-joined group of `accelerators` devices."""
    config = step.config
    needs = step.stage_cls.resources(config)
    if config.devices:
        devices = config.devices
    elif needs.accelerators:
        devices = gpus() or ["cpu"]
    else:
        devices = ["cpu"]  # CPU tools and API stages (whose concurrency is their slots, not devices)
    group = max(1, needs.accelerators)
    groups = [",".join(devices[i : i + group]) for i in range(0, len(devices) - group + 1, group)] or [
        ",".join(devices)
    ]
    return [device for device in groups for _ in range(config.workers_per_device)]


class LocalHost:
    """The stage in this process: blocking calls in threads, `aprocess` awaited on the loop."""

    def __init__(self, stage_cls: type[Stage], config: StageConfig, device: str, prep_workers: int, label: str):
        self.stage = stage_cls(config, local_device(device))  # its child processes see only its GPUs
        self._asynchronous: bool | None = None  # what the loaded stage says (its backend is chosen at load)
        self._label = label
        self._prep_size = prep_workers
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{label}-model")
        prepares = stage_cls.resources(config).prepares  # as declared (the config check holds it to the class)
        self._prep_pool = ThreadPoolExecutor(prep_workers, thread_name_prefix=f"{label}-prep") if prepares else None

    async def _in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    def _load(self) -> None:
        with MODEL_LOADING:  # one stage loads at a time in a process (see stages/base.py)
            self.stage.load()

    async def load(self) -> None:
        await self._in_model_thread(self._load)
        self._asynchronous = None

    def resources(self) -> Resources:
        """What the loaded stage needs (its backend may have been chosen at load)."""
        return self.stage.loaded_resources()

    async def prepare(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self._prep_pool is None:
            return fields
        return await asyncio.get_running_loop().run_in_executor(self._prep_pool, self.stage.prepare, fields)

    async def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        if self._asynchronous is None:
            self._asynchronous = self.resources().asynchronous
        if self._asynchronous:
            return await self.stage.aprocess(batch)
        return await self._in_model_thread(self.stage.process, batch)

    async def close(self) -> None:
        try:
            await self._in_model_thread(self.stage.close)
        finally:
            self._model_thread.shutdown(wait=False, cancel_futures=True)
            if self._prep_pool:
                self._prep_pool.shutdown(wait=False, cancel_futures=True)

    def take_usage(self) -> Counter[str]:
        return self.stage.take_usage()

    def reconfigure(self, config: StageConfig) -> None:
        """Light change: the stage reads `self.config` on every call. Called while the worker is drained."""
        self.stage.config = config
        self._asynchronous = None
        size = config.prep_workers
        if self._prep_pool is not None and size != self._prep_size:
            old, self._prep_pool = self._prep_pool, ThreadPoolExecutor(size, thread_name_prefix=f"{self._label}-prep")
            self._prep_size = size
            old.shutdown(wait=False)  # drained: nothing is queued on it
