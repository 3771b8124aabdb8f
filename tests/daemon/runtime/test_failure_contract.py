"""The failure contract (DESIGN.md), with faults injected for real: a full tmpfs as the outbox,
a directory where an outbox file should be, a remote host that is gone.

- transient (disk full): intake pauses (`reelflow_paused`, /readyz 503), nothing is marked
  done or failed, and when space returns the daemon finishes every row exactly once;
- job-level (an outbox file that is a directory): the job goes to inbox/.failed/ with its
  `.error.json`, the daemon keeps serving other jobs;
- the pipeline dying wakes the job waiting on it; one-shot exits 1 naming the path.
"""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from daemon.io.outbox import JobPaths, JobWriter
from daemon.io.records import Record
from daemon.runtime.failures import FATAL, JOB, OUTBOX, RECORD, STAGE, TRANSIENT, classify, transient_reason
from stages.base import StageError
from tests.harness import (
    ECHO,
    DaemonProcess,
    daemon_config,
    fill,
    metric_value,
    read_jsonl,
    run_oneshot,
    wait_until,
    write_config,
)
from tests.stages_for_tests import ENV

FRAMES = "step_0_VideoProcessor_FrameSampler"


def record(n: int) -> Record:
    return Record(id=f"r{n}", job="job", row_number=n, row={"id": f"r{n}", "text": "x" * 200}, fields={}, key=f"r{n}")


# --- the classification, on real errors --------------------------------------------------------


def test_classify_real_errors(tmp_path, tmpfs):
    full = tmpfs(tmp_path / "full", 64)
    fill(full)
    with pytest.raises(OSError) as no_space:
        (full / "more.bin").write_bytes(b"x" * 8192)
    with pytest.raises(OSError) as is_dir:
        tmp_path.open("ab")
    with pytest.raises(OSError) as missing:
        (tmp_path / "nope.mp4").open("rb")
    with pytest.raises(OSError) as too_long:
        (tmp_path / ("v" * 300 + ".mp4")).open("rb")

    assert classify(no_space.value, STAGE) == TRANSIENT and transient_reason(no_space.value) == "disk_full"
    assert classify(no_space.value, OUTBOX) == TRANSIENT
    # The record's own file: its fault, one error line. The job's outbox file: the job's.
    for error in (is_dir.value, missing.value, too_long.value):
        assert classify(error, STAGE) == RECORD, error
        assert classify(error, OUTBOX) == JOB, error
    assert classify(StageError("bad video"), STAGE) == RECORD
    assert classify(ValueError("Exceeds the limit (4300 digits)"), STAGE) == RECORD
    assert classify(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), STAGE) == TRANSIENT
    assert classify(MemoryError(), STAGE) == TRANSIENT

    from daemon.hosts.base import WorkerGone, WorkerLost

    assert classify(WorkerLost("actor died"), STAGE) == TRANSIENT
    assert classify(WorkerGone("no replacement"), STAGE) == FATAL


# --- the writer: a failed append leaves nothing behind; step files repaired ---------------------


def test_a_failed_append_is_cut_back_and_the_retry_writes_each_line_once(tmp_path, tmpfs):
    outbox = tmpfs(tmp_path / "outbox", 128)
    paths = JobPaths(
        outbox / "job.jsonl",
        outbox / "job.errors.jsonl",
        outbox / "job.filtered.jsonl",
        outbox / "media",
        outbox / "steps",
    )
    writer = JobWriter("job", paths, outbox)
    writer.open()
    writer.write_results([record(0)])
    before = paths.results.read_bytes()
    ballast = fill(outbox, leave_kb=8)  # room for part of the next batch, not all of it
    batch = [record(n) for n in range(1, 200)]  # ~50 kB
    with pytest.raises(OSError) as full:
        writer.write_results(batch)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(paths.results)
    assert paths.results.read_bytes() == before  # no half batch left to be duplicated by the retry
    ballast.unlink()
    writer.write_results(batch)
    writer.close()
    ids = [line["id"] for line in read_jsonl(paths.results)]
    assert ids == [f"r{n}" for n in range(200)]


def test_a_torn_line_in_a_step_file_is_cut_on_open(tmp_path):
    paths = JobPaths(
        tmp_path / "job.jsonl",
        tmp_path / "job.errors.jsonl",
        tmp_path / "job.filtered.jsonl",
        tmp_path / "media",
        tmp_path / "steps",
    )
    step = paths.intermediate / "step_0_Test_Echo.jsonl"
    step.parent.mkdir()
    step.write_bytes(b'{"id": "r0"}\n{"id": "r1", "te')  # a crash mid-append
    writer = JobWriter("job", paths, tmp_path)
    writer.open()
    writer.write_intermediate("step_0_Test_Echo", [record(1)])
    writer.close()
    assert [line["id"] for line in read_jsonl(step)] == ["r0", "r1"]  # every line parses


# --- disk full, end to end ---------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_disk_full_pauses_intake_and_resumes_by_itself_with_every_row_once(tmp_path, tmpfs, videos):
    media = tmp_path / "media"
    media.mkdir()
    video = media / videos["h264"].name
    video.write_bytes(videos["h264"].read_bytes())
    outbox = tmpfs(tmp_path / "outbox", 2048)
    steps = [
        {
            "type": "VideoProcessor",
            "name": "FrameSampler",
            "config": {"num_frames": 2, "max_side": 32, "batch_size": 4},
        }
    ]
    config = daemon_config(tmp_path, steps, meta_folder=media)
    ids = [f"v{n}" for n in range(60)]
    with DaemonProcess(config, env=ENV) as daemon:
        assert daemon.outbox == outbox.resolve()
        assert daemon.http("/readyz") == (200, "ready\n")
        ballast = fill(outbox, leave_kb=96)  # a few records fit, then the disk is full mid-job
        daemon.drop_text("big.jsonl", "".join(json.dumps({"id": i, "video": video.name}) + "\n" for i in ids))

        def paused():
            return metric_value(daemon.metrics(), "reelflow_paused", reason="disk_full") == 1

        wait_until(paused, 60, "reelflow_paused{reason=disk_full} = 1", daemon.log)
        # Take the last bytes too (a cut-back append frees a little): now nothing can move.
        rest = fill(outbox, name="ballast2.bin")
        readyz = wait_until(
            lambda: (answer := daemon.http("/readyz"))[0] == 503 and answer, 30, "/readyz 503", daemon.log
        )
        assert "disk_full" in readyz[1], readyz
        assert "pausing intake (disk_full)" in daemon.log()
        assert daemon.job_state("big")["state"] == "claimed"
        assert daemon.errors("big") == []  # nothing marked failed because of the disk
        assert len(daemon.results("big")) < len(ids)

        ballast.unlink()  # space returns: no restart
        rest.unlink()
        state = daemon.wait_for_job("big", 120)
        assert state["state"] == "done", state
        results, errors = daemon.results("big"), daemon.errors("big")
        assert errors == [], errors
        assert sorted(r["id"] for r in results) == sorted(ids)  # every row, once
        assert all(len(r["frames"]) == 2 for r in results)
        for r in results:
            assert all((outbox / frame).is_file() for frame in r["frames"]), r
        steps_file = outbox / "intermediate" / "big" / f"{FRAMES}.jsonl"
        assert sorted(line["id"] for line in read_jsonl(steps_file)) == sorted(ids)
        wait_until(lambda: not paused(), 10, "reelflow_paused back to 0", daemon.log)
        assert daemon.http("/readyz") == (200, "ready\n")
        assert "resuming intake: disk_full has passed" in daemon.log()
        assert daemon.stop() == 0
    assert "never retrieved" not in daemon.log()


def test_a_full_disk_under_the_clip_files_pauses_and_every_clip_is_written_once(tmp_path, tmpfs):
    """ClipTranscoder's encoder reports a full disk as an FFmpeg error; it once became a
    'corrupt or truncated' error line for every good clip."""
    from tests.stages.clip_media import clip, decoded_levels, pan

    media = tmp_path / "media"
    media.mkdir()
    source = pan(media / "pan.mp4", frames=72, size=(160, 96))
    outbox = tmpfs(tmp_path / "outbox", 2048)
    steps = [{"type": "VideoProcessor", "name": "ClipTranscoder", "config": {"batch_size": 4}}]
    config = daemon_config(tmp_path, steps, meta_folder=media)
    # Clips off the keyframes: encoded, not copied.
    rows = [{"id": f"c{n}", "video": source.name, "clip": clip(n, 1 + n % 30, 30, 12)} for n in range(30)]
    with DaemonProcess(config, env=ENV) as daemon:
        ballast = fill(outbox, leave_kb=96)
        daemon.drop_text("clips.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        wait_until(
            lambda: metric_value(daemon.metrics(), "reelflow_paused", reason="disk_full") == 1,
            60,
            "reelflow_paused{reason=disk_full} = 1",
            daemon.log,
        )
        rest = fill(outbox, name="ballast2.bin")
        assert daemon.errors("clips") == []  # no clip blamed for the disk
        ballast.unlink()
        rest.unlink()
        state = daemon.wait_for_job("clips", 120)
        assert state["state"] == "done", state
        results, errors = daemon.results("clips"), daemon.errors("clips")
        assert errors == [], errors
        assert sorted(r["id"] for r in results) == sorted(row["id"] for row in rows)
        for r in results:
            assert r["transcode"]["method"] == "encode", r
            assert len(decoded_levels(outbox / r["video"])) == 30, r
        assert not list(outbox.rglob("*.part"))
        assert daemon.stop() == 0


def test_a_folder_where_the_clip_file_goes_fails_that_clip_alone(tmp_path):
    from daemon.runtime.failures import RECORD, classify
    from stages.base import media_path
    from stages.video.clip_transcoder import ClipTranscoder
    from tests.stages.clip_media import child, clip, pan

    source = pan(tmp_path / "pan.mp4", frames=48, size=(96, 64))
    records = [child(source, tmp_path, clip(k, 1 + k, 20, 12), rid=f"p:{k:04d}") for k in range(2)]
    blocked = media_path(records[0], "mp4")
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.with_name(blocked.name + ".part").mkdir()  # a folder where the encoder writes
    first, second = ClipTranscoder(ClipTranscoder.Config()).process(records)
    assert isinstance(first, StageError) and first.error_type == "WriteError", first
    assert first.errno == errno.EISDIR and classify(first, STAGE) == RECORD
    assert "cannot write the clip file" in first.message and blocked.name in first.message
    assert isinstance(second, dict) and second["video"].is_file(), second  # the source itself is fine


# --- job-level: an outbox file that is a directory ---------------------------------------------


@pytest.mark.timeout(120)
def test_an_unwritable_outbox_file_fails_that_job_alone(tmp_path):
    config = daemon_config(tmp_path, [{**ECHO, "config": {"batch_size": 4}}])
    outbox = tmp_path / "outbox"
    (outbox / "bad.jsonl").mkdir(parents=True)  # the results file is a directory: fails at open
    step_file = outbox / "intermediate" / "mid" / "step_0_Test_Echo.jsonl"
    step_file.mkdir(parents=True)  # a step file is a directory: fails at the first write

    def rows(prefix: str, count: int) -> str:
        return "".join(json.dumps({"id": f"{prefix}{n}"}) + "\n" for n in range(count))

    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop_text("bad.jsonl", rows("b", 10))
        daemon.drop_text("mid.jsonl", rows("m", 10))
        for job in ("bad", "mid"):
            assert daemon.wait_for_job(job)["state"] == "failed"
            failed = daemon.inbox / ".failed" / f"{job}.jsonl"
            assert failed.is_file()
            error = json.loads((failed.parent / f"{job}.jsonl.error.json").read_text())
            assert "IsADirectoryError" in error["error"], error
        bad_error = json.loads((daemon.inbox / ".failed" / "bad.jsonl.error.json").read_text())["error"]
        assert str(outbox / "bad.jsonl") in bad_error, bad_error
        mid_error = json.loads((daemon.inbox / ".failed" / "mid.jsonl.error.json").read_text())["error"]
        assert str(step_file) in mid_error, mid_error
        assert not list((daemon.inbox / ".work").iterdir())

        daemon.drop_text("good.jsonl", rows("g", 10))  # the daemon keeps serving
        assert daemon.wait_for_job("good")["state"] == "done"
        assert sorted(r["id"] for r in daemon.results("good")) == sorted(f"g{n}" for n in range(10))
        text = daemon.metrics()
        assert metric_value(text, "reelflow_jobs", state="failed") == 2
        assert metric_value(text, "reelflow_jobs", state="done") == 1
        assert daemon.http("/readyz") == (200, "ready\n")
        assert daemon.stop() == 0
    assert "never retrieved" not in daemon.log()


@pytest.mark.timeout(120)
def test_a_file_where_the_jobs_media_folder_goes_fails_that_job_not_its_records(tmp_path, videos):
    media = tmp_path / "media"
    media.mkdir()
    (media / "v.mp4").write_bytes(videos["h264"].read_bytes())
    steps = [{"type": "VideoProcessor", "name": "FrameSampler", "config": {"num_frames": 2, "max_side": 32}}]
    config = daemon_config(tmp_path, steps, meta_folder=media)
    blocked = tmp_path / "outbox" / "media" / "pics"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")

    def rows(prefix: str) -> str:
        return "".join(json.dumps({"id": f"{prefix}{n}", "video": "v.mp4"}) + "\n" for n in range(5))

    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop_text("pics.jsonl", rows("p"))
        assert daemon.wait_for_job("pics")["state"] == "failed"
        error = json.loads((daemon.inbox / ".failed" / "pics.jsonl.error.json").read_text())["error"]
        assert str(blocked) in error, error
        assert daemon.errors("pics") == []  # no record blamed for the outbox
        daemon.drop_text("other.jsonl", rows("o"))  # another job's media folder is fine
        assert daemon.wait_for_job("other")["state"] == "done"
        assert sorted(r["id"] for r in daemon.results("other")) == [f"o{n}" for n in range(5)]
        assert daemon.stop() == 0


def test_a_job_without_media_leaves_no_media_folder(tmp_path):
    config = daemon_config(tmp_path, [ECHO])
    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop_text("plain.jsonl", json.dumps({"id": "a"}) + "\n")
        assert daemon.wait_for_job("plain")["state"] == "done"
        assert daemon.stop() == 0
    assert not (tmp_path / "outbox" / "media" / "plain").exists()


@pytest.mark.timeout(120)
def test_an_immutable_results_file_fails_its_job_and_the_daemon_goes_on(tmp_path):
    config = daemon_config(tmp_path, [ECHO])
    results = tmp_path / "outbox" / "frozen.jsonl"
    results.parent.mkdir(parents=True)
    results.touch()
    done = subprocess.run(["chattr", "+i", str(results)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
    try:
        with DaemonProcess(config, env=ENV) as daemon:
            daemon.drop_text("frozen.jsonl", "".join(json.dumps({"id": f"f{n}"}) + "\n" for n in range(5)))
            assert daemon.wait_for_job("frozen")["state"] == "failed"
            error = json.loads((daemon.inbox / ".failed" / "frozen.jsonl.error.json").read_text())["error"]
            assert "PermissionError" in error and str(results) in error, error
            daemon.drop_text("after.jsonl", json.dumps({"id": "a"}) + "\n")
            assert daemon.wait_for_job("after")["state"] == "done"
            assert [r["id"] for r in daemon.results("after")] == ["a"]
            assert daemon.stop() == 0
    finally:
        subprocess.run(["chattr", "-i", str(results)], check=False)


# --- one-shot: an outbox fault ends the run with exit 1, naming the path ------------------------


def test_oneshot_with_an_unwritable_outbox_exits_1_naming_the_path(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"id": f"r{n}"}) + "\n" for n in range(5)))
    (tmp_path / "work" / "meta.jsonl").mkdir(parents=True)  # base_folder's results file is a directory
    config = write_config(
        tmp_path, {"meta_path": "meta.jsonl", "base_folder": "work", "save_folder": "out", "steps": [ECHO]}
    )
    result = run_oneshot(config, env=ENV, timeout=90)  # the bound: a hang fails here
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert str((tmp_path / "work" / "meta.jsonl").resolve()) in result.stderr, result.stderr
    assert "IsADirectoryError" in result.stderr
    assert "never retrieved" not in result.stderr


# --- the pipeline dying wakes the job waiting on it ---------------------------------------------


class GoneHost:
    """A remote host whose replacements are spent, as RayHost is after `max_replacements`."""

    async def load(self) -> None: ...

    async def prepare(self, fields):
        return fields

    async def process(self, batch):
        from daemon.hosts.base import WorkerGone

        raise WorkerGone("reelflow:step_0_Test_Echo:0 could not be brought back after 2 replacement(s)")

    async def close(self) -> None: ...

    def resources(self):
        from stages.base import Resources

        return Resources()

    def take_usage(self):
        from collections import Counter

        return Counter()

    def reconfigure(self, config) -> None: ...


@pytest.mark.timeout(60)  # the bound: before the fix, run_job waited on run.finished forever
async def test_the_pipeline_dying_wakes_the_job_with_the_cause(tmp_path):
    from daemon.config import parse_config
    from daemon.io.outbox import OutboxLayout
    from daemon.metrics import Metrics
    from daemon.runtime.engine import Engine, JobInput
    from daemon.runtime.failures import PipelineDied

    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps({"id": n}) + "\n" for n in range(20)))
    config = parse_config("steps:\n  - {type: Test, name: Echo}\n")
    engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics(), host_factory=lambda *_: GoneHost())
    await engine.start()
    try:
        with pytest.raises(PipelineDied) as died:
            await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
    finally:
        await engine.stop()
    assert "WorkerGone" in str(died.value) and "could not be brought back" in str(died.value)
    assert read_jsonl(tmp_path / "out" / "m.errors.jsonl") == []  # nothing marked failed: it resumes


# --- a dead endpoint: transient, the records are asked again when it is back --------------------


class Endpoint:
    """A real OpenAI-style HTTP server on 127.0.0.1: 503 while `down`, else a one-word answer."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        endpoint = self
        self.down = True
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                endpoint.requests += 1
                if endpoint.down:
                    body, status = {"error": {"message": "overloaded, come back later"}}, 503
                else:
                    message = {"role": "assistant", "content": "prompt"}
                    choice = {"index": 0, "message": message, "finish_reason": "stop"}
                    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                    body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}
                    body, status = {**body, "usage": usage}, 200
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(180)
def test_a_dead_endpoint_pauses_intake_and_no_record_fails(tmp_path):
    endpoint = Endpoint()
    step = {
        "type": "TextGenerator",
        "name": "GPTTextGenerator",
        "config": {
            "model": "m",
            "api_key": "${OPENAI_API_KEY}",
            "base_url": endpoint.url,
            "max_retries": 0,  # the stage gives up at once; the runtime's backoff takes over
            "batch_size": 4,
            "timeout_s": 5,
            "output_key": "prompt",
        },
    }
    config = daemon_config(tmp_path, [step])
    try:
        with DaemonProcess(config, env={**ENV, "OPENAI_API_KEY": "sk-test"}) as daemon:
            daemon.drop_text(
                "caps.jsonl", "".join(json.dumps({"id": f"c{n}", "text": "a cat"}) + "\n" for n in range(8))
            )

            def paused():
                return metric_value(daemon.metrics(), "reelflow_paused", reason="endpoint") == 1

            wait_until(paused, 60, "reelflow_paused{reason=endpoint} = 1", daemon.log)
            status, body = daemon.http("/readyz")
            assert status == 503 and "endpoint" in body and "HTTP 503" in body, (status, body)
            assert daemon.errors("caps") == []
            endpoint.down = False  # the endpoint is back: no restart
            assert daemon.wait_for_job("caps", 120)["state"] == "done"
            assert daemon.errors("caps") == []
            assert sorted(r["id"] for r in daemon.results("caps")) == sorted(f"c{n}" for n in range(8))
            assert all(r["prompt"] == "prompt" for r in daemon.results("caps"))
            wait_until(lambda: not paused(), 10, "reelflow_paused back to 0", daemon.log)
            assert daemon.stop() == 0
    finally:
        endpoint.close()
