"""What a worker needs from the place its stage runs (this process, a Ray actor), the two
ways a remote place can fail: the batch lost (`WorkerLost`, retried) or no worker to be had
(`WorkerGone`, the pipeline stops), and the batch rules every place applies the same way:
a record whose `prepare` raises fails alone (`PreparedBatch`), and a stage answers one slot
per record, in order (`check_outputs`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from stages.base import Resources, StageConfig, StageError

Slot = Any  # what a stage answers for one record: new fields, a StageError, a Filtered, children


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
    def resources(self) -> Resources: ...  # what the stage needs, as its batch limits are computed from
    def take_usage(self) -> Counter[str]: ...
    def reconfigure(self, config: StageConfig) -> None: ...


def check_outputs(outputs: object, expected: int, when: str = "") -> list[Slot]:
    """The stage's answer to a batch of `expected` records, if it is one slot per record.

    `when` says which call it was (" on a retry"), for the message."""
    if not isinstance(outputs, list) or len(outputs) != expected:
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise RuntimeError(
            f"stage returned {got} results for {expected} records{when}; expected one per record, in order"
        )
    return outputs


@dataclass
class PreparedBatch:
    """A batch after each record's `prepare`: a record whose prepare raised holds its
    StageError in its slot and stays out of the model call; the others go on (`prepared`).

    Built from one outcome per record, in order: the prepared fields, or the exception its
    prepare raised (a transient one already outlasted by the caller)."""

    slots: list[Slot | None]
    ready: list[int] = field(default_factory=list)  # slot index of each prepared record
    prepared: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: Iterable[dict[str, Any] | Exception]) -> PreparedBatch:
        outcomes = list(outcomes)
        batch = cls(slots=[None] * len(outcomes))
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, Exception):
                batch.slots[index] = StageError.from_exception(outcome)
            else:
                batch.ready.append(index)
                batch.prepared.append(outcome)
        return batch

    def errors(self) -> Iterator[tuple[int, StageError]]:
        """Each record whose prepare failed, by slot index, with its error."""
        ready = set(self.ready)
        for index, slot in enumerate(self.slots):
            if index not in ready:
                yield index, slot

    def fill(self, outputs: object) -> list[Slot]:
        """Put the model's answer for `prepared` into the slots (checked: one per record)."""
        for index, output in zip(self.ready, check_outputs(outputs, len(self.prepared)), strict=True):
            self.slots[index] = output
        return self.slots
