"""The job ledger: nothing per job kept in memory (memory flat across jobs), lookups from disk,
and start-up settling a job that a crash left `claimed` after its file moved to `.done/`."""

from __future__ import annotations

import gc
import json
import os
import signal
import time
import tracemalloc

import pytest

from daemon.config import parse_config
from daemon.io.jobs import DONE, JobEntry, JobLedger, fingerprint, unique_destination
from daemon.io.outbox import OutboxLayout
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from tests.harness import ECHO, DaemonProcess, daemon_config
from tests.stages_for_tests import ENV

pytestmark = pytest.mark.timeout(300)

OURS = ("/daemon/", "/stages/")  # allocations made by reelflow's own code


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    return sum(s.size for s in snapshot.statistics("filename") if any(p in s.traceback[0].filename for p in OURS))


async def test_memory_does_not_grow_with_the_number_of_finished_jobs(tmp_path):
    """Jobs as serve runs them (ledger entry claimed -> engine -> ledger entry done): what
    reelflow's code holds after 300 more jobs is what it held after the first 50."""
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"id": "a"}) + "\n")
    outbox = tmp_path / "out"
    ledger = JobLedger(outbox / ".reelflow")
    engine = Engine(
        parse_config("steps:\n  - {type: Test, name: Spin, config: {work: 0, max_wait_ms: 0}}\n"),
        OutboxLayout.daemon(outbox),
        Metrics(),
    )
    await engine.start()

    async def jobs(first: int, count: int) -> None:
        for n in range(first, first + count):
            name = ledger.new_name(f"m{n}", set())
            entry = JobEntry(name, "m.jsonl", ".jsonl", f"1:{n:064x}", "claimed", time.time())
            ledger.save(entry)
            run = await engine.run_job(JobInput(name, meta, "jsonl", "m.jsonl", tmp_path))
            entry.state, entry.ok = "done", run.ok
            ledger.save(entry)

    tracemalloc.start()
    try:
        await jobs(0, 50)
        gc.collect()
        before = _ours(tracemalloc.take_snapshot())
        await jobs(50, 300)
        gc.collect()
        after = _ours(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
        await engine.stop()
    assert ledger.known(f"1:{349:064x}").name == "m349"  # all 350 are known, from disk
    assert not engine.pipeline.jobs and not engine._feeds
    # The bug was ~1.1 kB per job (330 kB here); allow noise, not growth.
    assert after - before < 32 * 1024, f"reelflow's allocations grew {after - before} bytes over 300 jobs"


def test_lookups_survive_a_restart_and_an_old_ledger_gets_its_index(tmp_path):
    state = tmp_path / "out" / ".reelflow"
    ledger = JobLedger(state)
    ledger.save(JobEntry("a", "a.csv", ".csv", "3:abc", "done", 1.0))
    assert JobLedger(state).known("3:abc").name == "a" and JobLedger(state).get("a").state == "done"
    assert JobLedger(state).new_name("a", set()) == "a-2" and JobLedger(state).new_name("b", {"b"}) == "b-2"
    for index in (state / "jobs" / ".prints").iterdir():  # a ledger written before the index existed
        index.unlink()
    (state / "jobs" / ".prints").rmdir()
    assert JobLedger(state).known("3:abc").name == "a"
    assert JobLedger(state).known("4:abc") is None


def test_a_claimed_job_whose_file_is_in_done_becomes_done_on_start(tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "out"
    source = tmp_path / "m.jsonl"
    source.write_text('{"id": "a"}\n{"id": "b"}\n')
    ledger = JobLedger(outbox / ".reelflow", inbox)
    entry = JobEntry("m", "m.jsonl", ".jsonl", fingerprint(source), "claimed", time.time())
    ledger.save(entry)
    (outbox / "m.jsonl").write_text('{"id": "a"}\n')
    (outbox / "m.errors.jsonl").write_text('{"id": "b"}\n')
    (inbox / DONE).mkdir(parents=True)
    (inbox / DONE / "m.jsonl").write_text("other content, same name\n")  # an earlier job's file
    os.replace(source, unique_destination(inbox / DONE, "m.jsonl"))  # the kill came right after this move
    settled = JobLedger(outbox / ".reelflow", inbox).get("m")
    assert (settled.state, settled.ok, settled.errors) == ("done", 1, 1)


def test_a_claimed_job_still_in_work_stays_claimed(tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "out"
    (inbox / ".work").mkdir(parents=True)
    (inbox / ".work" / "m.jsonl").write_text('{"id": "a"}\n')
    JobLedger(outbox / ".reelflow").save(
        JobEntry("m", "m.jsonl", ".jsonl", fingerprint(inbox / ".work" / "m.jsonl"), "claimed", 1.0)
    )
    assert JobLedger(outbox / ".reelflow", inbox).get("m").state == "claimed"


def test_a_double_sigterm_leaves_no_daemon_json(tmp_path):
    config = daemon_config(tmp_path, [{**ECHO, "config": {"sleep_s": 5}}])
    daemon = DaemonProcess(config, env=ENV).start()
    state_file = daemon.outbox / ".reelflow" / "daemon.json"
    assert state_file.exists()
    daemon.drop_text("slow.jsonl", json.dumps({"id": "a"}) + "\n")
    deadline = time.monotonic() + 60
    while daemon.job_state("slow") is None and time.monotonic() < deadline:  # in flight: the drain waits on it
        time.sleep(0.05)
    daemon.process.send_signal(signal.SIGTERM)
    while "stopping intake and draining" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.stop(signal.SIGTERM) == 1
    assert "second SIGTERM: exiting now" in daemon.log()
    assert not state_file.exists()
