"""The Worker's handling of lost workers (WorkerLost), with a fake remote host: no Ray needed."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from daemon.hosts.base import WorkerGone, WorkerLost
from daemon.io.records import Record
from daemon.metrics import Metrics
from daemon.runtime.batching import BatchLimits
from daemon.runtime.worker import Worker


class FakeRemoteHost:
    """Loses the worker when a batch holds a `crash` record, raises for a `raise` record;
    tracks calls in flight and whether a retried call ever ran beside another one."""

    def __init__(self, call_s: float = 0.01):
        self.call_s = call_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[list[str]] = []
        self.crashes = 0
        self.gone_after: int | None = None

    async def load(self) -> None: ...

    async def prepare(self, fields):
        return fields

    async def process(self, batch):
        ids = [str(r["id"]) for r in batch]
        self.calls.append(ids)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.call_s)
            if any(i.startswith("crash") for i in ids):
                self.crashes += 1
                if self.gone_after is not None and self.crashes > self.gone_after:
                    raise WorkerGone("no worker left")
                raise WorkerLost("actor died", kind="WorkerCrashed")
            if any(i.startswith("raise") for i in ids):
                raise RuntimeError("stage bug")
            return [{"out": i} for i in ids]
        finally:
            self.in_flight -= 1

    async def close(self) -> None: ...

    def resources(self):
        from stages.base import Resources

        return Resources()

    def take_usage(self) -> Counter:
        return Counter()

    def reconfigure(self, config) -> None: ...


async def run_worker(host: FakeRemoteHost, ids: list[str], batch_size: int = 4, concurrency: int = 2):
    queue: asyncio.Queue = asyncio.Queue()
    for n, record_id in enumerate(ids):
        queue.put_nowait(Record(record_id, "job", n + 1, {}, {"id": record_id}, record_id))
    ok: list[str] = []
    failed: list[tuple[str, str, str]] = []
    done = asyncio.Event()

    async def advance(_step, good, bad):
        ok.extend(r.id for r in good)
        failed.extend((r.id, kind, message) for r, kind, message in bad)
        if len(ok) + len(failed) == len(ids):
            done.set()

    limits = BatchLimits(batch_size=batch_size, max_wait_s=0.01, concurrency=concurrency)
    worker = Worker(0, "step_0_T_T", host, queue, advance, Metrics(), limits, "w0")
    task = asyncio.create_task(worker.run())
    finished = asyncio.create_task(done.wait())
    try:
        await asyncio.wait({task, finished}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the worker stopped: raise what stopped it
        assert finished.done(), "records still unfinished after 10 s"
    finally:
        for pending in (task, finished):
            pending.cancel()
        await asyncio.gather(task, finished, return_exceptions=True)
    return ok, failed


async def test_a_record_that_crashes_workers_is_an_error_after_two_crashes_the_rest_succeed():
    ids = [f"r{i}" for i in range(15)] + ["crash-1"]
    host = FakeRemoteHost()
    ok, failed = await run_worker(host, ids)
    assert sorted(ok) == sorted(i for i in ids if i != "crash-1")
    assert [(i, kind) for i, kind, _ in failed] == [("crash-1", "WorkerCrashed")]
    assert "2 times" in failed[0][2] or "times" in failed[0][2]
    # it crashed at least twice, the last time alone
    assert host.crashes >= 2 and host.calls[-1] == ["crash-1"]
    assert sum(1 for call in host.calls if call == ["crash-1"]) >= 1


async def test_retries_after_a_lost_worker_run_alone_on_the_host():
    """Two calls in flight normally; a retry of a lost batch never shares the host, so an
    innocent record is never blamed for a crash it sat beside."""
    ids = [f"r{i}" for i in range(30)] + ["crash-a", "crash-b"]
    host = FakeRemoteHost(call_s=0.02)
    ok, failed = await run_worker(host, ids, batch_size=2)
    assert host.max_in_flight == 2
    assert sorted(i for i, _, _ in failed) == ["crash-a", "crash-b"]
    assert len(ok) == 30


async def test_a_stage_error_is_isolated_record_by_record_not_a_crash():
    ids = [f"r{i}" for i in range(7)] + ["raise-1"]
    host = FakeRemoteHost()
    ok, failed = await run_worker(host, ids)
    assert [(i, kind) for i, kind, _ in failed] == [("raise-1", "RuntimeError")]
    assert len(ok) == 7 and host.crashes == 0


async def test_worker_gone_stops_the_worker():
    host = FakeRemoteHost()
    host.gone_after = 1
    with pytest.raises(BaseExceptionGroup) as raised:
        await run_worker(host, ["r1", "crash-1", "r2"])
    assert raised.group_contains(WorkerGone)
