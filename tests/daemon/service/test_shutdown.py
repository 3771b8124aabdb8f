"""Shutdown: SIGTERM drains what is in flight and exits 0; unfinished jobs stay claimed and finish
on the next start; a drain that takes too long is cut at drain_timeout_s; a second signal exits at once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.harness import ECHO, DaemonProcess, daemon_config, read_jsonl, wait_until
from tests.stages_for_tests import ENV

ROWS = "".join(json.dumps({"id": f"r{n}"}) + "\n" for n in range(60))
ALL = {f"r{n}" for n in range(60)}


def slow_config(folder: Path, **daemon) -> Path:
    steps = [
        {
            **ECHO,
            "config": {
                "sleep_s": "${RF_SLEEP}",
                "batch_size": 2,
                "queue_size": 4,
                "batch_log": str(folder / "batches.log"),
            },
        }
    ]
    return daemon_config(folder, steps, **daemon)


def logged_ids(folder: Path) -> set[str]:
    path = folder / "batches.log"
    return set(path.read_text().split()) if path.exists() else set()


def finish_and_check(config: Path) -> None:
    """Restart without the sleep: the claimed job finishes, every record exactly once."""
    with DaemonProcess(config, env={**ENV, "RF_SLEEP": "0"}) as daemon:
        state = daemon.wait_for_job("rows")
        assert daemon.stop() == 0
    assert state["state"] == "done"
    ids = [r["id"] for r in daemon.results("rows")]
    assert sorted(ids) == sorted(ALL) and not daemon.errors("rows")


@pytest.mark.timeout(120)
def test_sigterm_drains_in_flight_records_and_the_rest_resumes(tmp_path):
    config = slow_config(tmp_path, drain_timeout_s=60)
    with DaemonProcess(config, env={**ENV, "RF_SLEEP": "0.05"}) as daemon:
        daemon.drop_text("rows.jsonl", ROWS)
        wait_until(lambda: len(daemon.results("rows")) >= 4, 30, "first results", daemon.log)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0
        assert time.monotonic() - started < 20
        results = [r["id"] for r in daemon.results("rows")]
        assert len(results) == len(set(results)) < len(ALL)
        assert logged_ids(tmp_path) <= set(results)  # every batch the stage started was written
        assert (daemon.inbox / ".work" / "rows.jsonl").exists()
        assert daemon.job_state("rows")["state"] == "claimed"
        assert "stopping intake and draining" in daemon.log()
        assert not (daemon.outbox / ".reelflow" / "daemon.json").exists()
    finish_and_check(config)


@pytest.mark.timeout(120)
def test_drain_timeout_cuts_a_long_batch(tmp_path):
    config = slow_config(tmp_path, drain_timeout_s=0.5)
    with DaemonProcess(config, env={**ENV, "RF_SLEEP": "10"}) as daemon:
        daemon.drop_text("rows.jsonl", ROWS)
        wait_until(lambda: logged_ids(tmp_path), 30, "a batch in the stage", daemon.log)
        started = time.monotonic()
        assert daemon.stop(signal.SIGINT, timeout=60) == 0
        assert time.monotonic() - started < 6, "drain_timeout_s was not honoured"
        assert "drain timeout" in daemon.log()
        assert not daemon.results("rows")
        assert daemon.job_state("rows")["state"] == "claimed"
    finish_and_check(config)


@pytest.mark.timeout(120)
def test_a_second_signal_exits_at_once(tmp_path):
    config = slow_config(tmp_path, drain_timeout_s=60)
    with DaemonProcess(config, env={**ENV, "RF_SLEEP": "10"}) as daemon:
        daemon.drop_text("rows.jsonl", ROWS)
        wait_until(lambda: logged_ids(tmp_path), 30, "a batch in the stage", daemon.log)
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping intake and draining" in daemon.log(), 10, "the first signal handled")
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=30) == 1
        assert time.monotonic() - started < 3
        assert "exiting now without draining" in daemon.log()
    assert not read_jsonl(daemon.outbox / "rows.jsonl")
    finish_and_check(config)


@pytest.mark.timeout(120)
def test_sigterm_while_reading_a_file_of_bad_rows(tmp_path):
    """Rows rejected at reading are admitted and written together; a shutdown landing in the middle
    must not leave them counted as in flight (the drain would then wait out drain_timeout_s)."""
    config = daemon_config(tmp_path, [{**ECHO, "config": {}}], drain_timeout_s=60)
    rows = 200_000
    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop_text("bad.jsonl", '{"id": broken\n' * rows)
        wait_until(lambda: (daemon.outbox / "bad.errors.jsonl").exists(), 30, "first errors", daemon.log)
        started = time.monotonic()
        assert daemon.stop(timeout=60) == 0
        assert time.monotonic() - started < 20, "the drain waited for rejected rows"
        written = len(daemon.errors("bad"))
    with DaemonProcess(config, env=ENV) as daemon:
        assert daemon.wait_for_job("bad", timeout=90)["errors"] == rows
        assert daemon.stop() == 0
    errors = daemon.errors("bad")
    assert sorted(e["row"] for e in errors) == list(range(1, rows + 1))
    assert all(e["error"] == "BadJson" and e["message"].startswith("bad.jsonl: line ") for e in errors[:10])
    assert written > 0


@pytest.mark.timeout(120)
def test_a_long_drain_logs_its_progress_and_stopped_says_the_job_resumes(tmp_path):
    config = slow_config(tmp_path, drain_timeout_s=60)
    with DaemonProcess(config, env={**ENV, "RF_SLEEP": "2.5"}) as daemon:
        daemon.drop_text("rows.jsonl", ROWS)
        wait_until(lambda: len(daemon.results("rows")) >= 2, 30, "first results", daemon.log)
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0
        log = daemon.log()
    progress = [line for line in log.splitlines() if "draining: 1 job(s)" in line]
    assert progress and "still in flight" in progress[0] and "s left" in progress[0], log[-2000:]
    (stopped,) = [line for line in log.splitlines() if "stopped" in line and "INFO" in line]
    assert "rows stay claimed" in stopped and "resume at the next start" in stopped
    finish_and_check(config)
