"""How a worker forms batches and shares its host: the limits in effect (from what the stage
declares, `Stage.resources`), and the gate that lets a lost batch's retry run alone."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from daemon.config import Step
from stages.base import Resources


@dataclass
class BatchLimits:
    batch_size: int
    max_wait_s: float
    concurrency: int  # batches in flight at once (async stages, remote hosts)


def batch_limits(step: Step, resources: Resources) -> BatchLimits:
    """The step's limits for a stage needing `resources`: an async stage with n concurrency
    slots keeps ceil(n / batch_size) batches in flight, so its slots stay full."""
    config = step.config
    concurrency = 1
    if resources.asynchronous and resources.concurrency_slots > 1:
        concurrency = max(1, math.ceil(resources.concurrency_slots / config.batch_size))
    if step.workers.backend == "ray":  # keep the next batch at the actor so the RPC hides behind model time
        concurrency = max(concurrency, step.workers.calls_in_flight)
    return BatchLimits(batch_size=config.batch_size, max_wait_s=config.max_wait_ms / 1000, concurrency=concurrency)


class CallGate:
    """Calls share the host, except a call retrying a lost batch, which runs alone on it:
    then a crash can only be that batch's doing."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive calls waiting: they go before new shared ones

    @asynccontextmanager
    async def hold(self, alone: bool) -> AsyncIterator[None]:
        async with self._changed:
            if alone:
                self._waiting += 1
                try:
                    await self._changed.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._waiting -= 1
                self._exclusive = True
            else:
                await self._changed.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                if alone:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._changed.notify_all()
