"""Workers: one resident Stage each, fed from its step's queue, micro-batching, isolating failures.

A worker runs two loops: `prefetch` takes records off the step's queue and runs the
stage's `prepare` in the worker's own thread pool (so frames for the next batch decode
while the model runs this one), and `batches` collects prepared records into a batch of up
to `batch_size` or whatever arrived within `max_wait_ms`, and calls the model.

Where the stage runs is behind `StageHost` (daemon/hosts/): `LocalHost` keeps it in this process (threads
for blocking code); another host (e.g. a Ray actor, daemon/hosts/ray/) only has to offer
the same calls. A remote host tells a lost worker apart from a stage error: it raises
`WorkerLost` when the process running the stage died or hung (the batch did not fail, it
was lost), and `WorkerGone` when it cannot get a worker back at all.

A `prepare` or model call that fails for a transient cause (daemon/runtime/failures.py:
disk full, EIO, a dead endpoint) is retried with backoff while intake pauses; the record
is neither done nor failed meanwhile. Other failures are the record's own: error lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from daemon.hosts.base import PreparedBatch, StageHost, WorkerGone, WorkerLost, check_outputs
from daemon.io.records import Record
from daemon.runtime.batching import BatchLimits, CallGate
from daemon.runtime.failures import TRANSIENT, Pauses, classify
from stages.base import Filtered, StageError

if TYPE_CHECKING:
    from daemon.config import Step

log = logging.getLogger(__name__)

Failure = tuple[Record, str, str]  # record, error type, message
Advance = Callable[[int, list[Record], list[Failure]], Awaitable[None]]
Items = list[tuple[Record, dict]]  # records with their prepared inputs


CRASHES_BEFORE_ERROR = 2  # a record that crashes its worker this often, alone on it, goes to errors


def is_out_of_memory(exc: BaseException) -> bool:
    if type(exc).__name__ in {"OutOfMemoryError", "MemoryError"}:
        return True
    text = str(exc).lower()
    return "out of memory" in text and ("cuda" in text or "alloc" in text or "device" in text)


class Worker:
    """One resident stage on its step's queue.

    Hot reload changes a worker between two records, never in the middle of one: `pause()`
    stops it taking records off the queue, `drain()` waits until every record it took has
    been handed on (`advance`), then the pipeline (Pipeline.reload_worker and friends)
    stops its loops, swaps its stage or its settings (`set_step` takes effect when `run`
    starts again) and starts it again. `Worker.for_step` is how the runtime makes one.
    """

    def __init__(
        self,
        step_index: int,
        step_label: str,
        host: StageHost,
        queue: asyncio.Queue,
        advance: Advance,
        metrics,
        limits: BatchLimits,
        name: str,
        config_digest: str | None = None,
        device: str = "cpu",
        pauses: Pauses | None = None,
    ):
        self.step_index = step_index
        self.step_label = step_label
        self.host = host
        self.queue = queue
        self._forward = advance
        self.metrics = metrics
        self.limits = limits
        self.name = name
        self.device = device
        self.config_digest = config_digest  # the config whose settings this worker runs with
        self.pauses = pauses or Pauses(metrics)  # the pipeline's: transient failures pause its intake
        self.batch_cap = limits.batch_size  # lowered after out-of-memory errors
        self._ready: asyncio.Queue = asyncio.Queue(maxsize=max(1, limits.batch_size))
        self._gate = CallGate()
        self._paused = asyncio.Event()  # set = running: the prefetch loop takes records
        self._paused.set()
        self._held = 0  # records taken off the queue and not yet handed on
        self._idle = asyncio.Event()
        self._idle.set()
        self.oom_advice = "use a larger device"  # the stage's own advice (for_step / set_step)

    @staticmethod
    def name_for(step: Step, n: int, device: str) -> str:
        """`<step label>/w<n>@<device>`: how logs, metrics and thread names call a worker."""
        return f"{step.label}/w{n}@{device}"

    @classmethod
    def for_step(
        cls, step: Step, host: StageHost, device: str, name: str, *, queue, advance, metrics, pauses, limits, digest
    ) -> Worker:
        """A worker of `step` on `device` whose stage lives in `host`: the one way the runtime makes
        one (the constructor's arguments, plus the stage's own advice for out-of-memory errors)."""
        worker = cls(step.index, step.label, host, queue, advance, metrics, limits, name, digest, device, pauses)
        worker.oom_advice = step.stage_cls.out_of_memory_advice(step.config)
        return worker

    def set_step(self, step: Step, limits: BatchLimits, digest: str | None) -> None:
        """New settings for the same step (while drained: they take effect when `run` starts again)."""
        self.set_limits(limits)
        self.config_digest = digest
        self.oom_advice = step.stage_cls.out_of_memory_advice(step.config)

    def set_limits(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.batch_cap = limits.batch_size

    @property
    def paused(self) -> bool:
        return not self._paused.is_set()

    def pause(self) -> None:
        """Take no more records off the queue (those already taken still finish)."""
        self._paused.clear()

    def resume(self) -> None:
        self._paused.set()

    async def drain(self) -> None:
        """Wait until every record this worker took is in the next queue, the results or the errors."""
        await self._idle.wait()

    async def advance(self, step_index: int, ok: list[Record], failed: list[Failure]) -> None:
        """Hand a finished batch on; only then does the worker stop holding its records."""
        try:
            await self._forward(step_index, ok, failed)
        finally:
            self._held -= len(ok) + len(failed)
            if self._held == 0:
                self._idle.set()

    async def run(self) -> None:
        self._ready = asyncio.Queue(maxsize=max(1, self.limits.batch_size))  # limits may have changed
        # Every task of the worker is in this group: a stop cancels the prepares started for
        # records that will not run now, with the loops.
        async with asyncio.TaskGroup() as group:
            group.create_task(self._prefetch(group), name=f"{self.name}-prefetch")
            group.create_task(self._batches(group), name=f"{self.name}-batches")

    async def _prefetch(self, group: asyncio.TaskGroup) -> None:
        while True:
            await self._paused.wait()
            record: Record = await self.queue.get()
            if not self._paused.is_set():  # paused while waiting: give it back (no await since get: room)
                self.queue.put_nowait(record)
                continue
            self._held += 1
            self._idle.clear()
            record.step_digests[self.step_label] = self.config_digest
            self.metrics.inflight.labels(self.step_label).inc()
            task = group.create_task(self._prepare(record.fields), name=f"{self.name}-prepare")
            await self._ready.put((record, task))

    async def _prepare(self, fields: dict) -> dict | Exception:
        """A record's prepare, in the worker's task group: its failure is the record's, so it is
        returned (and raised where the batch awaits it), never left to end the group."""
        try:
            return await self.host.prepare(fields)
        except Exception as exc:
            return exc

    async def _batches(self, group: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(self.limits.concurrency)  # batches in the model at once
        # A batch leaves its model slot before it is routed and written (the outbox fsyncs), so the
        # model never waits for the disk; one batch more than the model holds may be in that phase.
        routing = asyncio.Semaphore(self.limits.concurrency + 1)
        # With one batch in the model at a time, batches are routed in the order they came, so a
        # single worker keeps its input's order; with many (async stages) a slow one must not hold
        # up the others.
        ordered = self.limits.concurrency == 1
        previous: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._ready.get()]
            deadline = loop.time() + self.limits.max_wait_s
            while len(batch) < self.batch_cap:
                if not self._ready.empty():
                    batch.append(self._ready.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:  # asyncio.timeout: wait_for (3.11) can swallow a cancel landing as an item arrives
                    async with asyncio.timeout(remaining):
                        batch.append(await self._ready.get())
                except TimeoutError:
                    break
            await routing.acquire()
            await slots.acquire()
            routed = loop.create_future()
            task = group.create_task(self._run_prepared(batch, slots, previous if ordered else None, routed))
            task.add_done_callback(lambda _t: routing.release())
            previous = routed

    async def _run_prepared(
        self,
        batch: list[tuple[Record, asyncio.Future]],
        slots: asyncio.Semaphore,
        after: asyncio.Future | None = None,
        routed: asyncio.Future | None = None,
    ) -> None:
        failed: list[Failure] = []
        ok: list[Record] = []
        try:
            waited = time.perf_counter()  # the model's slot is held: time here is the model starving
            # A bad record in prepare fails alone, the rest go on: the rule every host applies (hosts.base).
            prepared = PreparedBatch.of([await self._prepared(record, task) for record, task in batch])
            self.metrics.prepare_wait.labels(self.step_label).inc(time.perf_counter() - waited)
            for index, error in prepared.errors():
                failed.append((batch[index][0], error.error_type, error.message))
            if prepared.prepared:
                ready = [
                    (batch[index][0], fields) for index, fields in zip(prepared.ready, prepared.prepared, strict=True)
                ]
                await self._call_model(ready, ok, failed)
        finally:
            slots.release()
        try:
            if after is not None:
                await after
            self.metrics.inflight.labels(self.step_label).dec(len(batch))
            self.metrics.count_usage(self.step_label, self.host.take_usage())
            await self.advance(self.step_index, ok, failed)
        finally:
            if routed is not None and not routed.done():
                routed.set_result(None)

    async def _prepared(self, record: Record, task: asyncio.Future) -> dict | Exception:
        """The prepare's outcome: its fields, or the exception that is the record's failure; a
        transient failure (disk full writing frames) is outlasted, not failed."""
        outcome = await task
        if not isinstance(outcome, Exception) or classify(outcome) != TRANSIENT:
            return outcome
        what = f"{self.name}: prepare of record {record.id} (job {record.job})"
        try:
            return await self.pauses.outlast(outcome, what, lambda: self.host.prepare(record.fields))
        except Exception as exc:
            return exc

    async def _process(self, batch: list[dict]) -> list:
        """The model call; a transient failure (a dead endpoint, EIO) is outlasted with backoff.

        Lost workers (crash isolation) and out-of-memory (batch halving) keep their own handling."""
        try:
            outputs = await self.host.process(batch)
        except (WorkerLost, WorkerGone):
            raise
        except Exception as exc:
            if is_out_of_memory(exc) or classify(exc) != TRANSIENT:
                raise
            what = f"{self.name}: model call on a batch of {len(batch)}"
            outputs = await self.pauses.outlast(exc, what, lambda: self.host.process(batch))
        return await self._outlast_slots(batch, outputs)

    async def _outlast_slots(self, batch: list[dict], outputs: list) -> list:
        """Records whose slot says the endpoint is down or throttling are asked again later, not failed."""
        if not isinstance(outputs, list) or len(outputs) != len(batch):
            return outputs  # _call_model says what is wrong with them
        waiting = [i for i, out in enumerate(outputs) if isinstance(out, StageError) and classify(out) == TRANSIENT]
        if not waiting:
            return outputs
        outputs = list(outputs)

        async def again() -> list:
            answers = check_outputs(await self.host.process([batch[i] for i in waiting]), len(waiting), " on a retry")
            still = []
            for i, answer in zip(waiting, answers, strict=True):
                outputs[i] = answer
                if isinstance(answer, StageError) and classify(answer) == TRANSIENT:
                    still.append(i)
            waiting[:] = still
            if still:
                raise outputs[still[0]]
            return outputs

        what = f"{self.name}: {len(waiting)} record(s) of a batch of {len(batch)}"
        return await self.pauses.outlast(outputs[waiting[0]], what, again)

    async def _call_model(
        self, items: Items, ok: list[Record], failed: list[Failure], crashes: Counter[int] | None = None
    ) -> None:
        """`crashes`: for a batch being retried after lost workers, how often each record
        (by id()) was in a lost call; such retries run alone on the host."""
        started = time.perf_counter()
        try:
            async with self._gate.hold(alone=crashes is not None):
                outputs = check_outputs(await self._process([prepared for _, prepared in items]), len(items))
        except WorkerGone:
            raise
        except WorkerLost as lost:
            await self._retry_lost(items, lost, ok, failed, crashes if crashes is not None else Counter())
            return
        except Exception as exc:
            await self._recover(items, exc, ok, failed)
            return
        self.metrics.step_seconds.labels(self.step_label).observe(time.perf_counter() - started)
        self.metrics.batch_size.labels(self.step_label).observe(len(items))
        for (record, _), output in zip(items, outputs, strict=True):
            if isinstance(output, StageError):
                failed.append((record, output.error_type, output.message))
            elif isinstance(output, dict):
                record.merge(output)
                ok.append(record)
            elif isinstance(output, Filtered):
                record.filtered = output
                ok.append(record)
            elif isinstance(output, list) and all(isinstance(child, dict) for child in output):
                record.children = output  # an empty list: no child; the pipeline files it as filtered
                ok.append(record)
            else:
                expected = "expected a dict of new fields, a StageError, a Filtered or a list of children (dicts)"
                failed.append((record, "BadStageOutput", f"stage returned a {type(output).__name__}; {expected}"))

    async def _retry_lost(
        self, items: Items, lost: WorkerLost, ok: list[Record], failed: list[Failure], crashes: Counter[int]
    ) -> None:
        """The worker died under this batch: retry it in halves, alone on the host, until a
        record that takes the worker down with it has done so twice; that one is an error."""
        for record, _ in items:
            crashes[id(record)] += 1
        if len(items) == 1:
            record = items[0][0]
            if crashes[id(record)] >= CRASHES_BEFORE_ERROR:
                why = f"the worker was lost {crashes[id(record)]} times with this record in the call, the last time"
                failed.append((record, lost.kind, f"{lost}; {why} with it alone, so it is set aside"))
                return
            log.warning("%s: worker lost under record %s (%s); retrying it alone", self.name, record.id, lost)
            await self._call_model(items, ok, failed, crashes)
            return
        half = len(items) // 2
        log.warning(
            "%s: worker lost under a batch of %d (%s); retrying it in halves, alone on the worker",
            self.name,
            len(items),
            lost,
        )
        await self._call_model(items[:half], ok, failed, crashes)
        await self._call_model(items[half:], ok, failed, crashes)

    async def _recover(self, items: Items, exc: Exception, ok: list[Record], failed: list[Failure]) -> None:
        if len(items) == 1:
            record = items[0][0]
            kind = type(exc).__name__
            message = str(exc) or repr(exc)
            if is_out_of_memory(exc):
                message = f"out of memory even with a batch of one record: {message}; {self.oom_advice}"
            failed.append((record, kind, message))
            return
        if is_out_of_memory(exc):
            half = len(items) // 2
            self.batch_cap = max(1, half)
            log.warning("%s: out of memory with a batch of %d; halving to %d and retrying", self.name, len(items), half)
            await self._call_model(items[:half], ok, failed)
            await self._call_model(items[half:], ok, failed)
            return
        log.warning(
            "%s: a batch of %d raised %s: %s; retrying record by record to isolate the bad one",
            self.name,
            len(items),
            type(exc).__name__,
            exc,
        )
        for item in items:
            await self._call_model([item], ok, failed)
