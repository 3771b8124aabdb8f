"""Shard sinks and remote media, each against the plain way of doing the same work.

    python bench/shards.py                  # both parts
    python bench/shards.py --part shards --results 10000
    python bench/shards.py --part remote --clips 1000

shards: WebDataset shards from the same results (a clip file, the result json and a caption
per sample) written by reelflow's ShardSink (following the results file; .tmp + fsync +
rename + the shards.jsonl index: the exactly-once bookkeeping) against a plain loop over the
same lines with `webdataset.ShardWriter`. Prints ratio = sink throughput / ShardWriter
throughput (goal >= 0.95). Both write the same samples (checked).

remote: reading clips from an HTTP server on 127.0.0.1 that answers each request after a
fixed latency (as a remote store does), through reelflow's MediaCache with `max_in_flight`
fetches at once, against fetching them one after another. Prints ratio = cached / sequential
throughput (goal >= 4 with 8 in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.config import RemoteSection, WebDatasetOutput  # noqa: E402
from daemon.io.remote import MediaCache  # noqa: E402
from daemon.io.sinks import ShardSink, sample_key  # noqa: E402
from tests.harness import sample_video  # noqa: E402


def make_results(folder: Path, count: int) -> Path:
    clips = folder / "media"
    clips.mkdir(parents=True)
    source = sample_video("bikes.mp4").read_bytes()[: 64 * 1024]  # 64 kB "clips": the write path, not the disk
    results = folder / "results.jsonl"
    with results.open("w") as out:
        for n in range(count):
            clip = clips / f"c{n:05d}.mp4"
            clip.write_bytes(source)
            out.write(json.dumps({"id": f"clip{n:05d}", "video": f"media/{clip.name}", "text": f"caption {n}"}) + "\n")
    return results


def bench_sink(folder: Path, results: Path, per_shard: int) -> tuple[float, int]:
    spec = WebDatasetOutput(format="webdataset", path=folder / "sink", shard_max_samples=per_shard)
    sink = ShardSink(spec, "bench", results, results.parent, "video", "text")
    started = time.perf_counter()
    sink.open()
    sink.finish()
    return time.perf_counter() - started, sink.written_shards


def bench_shardwriter(folder: Path, results: Path, per_shard: int) -> tuple[float, int]:
    import webdataset as wds

    out = folder / "plain"
    out.mkdir()
    started = time.perf_counter()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        with results.open("rb") as lines:
            for raw in lines:
                line = json.loads(raw)
                writer.write(
                    {
                        "__key__": sample_key(line["id"]),
                        "mp4": (results.parent / line["video"]).read_bytes(),
                        "json": raw.rstrip(b"\n"),
                        "txt": line["text"],
                    }
                )
        shards = writer.shard
    return time.perf_counter() - started, shards


def part_shards(count: int, rounds: int) -> dict:
    import webdataset as wds

    sink_best = plain_best = float("inf")
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            results = make_results(folder, count)
            plain_s, _ = bench_shardwriter(folder, results, 1000)
            sink_s, shards = bench_sink(folder, results, 1000)
            sink_keys = sorted(s["__key__"] for s in wds.WebDataset(sorted(map(str, (folder / "sink").rglob("*.tar")))))
            plain_keys = sorted(
                s["__key__"] for s in wds.WebDataset(sorted(map(str, (folder / "plain").glob("*.tar"))))
            )
            assert sink_keys == plain_keys and len(sink_keys) == count, "the two sides wrote different samples"
        sink_best, plain_best = min(sink_best, sink_s), min(plain_best, plain_s)
    return {
        "part": "shards",
        "results": count,
        "shards": shards,
        "sink_samples_per_s": round(count / sink_best, 1),
        "shardwriter_samples_per_s": round(count / plain_best, 1),
        "ratio": round(plain_best / sink_best, 3),
    }


class Slow(BaseHTTPRequestHandler):
    latency_s = 0.02
    body = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(self.latency_s)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def serve(latency_s: float) -> None:
    """The media server, in its own process so it does not share this one's GIL with the client."""
    Slow.latency_s = latency_s
    Slow.body = sample_video("bikes.mp4").read_bytes()[: 256 * 1024]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def part_remote(clips: int, in_flight: int, latency_s: float) -> dict:
    import subprocess

    server = subprocess.Popen([sys.executable, __file__, "--serve", str(latency_s)], stdout=subprocess.PIPE, text=True)
    body_size = len(sample_video("bikes.mp4").read_bytes()[: 256 * 1024])
    try:
        base = f"http://127.0.0.1:{int(server.stdout.readline())}"
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            for n in range(clips):
                with urllib.request.urlopen(f"{base}/seq/{n}.mp4", timeout=30) as response:
                    (Path(tmp) / f"{n}.mp4").write_bytes(response.read())
            sequential_s = time.perf_counter() - started

            cache = MediaCache(RemoteSection(allow=[base], max_in_flight=in_flight), Path(tmp) / "cache")

            async def fetch_all():
                return await asyncio.gather(*(cache.fetch(f"{base}/cached/{n}.mp4") for n in range(clips)))

            started = time.perf_counter()
            paths = asyncio.run(fetch_all())
            cached_s = time.perf_counter() - started
            cache.close()
            assert len(set(paths)) == clips and all(p.stat().st_size == body_size for p in paths)
    finally:
        server.kill()
        server.wait()
    return {
        "part": "remote",
        "clips": clips,
        "in_flight": in_flight,
        "latency_ms": latency_s * 1000,
        "cached_clips_per_s": round(clips / cached_s, 1),
        "sequential_clips_per_s": round(clips / sequential_s, 1),
        "ratio": round(sequential_s / cached_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["shards", "remote", "both"], default="both")
    parser.add_argument("--results", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=50.0)  # an object store's first byte
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)  # internal: run the media server
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    if args.part in ("shards", "both"):
        print(json.dumps(part_shards(args.results, args.rounds)))
    if args.part in ("remote", "both"):
        print(json.dumps(part_remote(args.clips, args.in_flight, args.latency_ms / 1000)))


if __name__ == "__main__":
    main()
