"""The issue's end-to-end check: a real `reelflow serve` fed good and broken meta files and videos.

Every input record must end in exactly one of results or errors (ids and counts checked
exactly), each error says which file/row and what was expected, unreadable and
unsupported files go to inbox/.failed/, ignored names are never claimed, a file still being
written is not claimed before it settles, the daemon keeps serving afterwards, and /metrics
counts the records per step and status.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import DaemonProcess, daemon_config, metric_value, wait_until
from tests.stages_for_tests import ENV

PROBE = "step_0_VideoProcessor_VideoProbe"
FRAMES = "step_1_VideoProcessor_FrameSampler"
READ = "read"


def jsonl_crlf(rows: list) -> bytes:
    return b"\xef\xbb\xbf" + b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\r\n" for r in rows)


@pytest.mark.timeout(240)
def test_mixed_inbox_every_record_accounted_for(tmp_path, videos):
    media = tmp_path / "media"
    shutil.copytree(videos["bunny"].parent, media)
    (tmp_path / "x.mp4").write_bytes(b"outside the allowed folder")
    config = daemon_config(
        tmp_path,
        [
            {"type": "VideoProcessor", "name": "VideoProbe", "config": {"batch_size": 4, "devices": ["cpu"]}},
            {
                "type": "VideoProcessor",
                "name": "FrameSampler",
                "config": {"num_frames": 2, "max_side": 64, "batch_size": 4},
            },
        ],
        meta_folder=media,
        settle_ms=800,
    )
    good_videos = ["bunny", "bikes", "h264", "sparse_gop", "vp9_webm", "mpeg4_avi", "mkv"]
    good_videos += ["rotated"] if "rotated" in videos else []
    broken_videos = ["truncated", "empty", "garbage"] + (["audio_only"] if "audio_only" in videos else [])

    # expected[job] = (result ids, {row: (error type or None for "any step error", step or None)})
    expected: dict[str, tuple[set[str], dict[int, tuple[str | None, str | None]]]] = {}

    rows: list = [{"id": k, "video": videos[k].name} for k in good_videos + broken_videos]
    errors = {len(good_videos) + i + 1: (None, None) for i in range(len(broken_videos))}
    bad_rows = [
        ({"id": "missing", "video": "nope.mp4"}, "FileNotFound"),
        ({"id": "escape", "video": "../x.mp4"}, "PathOutsideRoot"),
        ({"id": "abs", "video": str(tmp_path / "x.mp4")}, "PathOutsideRoot"),
        ({"id": "bikes", "video": "bikes.mp4"}, "DuplicateId"),
        (b'{"id": "broken", "video": ', "BadJson"),
        (b"[1, 2]", "NotAnObject"),
        ({"id": "novideo", "caption": "x"}, "MissingField"),
        ({"id": "wrongtype", "video": 5}, "WrongType"),
    ]
    for row, kind in bad_rows:
        rows.append(row)
        errors[len(rows)] = (kind, READ)
    rows.append(b"")  # a blank line is not a record
    rows.append({"video": videos["mkv"].name})  # no id: its line number
    expected["good"] = ({*good_videos, str(len(rows))}, errors)

    csv_text = (
        "id,video,caption\r\n"
        f'c1,{videos["h264"].name},"two\r\nlines, and a comma"\r\n'
        f"c2,{videos['vp9_webm'].name},plain\r\n"
        f"c3,{videos['mkv'].name}\r\n"
        "c4,nope.mp4,x\r\n"
    )
    expected["quoted"] = ({"c1", "c2"}, {3: ("BadRow", READ), 4: ("FileNotFound", READ)})
    tsv_text = f"id\tvideo\nt1\t{videos['mpeg4_avi'].name}\nt2\t../{videos['h264'].name}\n"
    expected["clips"] = ({"t1"}, {2: ("PathOutsideRoot", READ)})
    array = (
        f'[{{"id": "j1", "video": "{videos["h264"].name}", "note": "a ] tricky [ string }}"}},\n 42,\n'
        f' {{"id": "j3", "video": "{videos["mkv"].name}"}}]'
    )
    expected["arr"] = ({"j1", "j3"}, {2: ("NotAnObject", READ)})
    expected["trunc"] = ({"k1"}, {2: ("BadJson", READ)})
    expected["trunc2"] = ({"m1"}, {2: ("UnreadableFile", READ)})
    expected["empty"] = (set(), {})
    expected["dropped"] = ({"1"}, {})
    expected["broken_drop"] = (set(), {1: (None, PROBE)})

    with DaemonProcess(config, env=ENV) as daemon:
        state = daemon.state  # <outbox>/.reelflow/daemon.json, written once ready
        assert state["pid"] == daemon.process.pid and state["config"] == str(config.resolve())
        assert state["metrics_url"].startswith("http://127.0.0.1:") and not state["metrics_url"].endswith(":0/metrics")
        assert state["started_at"] > 0
        log = daemon.log()  # the effective limits, logged at start
        assert f"{PROBE}: 1 worker(s) on ['cpu']; batch_size=4 max_wait_ms=50 concurrency=1 queue_size=64" in log
        assert f"{FRAMES}: 1 worker(s) on ['cpu']; batch_size=4" in log
        assert daemon.http("/healthz") == (200, "ok\n")
        assert daemon.http("/readyz") == (200, "ready\n")
        assert daemon.http("/nope")[0] == 404
        inbox = daemon.inbox
        ignored = [".hidden.jsonl", "x.tmp", "x.part", "x.partial", "x.jsonl~", ".hidden.mp4"]
        for name in ignored:
            (inbox / name).write_text('{"id": "never", "video": "bikes.mp4"}\n')

        # A file written in place, slowly: it must not be claimed before it stops changing.
        slow_rows = 15
        last_write = {}

        def write_slowly():
            with (inbox / "slow.jsonl").open("w") as handle:
                for n in range(slow_rows):
                    handle.write(json.dumps({"id": f"s{n}", "video": videos["h264"].name}) + "\n")
                    handle.flush()
                    time.sleep(0.06)
            last_write["at"] = time.time()

        writer = threading.Thread(target=write_slowly)
        writer.start()
        expected["slow"] = ({f"s{n}" for n in range(slow_rows)}, {})

        daemon.drop_text("good.jsonl", jsonl_crlf(rows))
        daemon.drop_text("quoted.csv", csv_text.encode())
        daemon.drop_text("clips.tsv", tsv_text)
        daemon.drop_text("arr.json", array)
        daemon.drop_text(
            "trunc.json", f'[{{"id": "k1", "video": "{videos["h264"].name}"}}, {{"id": "k2", "video": "bars.m'
        )
        daemon.drop_text("trunc2.json", f'[{{"id": "m1", "video": "{videos["h264"].name}"}}\n')
        daemon.drop_text("empty.jsonl", "")
        daemon.drop_text("notarray.json", '{"id": 1, "video": "bikes.mp4"}')
        daemon.drop_text("notes.txt", "not a meta file")
        daemon.drop(videos["vp9_webm"], "dropped.webm")
        daemon.drop(videos["garbage"], "broken_drop.mp4")
        parquet = _parquet(tmp_path, videos)
        daemon.drop(parquet, "table.parquet")
        expected["table"] = ({"1", "2"}, {3: (None, PROBE)})

        writer.join()
        states = {job: daemon.wait_for_job(job, timeout=120) for job in [*expected, "notarray"]}
        wait_until(lambda: (inbox / ".failed" / "notes.txt").exists(), 30, "notes.txt in .failed", daemon.log)

        # --- every record in exactly one of results or errors -------------------------------
        for job, (ok_ids, error_rows) in expected.items():
            assert states[job]["state"] == "done", (job, states[job])
            results = daemon.results(job)
            result_ids = [r["id"] for r in results]
            assert sorted(result_ids) == sorted(ok_ids), (job, result_ids, daemon.errors(job))
            errors_here = daemon.errors(job)
            assert sorted(e["row"] for e in errors_here) == sorted(error_rows), (job, errors_here)
            for error in errors_here:
                kind, step = error_rows[error["row"]]
                if kind:
                    assert error["error"] == kind, error
                assert error["step"] == step if step else error["step"] in (PROBE, FRAMES), error
                assert error["job"] == job and error["message"]
                if error["step"] == READ:  # names the file (as the user named it) and the row
                    assert error["message"].startswith(states[job]["source"] + ": "), error
                    assert "row" in error["message"] or "line" in error["message"] or "element" in error["message"]
            assert not set(result_ids) & {e["id"] for e in errors_here if e["error"] != "DuplicateId"}
            assert states[job]["ok"] == len(ok_ids) and states[job]["errors"] == len(error_rows)
            for result in results:
                assert result["probe"]["num_frames"] > 0 and len(result["frames"]) == 2
                for frame in result["frames"]:
                    assert (daemon.outbox / frame).is_file() and frame.startswith(f"media/{job}/")
        assert states["slow"]["claimed_at"] >= last_write["at"] - 0.01, "slow.jsonl was claimed while being written"
        assert next(r for r in daemon.results("quoted") if r["id"] == "c1")["caption"] == "two\r\nlines, and a comma"
        assert daemon.results("dropped")[0]["video"] == "dropped.webm"
        by_id = {r["id"]: r for r in daemon.results("good")}
        if "rotated" in by_id:
            assert by_id["rotated"]["probe"]["rotation"] in (90, 270)
        assert by_id["vp9_webm"]["probe"]["codec"] == "vp9" and by_id["mpeg4_avi"]["probe"]["codec"] == "mpeg4"

        # --- unreadable and unsupported files, ignored names -------------------------------
        assert states["notarray"]["state"] == "failed"
        failed = inbox / ".failed"
        for name in ("notarray.json", "notes.txt"):
            assert (failed / name).is_file()
            report = json.loads((failed / f"{name}.error.json").read_text())
            assert report["file"] == name and report["error"].startswith(name)
        assert "expected a JSON array" in json.loads((failed / "notarray.json.error.json").read_text())["error"]
        assert "unsupported file type '.txt'" in json.loads((failed / "notes.txt.error.json").read_text())["error"]
        assert not (daemon.outbox / "notarray.jsonl").exists() or not daemon.results("notarray")
        assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == sorted(ignored)
        assert not any((inbox / ".work").iterdir())
        done_files = {p.name for p in (inbox / ".done").iterdir()}
        assert {"good.jsonl", "quoted.csv", "clips.tsv", "table.parquet", "dropped.webm", "slow.jsonl"} <= done_files

        # --- it keeps serving ------------------------------------------------------------
        daemon.drop_text(
            "after.jsonl", "".join(json.dumps({"id": f"a{n}", "video": videos["bikes"].name}) + "\n" for n in range(2))
        )
        assert daemon.wait_for_job("after")["state"] == "done"
        assert sorted(r["id"] for r in daemon.results("after")) == ["a0", "a1"]
        expected["after"] = ({"a0", "a1"}, {})

        # --- metrics agree with the files -----------------------------------------------
        all_errors = [e for job in expected for e in daemon.errors(job)]
        steps = Counter(e["step"] for e in all_errors)
        total_ok = sum(len(ok) for ok, _ in expected.values())
        text = daemon.metrics()
        assert metric_value(text, "reelflow_records_total", step=FRAMES, status="ok") == total_ok
        assert metric_value(text, "reelflow_records_total", step=READ, status="error") == steps[READ]
        assert metric_value(text, "reelflow_records_total", step=PROBE, status="error") == steps[PROBE]
        assert metric_value(text, "reelflow_records_total", step=FRAMES, status="error") == steps[FRAMES]
        assert metric_value(text, "reelflow_records_total", step=PROBE, status="ok") == total_ok + steps[FRAMES]
        assert metric_value(text, "reelflow_jobs", state="done") == len(expected)
        assert metric_value(text, "reelflow_jobs", state="failed") == 2
        assert metric_value(text, "reelflow_jobs", state="claimed") == 0
        assert metric_value(text, "reelflow_queue_depth", step=PROBE) == 0
        assert metric_value(text, "reelflow_inflight", step=FRAMES) == 0
        assert metric_value(text, "reelflow_batch_size_count", step=PROBE) >= 1
        assert metric_value(text, "reelflow_step_seconds_count", step=FRAMES) >= 1
        assert metric_value(text, "reelflow_model_load_seconds", step=PROBE) >= 0
        assert "reelflow_config_reloads_total" in text

        assert daemon.stop(signal.SIGTERM) == 0
    assert not (daemon.outbox / ".reelflow" / "daemon.json").exists()


def _parquet(folder: Path, videos) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "table.parquet"
    table = pa.table({"id": [1, 2, 3], "video": [videos["bikes"].name, videos["sparse_gop"].name, "garbage.mp4"]})
    pq.write_table(table, path, row_group_size=2)
    return path
