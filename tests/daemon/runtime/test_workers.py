"""Workers: micro-batching by size and by wait, failure isolation, out-of-memory halving, usage metrics."""

from __future__ import annotations

import asyncio
import time

import pytest

from daemon.config import step_config_model
from daemon.hosts.local import LocalHost
from daemon.io.records import Record
from daemon.metrics import Metrics
from daemon.runtime.batching import BatchLimits
from daemon.runtime.worker import Worker, is_out_of_memory
from tests.harness import metric_value
from tests.stages_for_tests import Echo, OutOfMemoryError

LABEL = "step_0_Test_Echo"

pytestmark = pytest.mark.timeout(60)


def record(n: int) -> Record:
    rid = str(n)
    return Record(id=rid, job="j", row_number=n, row={"id": rid}, fields={"id": rid, "_job": "j"}, key=rid)


class Harness:
    """One worker over one Echo stage, with the routing callback recording where records end."""

    def __init__(self, batch_size: int = 4, max_wait_ms: int = 50, **settings):
        self.config = step_config_model(Echo).model_validate(
            {"batch_size": batch_size, "max_wait_ms": max_wait_ms, **settings}
        )
        self.metrics = Metrics()
        self.host = LocalHost(Echo, self.config, "cpu", self.config.prep_workers, LABEL)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.config.queue_size)
        self.ok: list[Record] = []
        self.failed: list[tuple[Record, str, str]] = []
        self.arrived = asyncio.Condition()
        self.worker = Worker(
            0,
            LABEL,
            self.host,
            self.queue,
            self.advance,
            self.metrics,
            BatchLimits(batch_size, max_wait_ms / 1000, 1),
            "w0",
        )

    @property
    def stage(self) -> Echo:
        return self.host.stage

    async def advance(self, step: int, ok: list[Record], failed: list) -> None:
        assert step == 0
        async with self.arrived:
            self.ok += ok
            self.failed += failed
            self.arrived.notify_all()

    async def __aenter__(self) -> Harness:
        await self.host.load()
        self.task = asyncio.create_task(self.worker.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.host.close()

    async def wait_for(self, count: int, timeout: float = 20) -> None:
        async def settled():
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.ok) + len(self.failed) >= count)

        await asyncio.wait_for(settled(), timeout)

    async def feed(self, numbers) -> None:
        for n in numbers:
            await self.queue.put(record(n))

    def sizes(self) -> list[int]:
        return [len(b) for b in self.stage.batches]

    def failures(self) -> dict[str, tuple[str, str]]:
        return {r.id: (kind, message) for r, kind, message in self.failed}


async def test_batches_fill_up_to_batch_size():
    async with Harness(batch_size=4, max_wait_ms=200) as h:
        await h.feed(range(1, 11))
        await h.wait_for(10)
    assert h.sizes() == [4, 4, 2]
    assert sorted(int(r.id) for r in h.ok) == list(range(1, 11))
    assert all(r.outputs == {"echo": r.id} and r.fields["echo"] == r.id for r in h.ok)
    text = h.metrics.render().decode()
    assert metric_value(text, "reelflow_batch_size_count", step=LABEL) == 3
    assert metric_value(text, "reelflow_batch_size_sum", step=LABEL) == 10
    assert metric_value(text, "reelflow_inflight", step=LABEL) == 0


async def test_a_partial_batch_runs_after_max_wait():
    async with Harness(batch_size=8, max_wait_ms=300) as h:
        started = time.monotonic()
        await h.feed([1])
        await asyncio.sleep(0.05)
        await h.feed([2, 3])
        await h.wait_for(3)
        elapsed = time.monotonic() - started
        assert h.sizes() == [3]  # waited for more, then ran what it had
        assert 0.25 <= elapsed < 5
        await h.feed([4])  # a lone record later is not stuck either
        await h.wait_for(4)
    assert h.sizes() == [3, 1]


async def test_zero_wait_runs_what_is_there():
    async with Harness(batch_size=8, max_wait_ms=0, prepare_sleep_s=0.05) as h:
        await h.feed([1])
        await h.wait_for(1)
    assert h.sizes() == [1]


async def test_a_raising_batch_is_retried_record_by_record():
    async with Harness(batch_size=4, max_wait_ms=200, raise_ids=["3"]) as h:
        await h.feed(range(1, 9))
        await h.wait_for(8)
    assert sorted(r.id for r in h.ok) == ["1", "2", "4", "5", "6", "7", "8"]
    kind, message = h.failures()["3"]
    assert kind == "RuntimeError" and "poisoned record" in message
    assert h.stage.batches == [["1", "2", "3", "4"], ["1"], ["2"], ["3"], ["4"], ["5", "6", "7", "8"]]
    text = h.metrics.render().decode()
    assert metric_value(text, "reelflow_inflight", step=LABEL) == 0


async def test_out_of_memory_halves_the_batch():
    async with Harness(batch_size=8, max_wait_ms=300, oom_above=2) as h:
        await h.feed(range(1, 9))
        await h.wait_for(8)
        assert len(h.ok) == 8 and not h.failed
        assert h.sizes() == [8, 4, 2, 2, 4, 2, 2]
        assert h.worker.batch_cap == 2  # later batches stay at the size that fit
        await h.feed(range(9, 14))
        await h.wait_for(13)
    assert h.sizes()[7:] == [2, 2, 1]
    assert len(h.ok) == 13


async def test_out_of_memory_with_one_record_is_that_record_s_error():
    async with Harness(batch_size=2, max_wait_ms=200, oom_above=0) as h:
        await h.feed([1, 2])
        await h.wait_for(2)
    assert not h.ok
    for kind, message in h.failures().values():
        assert kind == "OutOfMemoryError"
        assert message.startswith("out of memory even with a batch of one record")


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("index out of range"))
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))


async def test_prepare_failures_are_per_record():
    async with Harness(batch_size=4, max_wait_ms=200, prepare_fail_ids=["2", "4"]) as h:
        await h.feed(range(1, 6))
        await h.wait_for(5)
    assert sorted(r.id for r in h.ok) == ["1", "3", "5"]
    assert h.failures() == {
        "2": ("ValueError", "prepare refused record 2"),
        "4": ("ValueError", "prepare refused record 4"),
    }
    assert ["2"] not in h.stage.batches and all("2" not in b and "4" not in b for b in h.stage.batches)


async def test_a_transient_prepare_failure_is_outlasted_beside_a_failing_one(monkeypatch):
    """In one batch: record 2's prepare hits a full disk once (outlasted, then it runs), record 4's
    prepare refuses it (its own error); the others run in the same model call."""
    import errno

    async with Harness(batch_size=4, max_wait_ms=200, prepare_fail_ids=["4"]) as h:
        prepare, full = h.stage.prepare, []

        def disk_full_once(fields):
            if fields["id"] == "2" and not full:
                full.append(1)
                raise OSError(errno.ENOSPC, "No space left on device")
            return prepare(fields)

        monkeypatch.setattr(h.stage, "prepare", disk_full_once)
        await h.feed(range(1, 5))
        await h.wait_for(4)
    assert full == [1]
    assert sorted(r.id for r in h.ok) == ["1", "2", "3"]
    assert h.failures() == {"4": ("ValueError", "prepare refused record 4")}
    assert h.stage.batches == [["1", "2", "3"]]


async def test_stage_errors_in_slots():
    async with Harness(batch_size=4, max_wait_ms=200, fail_ids=["1", "3"]) as h:
        await h.feed(range(1, 5))
        await h.wait_for(4)
    assert sorted(r.id for r in h.ok) == ["2", "4"]
    assert h.failures()["1"] == ("Refused", "record 1 is refused by this stage")
    assert h.sizes() == [4]  # a StageError in a slot is not a raise: no retry
    text = h.metrics.render().decode()
    assert metric_value(text, "reelflow_batch_size_count", step=LABEL) == 1


async def test_wrong_length_output_becomes_errors():
    async with Harness(batch_size=3, max_wait_ms=200, wrong_length=True) as h:
        await h.feed(range(1, 4))
        await h.wait_for(3)
    assert not h.ok
    for kind, message in h.failures().values():
        assert kind == "RuntimeError"
        assert "stage returned 2 results for 1 records; expected one per record" in message


async def test_non_dict_output_is_an_error(monkeypatch):
    async with Harness(batch_size=2, max_wait_ms=200) as h:
        monkeypatch.setattr(h.stage, "process", lambda batch: ["not a dict", {"echo": "ok"}])
        await h.feed([1, 2])
        await h.wait_for(2)
    assert [r.id for r in h.ok] == ["2"]
    assert h.failures()["1"][0] == "BadStageOutput"


async def test_usage_counters_reach_metrics():
    usage = {"generated_frames": 3, "tokens_out": 5, "requests": 1, "not_a_metric": 9}
    async with Harness(batch_size=2, max_wait_ms=100, usage_per_record=usage) as h:
        await h.feed(range(1, 6))
        await h.wait_for(5)
    text = h.metrics.render().decode()
    assert metric_value(text, "reelflow_generated_frames_total", step=LABEL) == 15
    assert metric_value(text, "reelflow_tokens_out_total", step=LABEL) == 25
    assert metric_value(text, "reelflow_api_requests_total", step=LABEL) == 5
    assert not h.stage.usage  # taken after each batch


async def test_the_loop_is_not_blocked_by_a_slow_stage():
    async with Harness(batch_size=1, max_wait_ms=0, sleep_s=0.5) as h:
        await h.feed([1])
        ticks = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 10  # the loop kept running while process slept in its thread
        await h.wait_for(1)


async def test_the_model_does_not_wait_for_the_outbox_but_writing_stays_bounded_and_ordered():
    """While one batch is routed and written (slow disk), the model runs the next one; batches are
    written in the order they came; no more than one batch beyond the model's waits to be written."""
    async with Harness(batch_size=1, max_wait_ms=0) as h:
        events: list[tuple[str, str]] = []
        original_advance, original_process = h.advance, h.stage.process

        def process(batch):
            events.append(("process", batch[0]["id"]))
            return original_process(batch)

        async def slow_advance(step, ok, failed):
            events.append(("write", ok[0].id))
            await asyncio.sleep(0.2)
            events.append(("written", ok[0].id))
            await original_advance(step, ok, failed)

        h.stage.process = process
        h.worker.advance = slow_advance
        await h.feed(range(1, 7))
        await h.wait_for(6)
    assert [r.id for r in h.ok] == [str(n) for n in range(1, 7)]  # the input's order
    assert events.index(("process", "2")) < events.index(("written", "1"))  # no waiting for the disk
    for n in range(1, 6):  # bounded: batch n+2 reaches the model only once batch n is written
        if ("process", str(n + 2)) in events:
            assert events.index(("written", str(n))) < events.index(("process", str(n + 2)))


@pytest.mark.parametrize("turns", range(5))
async def test_a_cancel_landing_as_a_record_arrives_stops_the_worker(turns):
    """Python 3.11's wait_for returns the item when the cancel lands just as it arrives: the
    worker then kept running and stopping the pipeline hung."""
    h = Harness(batch_size=4, max_wait_ms=5000)
    await h.host.load()
    task = asyncio.create_task(h.worker.run())
    await h.feed([1])
    await asyncio.sleep(0.2)  # the batcher holds record 1 and waits for more
    await h.feed([2])
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3)
    await h.host.close()
    assert done, f"the worker ignored its cancellation (record arrived {turns} loop turns before)"
