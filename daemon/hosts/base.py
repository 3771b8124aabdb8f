"""What a worker needs from the place its stage runs (this process, a Ray actor), and the two
ways a remote place can fail: the batch lost (`WorkerLost`, retried) or no worker to be had
(`WorkerGone`, the pipeline stops)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from stages.base import StageConfig, StageError


class WorkerLost(Exception):
    """The worker process died or hung during a call: the batch is retried, not failed.

    `kind` names the cause in the errors file when a record keeps losing workers
    (WorkerCrashed, WorkerTimeout).
    """

    def __init__(self, message: str, kind: str = "WorkerCrashed"):
        super().__init__(message)
        self.kind = kind


class WorkerGone(Exception):
    """No worker can be had for this host (replacements exhausted): the pipeline stops;
    its records stay unwritten and their job resumes at the next start."""


class StageHost(Protocol):
    """Where one resident stage lives. All calls are awaitable and never block the loop."""

    async def load(self) -> None: ...
    async def prepare(self, fields: dict[str, Any]) -> dict[str, Any]: ...
    async def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]: ...
    async def close(self) -> None: ...
    def take_usage(self) -> Counter[str]: ...
    def reconfigure(self, config: StageConfig) -> None: ...
