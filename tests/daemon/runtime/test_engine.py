"""The engine in process: a shutdown that begins while a job is still opening stops it from reading."""

from __future__ import annotations

import asyncio
import json

import pytest

from daemon.config import parse_config
from daemon.io.outbox import OutboxLayout
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from tests.harness import read_jsonl

pytestmark = pytest.mark.timeout(60)

CONFIG = "steps:\n  - {type: Test, name: Echo}\n"


async def test_stop_intake_before_the_job_starts_reading(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps({"id": n}) + "\n" for n in range(100)))
    engine = Engine(parse_config(CONFIG), OutboxLayout.daemon(tmp_path / "out"), Metrics())
    await engine.start()
    try:
        job = asyncio.create_task(engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path)))
        await asyncio.sleep(0)  # the job is opening its files
        engine.stop_intake()
        run = await asyncio.wait_for(job, 10)
    finally:
        await engine.stop()
    assert run.interrupted and run.ok == 0
    assert not read_jsonl(tmp_path / "out" / "m.jsonl")


async def test_a_job_runs_to_the_end(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps({"id": n}) + "\n" for n in range(100)) + "not json\n")
    engine = Engine(parse_config(CONFIG), OutboxLayout.daemon(tmp_path / "out"), Metrics())
    await engine.start()
    try:
        run = await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
    finally:
        await engine.stop()
    assert not run.interrupted and (run.ok, run.errors) == (100, 1)
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "m.jsonl")] == [str(n) for n in range(100)]
