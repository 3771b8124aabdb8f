"""The issue-15 check as a user would run it: `reelflow serve` fed rows pointing at a real HTTP
server and a real S3-compatible server (moto) on 127.0.0.1, good clips, a route failing twice
before it answers, 404s, rows outside `daemon.remote.allow`, clips PropertyFilter drops; a
WebDataset shard sink; kill -9 at random moments and restarts. Then every row is in exactly one
of results, errors or filtered, and the shards (read back with `webdataset`) hold each kept
sample exactly once."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import webdataset as wds

from daemon.io.sinks import sample_key
from tests.daemon.io.test_remote_media import s3_bucket  # noqa: F401  (the moto fixture)
from tests.harness import ECHO, DaemonProcess, daemon_config, read_jsonl, sample_video, wait_until

pytest.importorskip("s3fs")
pytestmark = pytest.mark.timeout(420)


class Clips(BaseHTTPRequestHandler):
    """/clips/bunny-N.mp4 and /clips/bikes-N.mp4 (real footage), /flaky/N.mp4 (503 twice, then
    bunny), /missing/N.mp4 (404), /private/N.mp4 (outside the allow-list: must never be asked)."""

    bunny = bikes = b""
    hits: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.lock:
            self.hits[self.path] += 1
            count = self.hits[self.path]
        if self.path.startswith("/flaky/") and count <= 2:
            return self._answer(503, b"busy")
        if self.path.startswith("/missing/"):
            return self._answer(404, b"no such clip")
        return self._answer(200, self.bikes if "bikes" in self.path else self.bunny)

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def clip_server():
    Clips.bunny, Clips.bikes = sample_video("bigbuckbunny.mp4").read_bytes(), sample_video("bikes.mp4").read_bytes()
    Clips.hits = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Clips)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def rows_and_outcomes(base: str, bucket: str) -> tuple[list[dict], dict[str, str]]:
    """The rows, and where each must end: result, filtered (bikes is 640x272, under min_width
    700) or the error type."""
    plan = (
        [(f"h-bunny-{n}", f"{base}/clips/bunny-{n}.mp4", "result") for n in range(12)]
        + [(f"h-flaky-{n}", f"{base}/flaky/{n}.mp4", "result") for n in range(3)]
        + [(f"h-bikes-{n}", f"{base}/clips/bikes-{n}.mp4", "filtered") for n in range(4)]
        + [(f"h-missing-{n}", f"{base}/missing/{n}.mp4", "RemoteNotFound") for n in range(2)]
        + [(f"h-private-{n}", f"{base}/private/{n}.mp4", "RemoteRefused") for n in range(2)]
        + [("metadata", "http://169.254.169.254/latest/meta-data/x.mp4", "RemoteRefused")]
        + [(f"s-bunny-{n}", f"{bucket}bunny-{n}.mp4", "result") for n in range(6)]
        + [(f"s-bikes-{n}", f"{bucket}bikes-{n}.mp4", "filtered") for n in range(2)]
        + [(f"s-nope-{n}", f"{bucket}nope-{n}.mp4", "RemoteNotFound") for n in range(2)]
        + [("s-other", "s3://other-bucket/x.mp4", "RemoteRefused")]
    )
    return [{"id": i, "video": url} for i, url, _ in plan], {i: outcome for i, _, outcome in plan}


def test_remote_rows_shards_and_kill_9(tmp_path, clip_server, s3_bucket):  # noqa: F811
    import boto3

    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for n in range(6):
        client.put_object(Bucket="clips", Key=f"a/bunny-{n}.mp4", Body=Clips.bunny)
    for n in range(2):
        client.put_object(Bucket="clips", Key=f"a/bikes-{n}.mp4", Body=Clips.bikes)
    base = clip_server
    rows, outcome = rows_and_outcomes(base, s3_bucket)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rng.shuffle(rows)
    meta = tmp_path / "rows.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    allow = [f"{base}/clips/", f"{base}/flaky/", f"{base}/missing/", s3_bucket]
    config = daemon_config(
        tmp_path,
        [
            {"type": "VideoProcessor", "name": "VideoProbe"},
            {"type": "VideoFilter", "name": "PropertyFilter", "config": {"min_width": 700}},
            {**ECHO, "config": {"sleep_s": 0.1, "batch_size": 2}},  # slow enough to be killed mid-job
        ],
        remote={"allow": allow, "retries": 3, "timeout_s": 10},
        outputs=[
            {"format": "webdataset", "path": "shards", "shard_max_samples": 3, "fields": ["json", "video", "probe"]}
        ],
    )
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    daemon = DaemonProcess(config, env=env).start()
    daemon.drop(meta)
    kills, planned = 0, rng.choice([2, 3])
    ended = lambda: len(daemon.results("rows")) + len(daemon.errors("rows"))  # noqa: E731
    for _ in range(planned):
        before = ended()
        wait_until(lambda b=before: ended() > b, 120, "a new result or error line", daemon.log)
        time.sleep(rng.uniform(0.0, 1.0))
        state = daemon.job_state("rows")
        if state and state["state"] == "done":
            break
        daemon.kill()
        kills += 1
        daemon = DaemonProcess(config, env=env).start()
    state = daemon.wait_for_job("rows", 240)
    daemon.stop()
    context = f"(seed {seed}, {kills} kills)"
    assert state["state"] == "done", context
    assert kills >= 1, f"the job finished before the first kill {context}"

    results = daemon.results("rows")
    errors = daemon.errors("rows")
    filtered = read_jsonl(daemon.outbox / "rows.filtered.jsonl")
    ended_ids = [r["id"] for r in results] + [e["id"] for e in errors] + [f["id"] for f in filtered]
    twice = sorted(i for i, n in Counter(ended_ids).items() if n > 1)
    assert not twice, f"rows ended more than once: {twice} {context}"
    assert sorted(ended_ids) == sorted(outcome), f"missing: {sorted(set(outcome) - set(ended_ids))} {context}"
    got = {r["id"]: "result" for r in results} | {f["id"]: "filtered" for f in filtered}
    got |= {e["id"]: e["error"] for e in errors}
    assert got == outcome, context
    for error in errors:
        if error["error"] == "RemoteRefused":
            assert "daemon.remote.allow" in error["message"], error
        else:
            assert "404" in error["message"] or "no such object" in error["message"], error
    assert all("min_width" in f["reason"] and "640" in f["reason"] for f in filtered), filtered
    assert not [p for p in Clips.hits if p.startswith("/private/")], "a refused URL was fetched"
    assert all(Clips.hits[f"/flaky/{n}.mp4"] >= 3 for n in range(3)), Clips.hits  # retried past the 503s
    assert all(r["video"].startswith(("http://", "s3://")) for r in results)  # the row's URL is kept

    shard_folder = tmp_path / "shards" / "rows"
    index = read_jsonl(shard_folder / "shards.jsonl")
    samples = list(wds.WebDataset([str(shard_folder / e["file"]) for e in index], shardshuffle=False))
    kept = sorted(r["id"] for r in results)
    listed = [i for e in index for i in e["ids"]]
    assert sorted(listed) == kept, f"index ids {sorted(listed)} vs results {kept} {context}"
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(sample_key(i) for i in kept), context  # each kept sample exactly once
    for sample in samples:
        line = json.loads(sample["json"])
        assert sample_key(line["id"]) == sample["__key__"] and line["probe"]["num_frames"] > 0
        assert json.loads(sample["probe.json"]) == line["probe"]
        # No step wrote a local clip: the sample's video is the remote file itself, from the cache.
        assert sample["mp4"] == Clips.bunny, f"{line['id']}: the packed video is not the fetched clip"
    assert not list(shard_folder.rglob("*.tmp")), context
    on_disk = sorted(p.relative_to(shard_folder).as_posix() for p in shard_folder.rglob("*.tar"))
    assert on_disk == sorted(e["file"] for e in index), context
