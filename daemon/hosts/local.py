"""`LocalHost`: a worker's stage in this process, blocking calls in threads."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from daemon.hosts.devices import local_device
from stages.base import Stage, StageConfig, StageError, has_prepare, is_async


class LocalHost:
    """The stage in this process: blocking calls in threads, `aprocess` awaited on the loop."""

    # Model loading is not thread-safe (transformers' lazy imports, accelerate's init_empty_weights
    # patching torch process-wide), so the stages of one process load one at a time.
    _loading = threading.Lock()

    def __init__(self, stage_cls: type[Stage], config: StageConfig, device: str, prep_workers: int, label: str):
        self.stage = stage_cls(config, local_device(device))  # its child processes see only its GPUs
        self._label = label
        self._prep_size = prep_workers
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{label}-model")
        self._prep_pool = (
            ThreadPoolExecutor(prep_workers, thread_name_prefix=f"{label}-prep") if has_prepare(self.stage) else None
        )

    async def _in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    def _load(self) -> None:
        with LocalHost._loading:
            self.stage.load()

    async def load(self) -> None:
        await self._in_model_thread(self._load)

    async def prepare(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self._prep_pool is None:
            return fields
        return await asyncio.get_running_loop().run_in_executor(self._prep_pool, self.stage.prepare, fields)

    async def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        if is_async(self.stage):
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
        size = config.prep_workers
        if self._prep_pool is not None and size != self._prep_size:
            old, self._prep_pool = self._prep_pool, ThreadPoolExecutor(size, thread_name_prefix=f"{self._label}-prep")
            self._prep_size = size
            old.shutdown(wait=False)  # drained: nothing is queued on it
