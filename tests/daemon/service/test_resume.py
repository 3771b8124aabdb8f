"""Crash safety: kill -9 at random moments, restart, repeat; nothing lost, nothing written twice.
Plus the job ledger: the same content again does no work; a new file under a used name is <stem>-2."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.harness import ECHO, DaemonProcess, daemon_config, read_jsonl, wait_until
from tests.stages_for_tests import ENV


def echo_steps(batch_log: Path | None = None, sleep_s: float = 0.0, **first) -> list[dict]:
    log = {"batch_log": str(batch_log)} if batch_log else {}
    return [
        {**ECHO, "config": {"batch_size": 4, "sleep_s": sleep_s / 2, "queue_size": 16, **log, **first}},
        {**ECHO, "config": {"batch_size": 8, "sleep_s": sleep_s, "output_key": "echo2", "max_wait_ms": 20}},
    ]


def strict_lines(path: Path) -> list[dict]:
    """Every line must be whole JSON ending in a newline: no torn lines."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends with a torn line"
    return [json.loads(line) for line in data.splitlines()]


def make_inputs(folder: Path) -> dict[str, tuple[bytes, set[str], set[int]]]:
    """name -> (content, ids expected in results, rows expected in errors)."""
    inputs = {}
    lines, ok, bad = [], set(), set()
    for n in range(1, 301):
        if n % 50 == 0:
            lines.append(b'{"id": "broken", ')
            bad.add(n)
        elif n % 37 == 0:
            lines.append(json.dumps({"id": f"a{n - 1}"}).encode())  # duplicate of the previous row
            bad.add(n)
        elif n % 41 == 0:
            lines.append(json.dumps({"id": f"a{n}", "fail": True}).encode())
            ok.add(f"a{n}")  # made to fail by fail_ids below
        else:
            lines.append(json.dumps({"id": f"a{n}"}).encode())
            ok.add(f"a{n}")
    inputs["alpha.jsonl"] = (b"\n".join(lines) + b"\n", ok, bad)
    rows = ["id,caption"] + [f'b{n},"cap, {n}\nsecond line"' for n in range(1, 151)]
    inputs["beta.csv"] = ("\r\n".join(rows).encode(), {f"b{n}" for n in range(1, 151)}, set())
    inputs["gamma.json"] = (
        json.dumps([{"id": f"g{n}", "text": "x" * 50} for n in range(1, 151)]).encode(),
        {f"g{n}" for n in range(1, 151)},
        set(),
    )
    return inputs


FAIL_IDS = [f"a{n}" for n in range(41, 301, 41)]


@pytest.mark.timeout(300)
def test_kill_9_at_random_points_then_resume(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    batch_log = tmp_path / "batches.log"
    config = daemon_config(tmp_path, echo_steps(batch_log, sleep_s=0.01, fail_ids=FAIL_IDS), settle_ms=100)
    inputs = make_inputs(tmp_path)
    jobs = [Path(name).stem for name in inputs]
    kills = 0
    progress: list[dict[str, int]] = []  # results per job after each kill, for the failure message
    for round_number in range(6):
        daemon = DaemonProcess(config, env=ENV).start()
        if round_number == 0:
            for name, (content, _, _) in inputs.items():
                daemon.drop_text(name, content)
        time.sleep(rng.uniform(0.2, 1.2))
        daemon.kill()  # SIGKILL
        kills += 1
        progress.append({j: len(read_jsonl(daemon.outbox / f"{j}.jsonl")) for j in jobs})
        if round_number == 2:  # what power loss can leave: a torn last line
            with (daemon.outbox / "alpha.jsonl").open("ab") as handle:
                handle.write(b'{"id": "a299", "echo": "a2')
        if all((daemon.job_state(j) or {}).get("state") == "done" for j in jobs):
            break

    with DaemonProcess(config, env=ENV) as daemon:
        states = {job: daemon.wait_for_job(job, timeout=120) for job in jobs}
        assert daemon.stop() == 0
    context = f"(seed {seed}, {kills} kills, results after each: {progress})"
    processed_at_least_once = set(batch_log.read_text().split())
    for name, (_, ok_ids, bad_rows) in inputs.items():
        job = Path(name).stem
        assert states[job]["state"] == "done", context
        results = strict_lines(daemon.outbox / f"{job}.jsonl")
        errors = strict_lines(daemon.outbox / f"{job}.errors.jsonl")
        result_ids = [r["id"] for r in results]
        assert len(result_ids) == len(set(result_ids)), f"duplicate results {context}"
        failed_ids = {i for i in FAIL_IDS if i in ok_ids}
        assert set(result_ids) == ok_ids - failed_ids, context
        error_keys = [(e["id"], e["row"]) for e in errors]
        assert len(error_keys) == len(set(error_keys)), f"duplicate errors {context}"
        assert {e["row"] for e in errors if e["step"] == "read"} == bad_rows, context
        assert {e["id"] for e in errors if e["step"] != "read"} == failed_ids, context
        assert not set(result_ids) & {e["id"] for e in errors if e["error"] != "DuplicateId"}, context
        assert len(results) + len(errors) == len(ok_ids) + len(bad_rows), context
        assert all(r["echo"] == r["id"] == r["echo2"] for r in results), context
        assert set(result_ids) <= processed_at_least_once, context
    assert not any((daemon.inbox / ".work").iterdir())


@pytest.mark.timeout(120)
def test_same_content_again_does_no_work_and_a_new_file_under_a_used_name_is_numbered(tmp_path):
    batch_log = tmp_path / "batches.log"
    config = daemon_config(tmp_path, echo_steps(batch_log))
    content = "".join(json.dumps({"id": f"r{n}"}) + "\n" for n in range(10))
    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop_text("clips.jsonl", content)
        assert daemon.wait_for_job("clips")["ok"] == 10
        processed = batch_log.read_text()

        daemon.drop_text("clips.jsonl", content)  # the same bytes again
        wait_until(lambda: (daemon.inbox / ".done" / "clips.1.jsonl").exists(), 30, "re-drop moved to .done")
        time.sleep(0.3)
        assert batch_log.read_text() == processed  # the stage saw nothing new
        assert daemon.job_state("clips-2") is None
        assert len(daemon.results("clips")) == 10
        assert "has the same content as job clips" in daemon.log()

        daemon.drop_text("clips.jsonl", content + json.dumps({"id": "r10"}) + "\n")  # different content
        state = daemon.wait_for_job("clips-2")
        assert state["source"] == "clips.jsonl" and state["ok"] == 11
        assert sorted(r["id"] for r in daemon.results("clips-2")) == sorted(f"r{n}" for n in range(11))
        assert len(daemon.results("clips")) == 10

        daemon.drop_text("clips.jsonl", "garbage that is not json\n")  # a third version
        assert daemon.wait_for_job("clips-3")["errors"] == 1

        # clips.errors.jsonl is job clips' errors file: a file of that name must not become job "clips.errors"
        daemon.drop_text("clips.errors.jsonl", json.dumps({"id": "e1"}) + "\n")
        assert daemon.wait_for_job("clips_errors")["ok"] == 1
        assert [r["id"] for r in daemon.results("clips_errors")] == ["e1"]
        assert not daemon.errors("clips")
        assert daemon.stop() == 0


@pytest.mark.timeout(120)
def test_a_job_claimed_before_a_crash_without_its_ledger_entry_resumes(tmp_path):
    """Kill -9 can land between the claim (rename into .work) and the ledger write."""
    config = daemon_config(tmp_path, echo_steps())
    work = tmp_path / "inbox" / ".work"
    work.mkdir(parents=True)
    (work / "orphan.jsonl").write_text("".join(json.dumps({"id": n}) + "\n" for n in range(5)))
    partial = tmp_path / "outbox" / "orphan.jsonl"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"id": "0", "echo": "0", "echo2": "0"}) + "\n" + '{"id": "1", "ec')
    with DaemonProcess(config, env=ENV) as daemon:
        state = daemon.wait_for_job("orphan")
        assert daemon.stop() == 0
    assert state["state"] == "done"
    assert sorted(r["id"] for r in read_jsonl(partial)) == ["0", "1", "2", "3", "4"]
    assert not any(work.iterdir()) and (tmp_path / "inbox" / ".done" / "orphan.jsonl").exists()
