"""Shard sinks (`daemon.outputs`): WebDataset tars and Parquet files built from the results,
read back with the real `webdataset` library and pyarrow; exactly once across kill -9."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from daemon.config import parse_config
from daemon.io.outbox import OutboxLayout
from daemon.io.sinks import sample_key
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from tests.harness import ECHO, DaemonProcess, daemon_config, read_jsonl, wait_until

pytestmark = pytest.mark.timeout(240)


def read_shards(folder):
    """Every sample of every listed shard, through webdataset, as (key, sample)."""
    index = read_jsonl(folder / "shards.jsonl")
    urls = [str(folder / entry["file"]) for entry in index]
    samples = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
    return index, samples


def test_sample_keys_are_injective_and_dot_free():
    ids = ["a.b", "a_b", "a/b", "cam:1", "x", "x" * 300, "x" * 300 + "y"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all("." not in k and "/" not in k for k in keys)
    assert sample_key("cam:0001") == "cam:0001"  # a safe id keeps its name


async def test_webdataset_and_parquet_from_one_job(tmp_path):
    meta = tmp_path / "m.jsonl"
    (tmp_path / "media").mkdir()
    rows = []
    for n in range(23):
        clip = tmp_path / "media" / f"c{n}.mp4"
        clip.write_bytes(b"fake mp4 %d" % n)
        rows.append({"id": f"r.{n}", "text": f"caption {n}", "video": str(clip)})
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config(
        f"""
steps: [{{type: Test, name: Echo}}]
daemon:
  outputs:
    - {{format: webdataset, path: {tmp_path}/wds, shard_max_samples: 5}}
    - {{format: parquet, path: {tmp_path}/pq, rows_per_file: 10}}
"""
    )
    engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics())
    await engine.start()
    try:
        run = await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
    finally:
        await engine.stop()
    assert run.ok == 23

    index, samples = read_shards(tmp_path / "wds" / "m")
    assert [e["samples"] for e in index] == [5, 5, 5, 5, 3]
    assert sorted(i for e in index for i in e["ids"]) == sorted(r["id"] for r in rows)
    assert len(samples) == 23
    by_key = {s["__key__"]: s for s in samples}
    sample = by_key[sample_key("r.7")]
    assert sample["txt"] == b"caption 7" and sample["mp4"] == b"fake mp4 7"
    assert json.loads(sample["json"])["id"] == "r.7"
    assert all(e["bytes"] == (tmp_path / "wds" / "m" / e["file"]).stat().st_size for e in index)
    assert not list((tmp_path / "wds").rglob("*.tmp"))

    files = sorted((tmp_path / "pq" / "m").glob("part-*.parquet"))
    assert len(files) == 3
    tables = [pq.read_table(f) for f in files]
    assert len({t.schema for t in tables}) == 1  # one schema for every file
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert tables[0].column("text").to_pylist()[0] == "caption 0"


async def test_bucket_by_duration_writes_separate_series(tmp_path):
    meta = tmp_path / "m.jsonl"
    rows = [{"id": n, "clip": {"start_s": 0, "end_s": 3 if n % 2 else 12}} for n in range(8)]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config(
        f"""
steps: [{{type: Test, name: Echo}}]
daemon:
  outputs: [{{format: webdataset, path: {tmp_path}/wds, shard_max_samples: 3, bucket_by: [duration],
             fields: [json, clip]}}]
"""
    )
    engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics())
    await engine.start()
    try:
        await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
    finally:
        await engine.stop()
    index, samples = read_shards(tmp_path / "wds" / "m")
    buckets = {e["bucket"]: [] for e in index}
    for e in index:
        buckets[e["bucket"]].extend(e["ids"])
    assert sorted(buckets["0-5s"], key=int) == ["1", "3", "5", "7"]
    assert sorted(buckets["10-30s"], key=int) == ["0", "2", "4", "6"]
    assert all(e["file"].startswith(e["bucket"] + "/") for e in index)
    assert all("clip.json" in s for s in samples) and len(samples) == 8


def test_kill_9_while_sharding_then_restart_every_sample_once(tmp_path):
    """The real daemon, killed with SIGKILL at random moments while shards are being written."""
    rows = 400
    config = daemon_config(
        tmp_path,
        [{**ECHO, "config": {"sleep_s": 0.004, "batch_size": 4}}],
        outputs=[{"format": "webdataset", "path": "shards", "shard_max_samples": 7}],
    )
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    meta = tmp_path / "rows.jsonl"
    meta.write_text("".join(json.dumps({"id": f"k{n}", "text": f"t{n}"}) + "\n" for n in range(rows)))
    shard_folder = tmp_path / "shards" / "rows"
    kills = 0
    daemon = DaemonProcess(config).start()
    daemon.drop(meta)
    results = daemon.outbox / "rows.jsonl"
    for _ in range(3):
        wait_until(lambda: len(read_jsonl(results)) > 0, 60, "first results", daemon.log)
        time.sleep(rng.uniform(0.2, 1.2))
        if daemon.job_state("rows") and daemon.job_state("rows")["state"] == "done":
            break
        daemon.kill()
        kills += 1
        daemon = DaemonProcess(config).start()
    state = daemon.wait_for_job("rows", 180)
    daemon.stop()
    context = f"(seed {seed}, {kills} kills)"
    assert state["state"] == "done", context
    index, samples = read_shards(shard_folder)
    listed = [i for e in index for i in e["ids"]]
    twice = sorted(i for i, n in Counter(listed).items() if n > 1)
    missing = sorted({f"k{n}" for n in range(rows)} - set(listed))
    context += f" twice: {twice}, missing: {missing}, shards: {[(e['file'], e['samples']) for e in index]}"
    assert sorted(listed) == sorted(f"k{n}" for n in range(rows)), context  # none missing, none twice
    assert sorted(s["__key__"] for s in samples) == sorted(listed), context
    assert all(s["txt"] == f"t{s['__key__'][1:]}".encode() for s in samples), context
    assert not list(shard_folder.rglob("*.tmp")), context
    on_disk = sorted(p.relative_to(shard_folder).as_posix() for p in shard_folder.rglob("*.tar"))
    assert on_disk == sorted(e["file"] for e in index), context


def test_oneshot_honours_outputs(tmp_path):
    from tests.harness import run_oneshot, write_config

    meta = tmp_path / "in.jsonl"
    meta.write_text("".join(json.dumps({"id": n, "text": f"t{n}"}) + "\n" for n in range(12)))
    config = write_config(
        tmp_path,
        {
            "meta_path": str(meta),
            "base_folder": str(tmp_path / "work"),
            "save_folder": str(tmp_path / "save"),
            "steps": [ECHO],
            "daemon": {"outputs": [{"format": "parquet", "path": str(tmp_path / "pq"), "rows_per_file": 5}]},
        },
    )
    result = run_oneshot(config)
    assert result.returncode == 0, result.stderr + result.stdout
    files = sorted((tmp_path / "pq" / "in").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [5, 5, 2]


def test_a_bad_output_spec_is_refused_with_its_key_path():
    from daemon.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        parse_config("steps: [{type: Test, name: Echo}]\ndaemon:\n  outputs: [{format: tfrecord, path: x}]\n")
    assert "daemon.outputs" in str(refused.value) and "webdataset" in str(refused.value)


def test_asyncio_is_not_left_with_tasks(tmp_path):
    """The follower task is owned by the job's sinks and ends with it."""

    async def main():
        meta = tmp_path / "m.jsonl"
        meta.write_text("".join(json.dumps({"id": n}) + "\n" for n in range(3)))
        config = parse_config(
            f"steps: [{{type: Test, name: Echo}}]\ndaemon:\n  outputs: [{{format: parquet, path: {tmp_path}/pq}}]\n"
        )
        engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics())
        await engine.start()
        try:
            await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
        finally:
            await engine.stop()
        return [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert [n for n in asyncio.run(main()) if n.startswith("sinks-")] == []
