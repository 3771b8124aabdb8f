"""Remote media: rows naming http:// and s3:// URLs, against a real HTTP server and a real
S3-compatible server (moto) started here on 127.0.0.1; the allow-list; retries; the cache."""

from __future__ import annotations

import errno
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon.config import RemoteSection, parse_config
from daemon.io.outbox import OutboxLayout
from daemon.io.remote import MediaCache, RemoteFetchError, allowing_rule
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from tests.harness import read_jsonl, sample_video

pytestmark = pytest.mark.timeout(180)


class Media(BaseHTTPRequestHandler):
    """Routes: /clips/<name> (the sample video), /flaky/<name> (503 twice, then the video),
    /slow/<name> (answers after 3 s), /missing (404), /secret (403), /hop (302 to /clips/hop.mp4),
    /escape (302 to a prefix nobody allowed)."""

    video = b""
    hits: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        with self.lock:
            self.hits[self.path] = self.hits.get(self.path, 0) + 1
            count = self.hits[self.path]
        if self.path.startswith("/flaky/") and count <= 2:
            return self._answer(503, b"busy")
        if self.path.startswith("/down/") and count <= 5:
            return self._answer(502, b"down")
        if self.path.startswith("/slow/"):
            time.sleep(3)
        if self.path == "/missing":
            return self._answer(404, b"no")
        if self.path == "/secret":
            return self._answer(403, b"no")
        if self.path == "/hop":
            return self._redirect("/clips/hop.mp4")
        if self.path == "/escape":
            return self._redirect("http://127.0.0.1:1/elsewhere.mp4")
        return self._answer(200, self.video)

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, where: str):
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def media_server():
    Media.video = sample_video().read_bytes()
    Media.hits = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Media)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def s3_bucket(monkeypatch):
    """moto's standalone server on 127.0.0.1 holding bucket `clips` with one real video."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="clips")
    client.put_object(Bucket="clips", Key="a/bunny.mp4", Body=sample_video().read_bytes())
    try:
        yield "s3://clips/a/"
    finally:
        server.stop()


def test_allow_list_prefixes_and_globs():
    allow = ["https://cdn.example.com/clips/", "s3://bucket-*/videos/*"]
    assert allowing_rule("https://cdn.example.com/clips/x.mp4", allow) == allow[0]
    assert allowing_rule("https://cdn.example.com/clipsX/x.mp4", allow) is None
    assert allowing_rule("s3://bucket-eu/videos/a.mp4", allow) == allow[1]
    assert allowing_rule("http://169.254.169.254/latest/meta-data", allow) is None
    assert allowing_rule("http://127.0.0.1:8080/x", []) is None


def run_rows(tmp_path: Path, rows: list[dict], allow: list[str], retries: int = 3, timeout_s: float = 1.5):
    meta = tmp_path / "remote.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config(
        json.dumps(
            {
                "steps": [{"type": "VideoProcessor", "name": "VideoProbe"}],
                "daemon": {"remote": {"allow": allow, "retries": retries, "timeout_s": timeout_s}},
            }
        )
    )
    outbox = tmp_path / "out"

    async def main():
        engine = Engine(config, OutboxLayout.daemon(outbox), Metrics())
        await engine.start()
        try:
            return await engine.run_job(JobInput("remote", meta, "jsonl", "remote.jsonl", tmp_path)), engine
        finally:
            await engine.stop()

    import asyncio

    run, engine = asyncio.run(main())
    results = {r["id"]: r for r in read_jsonl(outbox / "remote.jsonl")}
    errors = {e["id"]: e for e in read_jsonl(outbox / "remote.errors.jsonl")}
    return run, results, errors, outbox


def test_http_rows_through_the_engine(tmp_path, media_server):
    base = media_server
    rows = [
        {"id": "good", "video": f"{base}/clips/good.mp4"},
        {"id": "flaky", "video": f"{base}/flaky/f.mp4"},
        {"id": "hop", "video": f"{base}/hop"},
        {"id": "missing", "video": f"{base}/missing"},
        {"id": "secret", "video": f"{base}/secret"},
        {"id": "escape", "video": f"{base}/escape"},
        {"id": "outside", "video": "http://169.254.169.254/latest/meta-data/x.mp4"},
    ]
    run, results, errors, outbox = run_rows(tmp_path, rows, allow=[f"{base}/"])
    assert sorted(results) == ["flaky", "good", "hop"]
    assert sorted(errors) == ["escape", "missing", "outside", "secret"]
    # the stage read the real video; the result keeps the URL the row gave
    assert results["good"]["probe"]["num_frames"] > 0 and results["good"]["video"] == rows[0]["video"]
    assert Media.hits["/flaky/f.mp4"] == 3  # two 503s retried, no error line while retries remained
    assert errors["missing"]["error"] == "RemoteNotFound" and "404" in errors["missing"]["message"]
    assert errors["secret"]["error"] == "RemoteForbidden" and "403" in errors["secret"]["message"]
    assert errors["escape"]["error"] == "RemoteRefused"
    outside = errors["outside"]
    assert outside["error"] == "RemoteRefused" and "daemon.remote.allow" in outside["message"]
    assert "remote.jsonl: row 7" in outside["message"]
    cached = list((outbox / ".reelflow" / "remote").iterdir())
    assert len(cached) == 3 and not [p for p in cached if p.name.endswith(".part")]


def test_nothing_is_fetched_by_default(tmp_path, media_server):
    run, results, errors, _ = run_rows(tmp_path, [{"id": "a", "video": f"{media_server}/clips/a.mp4"}], allow=[])
    assert not results and errors["a"]["error"] == "RemoteRefused"
    assert "empty" in errors["a"]["message"] and not Media.hits  # the server never saw a request


def test_a_server_down_past_its_retries_pauses_intake_and_no_row_fails(tmp_path, media_server, caplog):
    """A dead endpoint is transient (the failure contract): the down route answers 502 five
    times; with retries: 1 each fetch gives up after two tries, intake pauses (reason
    endpoint) and the fetch is asked again until it passes. The slow route answers within
    timeout_s and is simply waited for."""
    rows = [
        {"id": "slow", "video": f"{media_server}/slow/s.mp4"},
        {"id": "down", "video": f"{media_server}/down/d.mp4"},
    ]
    with caplog.at_level("WARNING"):
        run, results, errors, _ = run_rows(tmp_path, rows, allow=[media_server], retries=1, timeout_s=5)
    assert sorted(results) == ["down", "slow"] and not errors
    assert Media.hits["/down/d.mp4"] == 6
    assert any("pausing intake (endpoint)" in r.getMessage() for r in caplog.records)
    assert any("resuming intake: endpoint" in r.getMessage() for r in caplog.records)


def test_a_timeout_is_retried(tmp_path, media_server):
    settings = RemoteSection(allow=[media_server], retries=1, timeout_s=1.0)
    cache = MediaCache(settings, tmp_path / "cache")
    from daemon.io.remote import RemoteUnavailable

    with pytest.raises(RemoteUnavailable, match="tried 2 times"):
        cache.fetch_blocking(f"{media_server}/slow/t.mp4")
    assert Media.hits["/slow/t.mp4"] == 2


def test_s3_rows_through_the_engine(tmp_path, s3_bucket):
    rows = [
        {"id": "bunny", "video": f"{s3_bucket}bunny.mp4"},
        {"id": "nope", "video": f"{s3_bucket}nope.mp4"},
        {"id": "other", "video": "s3://other-bucket/x.mp4"},
    ]
    run, results, errors, _ = run_rows(tmp_path, rows, allow=[s3_bucket])
    assert sorted(results) == ["bunny"] and results["bunny"]["probe"]["num_frames"] > 0
    assert errors["nope"]["error"] == "RemoteNotFound"
    assert errors["other"]["error"] == "RemoteRefused"


@pytest.mark.parametrize("source", ["http", "s3"])
def test_a_full_cache_disk_is_the_disk_not_the_server(tmp_path, tmpfs, media_server, s3_bucket, source):
    """A fetch into a full cache folder raises the disk's ENOSPC (the runtime pauses for
    disk_full and asks again), not 'remote unavailable' after retrying the server."""
    from daemon.runtime.failures import transient_reason
    from tests.harness import fill

    url = f"{media_server}/ok/a.mp4" if source == "http" else f"{s3_bucket}bunny.mp4"
    cache_folder = tmpfs(tmp_path / "cache", 64)
    fill(cache_folder, leave_kb=4)  # the sample video is ~1 MB
    cache = MediaCache(RemoteSection(allow=[media_server, s3_bucket], retries=2, timeout_s=5), cache_folder)
    with pytest.raises(OSError) as full:
        cache.fetch_blocking(url)
    assert full.value.errno == errno.ENOSPC and transient_reason(full.value) == "disk_full", full.value
    assert not [p for p in cache_folder.iterdir() if p.name != "ballast.bin"]  # no partial file left


def test_the_cache_evicts_the_least_recently_used(tmp_path, media_server):
    size = len(sample_video().read_bytes())
    settings = RemoteSection(allow=[media_server], cache_max_gb=2.5 * size / (1 << 30))
    cache = MediaCache(settings, tmp_path / "cache")
    first = cache.fetch_blocking(f"{media_server}/clips/1.mp4")
    time.sleep(0.02)
    second = cache.fetch_blocking(f"{media_server}/clips/2.mp4")
    time.sleep(0.02)
    cache.fetch_blocking(f"{media_server}/clips/1.mp4")  # a hit: 1 is now the most recent
    time.sleep(0.02)
    third = cache.fetch_blocking(f"{media_server}/clips/3.mp4")
    assert first.exists() and third.exists() and not second.exists()
    assert cache.fetched == 3 and Media.hits["/clips/1.mp4"] == 1
    with pytest.raises(RemoteFetchError):
        cache.fetch_blocking(f"{media_server}/missing")


def test_a_source_prefix_feeds_the_inbox_of_a_running_daemon(tmp_path, s3_bucket):
    """`daemon.sources`: the real daemon lists an S3 prefix (moto) and takes new meta files once."""
    import os

    import boto3

    from tests.harness import ECHO, DaemonProcess, daemon_config, wait_until

    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.put_object(Bucket="clips", Key="incoming/first.jsonl", Body=b'{"id": 1}\n{"id": 2}\n')
    client.put_object(Bucket="clips", Key="incoming/notes.txt", Body=b"not a meta file")
    config = daemon_config(tmp_path, [ECHO], sources=[{"url": "s3://clips/incoming/", "poll_s": 0.3}])
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    with DaemonProcess(config, env=env) as daemon:
        assert daemon.wait_for_job("first", 60)["state"] == "done"
        client.put_object(Bucket="clips", Key="incoming/second.jsonl", Body=b'{"id": "a"}\n')
        assert daemon.wait_for_job("second", 60)["state"] == "done"
        time.sleep(1.0)  # a few more listings: nothing is taken twice
        assert sorted(p.name for p in (daemon.inbox / ".done").iterdir()) == ["first.jsonl", "second.jsonl"]
        assert [r["id"] for r in daemon.results("first")] == ["1", "2"]
        wait_until(lambda: not any(daemon.inbox.glob("*.jsonl")), 10, "inbox empty", daemon.log)
    taken = json.loads((daemon.outbox / ".reelflow" / "sources.json").read_text())
    assert sorted(taken) == ["s3://clips/incoming/first.jsonl", "s3://clips/incoming/second.jsonl"]
