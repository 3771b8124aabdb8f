"""Near-duplicate removal through the real daemon: `reelflow serve` with CLIPEmbedder ->
NearDuplicateFilter -> a slow Test/Echo, on clips encoded here with near-copies planted among them:
re-encodes (same frames, another bitrate), a crop (a ~5% border cut and scaled back) and a copy
starting two frames later.

Each near-copy is dropped naming the clip it copies; every other clip is kept; the embeddings
dataset holds exactly the kept ids, at the rows their result lines name. Then the same stream
with kill -9 at random moments and restarts: the same decisions. The threshold (0.995) sits
between what the tiny random-weight CLIP gives a near-copy (re-encode and shift > 0.999, crop
0.999) and two different scenes (< 0.97 for these seeds); tests/stages/embedders/test_embedders.py
checks the re-encode and the different scenes.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.harness import DaemonProcess, daemon_config, read_jsonl
from tests.stages.embed_media import drop_first_frames, recrop, reencode, scene
from tests.stages_for_tests import EXTRA_STAGES

SCENES = 8
COPIES = {"c0": "s0", "c3": "s3", "c5": "s5", "k1": "s1", "t4": "s4"}  # near-copy -> original


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dedup-videos")
    for n in range(SCENES):
        scene(folder / f"s{n}.mp4", seed=n)
    for copy, original in COPIES.items():
        plant = {"c": lambda src, dst: reencode(src, dst, "40k"), "k": recrop, "t": drop_first_frames}[copy[0]]
        plant(folder / f"{original}.mp4", folder / f"{copy}.mp4")
    reencode(folder / "s6.mp4", folder / "c6.mp4", "300k")  # for the second job
    scene(folder / "more.mp4", seed=99)
    return folder


def _config(tmp_path, videos, tiny_clip):
    steps = [
        {"type": "VideoEmbedder", "name": "CLIPEmbedder", "config": {"model_path": str(tiny_clip), "num_frames": 4}},
        {"type": "VideoFilter", "name": "NearDuplicateFilter", "config": {"threshold": 0.995, "scope": "outbox"}},
        {"type": "Test", "name": "Echo", "config": {"sleep_s": 0.15}},
    ]
    return daemon_config(tmp_path, steps, meta_folder=videos)


def _meta(tmp_path, names: list[str], job: str = "clips"):
    meta = tmp_path / f"{job}.jsonl"
    meta.write_text("".join(json.dumps({"id": name, "video": f"{name}.mp4"}) + "\n" for name in names))
    return meta


# originals first, each copy after its original (and a few batches later)
STREAM = ["s0", "s1", "s2", "s3", "c0", "s4", "s5", "k1", "c3", "s6", "t4", "s7", "c5"]


def _outcome(outbox, job: str = "clips"):
    results = read_jsonl(outbox / f"{job}.jsonl")
    filtered = read_jsonl(outbox / f"{job}.filtered.jsonl")
    return results, filtered


def _check_contract(outbox, job, results, filtered):
    kept = sorted(r["id"] for r in results)
    assert len(kept) == len(set(kept)), "an id in the results twice"
    dropped = {f["id"]: f for f in filtered}
    assert len(dropped) == len(filtered), "an id in the filtered file twice"
    table = pq.read_table(outbox / f"{job}.embeddings.parquet")
    ids = table.column("id").to_pylist()
    assert sorted(ids) == kept  # no id twice, none missing
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for line in results:
        assert ids[line["embedding_index"]] == line["id"]
        assert "embedding" not in line and not any(k.startswith("_clip") for k in line)
    return kept, dropped


def test_reencodes_are_dropped_naming_the_original_and_other_clips_kept(tmp_path, videos, tiny_clip, monkeypatch):
    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", EXTRA_STAGES)
    config = _config(tmp_path, videos, tiny_clip)
    with DaemonProcess(config) as daemon:
        daemon.drop(_meta(tmp_path, STREAM))
        assert daemon.wait_for_job("clips", 240)["state"] == "done"
        results, filtered = _outcome(daemon.outbox)
        kept, dropped = _check_contract(daemon.outbox, "clips", results, filtered)
        assert kept == sorted(n for n in STREAM if n not in COPIES)
        assert sorted(dropped) == sorted(COPIES)
        for copy, original in COPIES.items():
            entry = dropped[copy]
            assert entry["scores"]["duplicate_of"] == original, entry
            assert entry["scores"]["similarity"] >= 0.995 and "duplicate_of_job" not in entry["scores"]
            assert repr(original) in entry["reason"] and entry["step"].startswith("step_1")
        assert not read_jsonl(daemon.outbox / "clips.errors.jsonl")
        # scope: outbox: a later job's copy of a clip kept by the first job is dropped, naming that job
        daemon.drop(_meta(tmp_path, ["c6", "more"], job="later"), "later.jsonl")
        assert daemon.wait_for_job("later", 240)["state"] == "done"
        results, filtered = _outcome(daemon.outbox, "later")
        assert [r["id"] for r in results] == ["more"]
        [entry] = filtered
        assert entry["id"] == "c6" and entry["scores"]["duplicate_of"] == "s6"
        assert entry["scores"]["duplicate_of_job"] == "clips" and "'clips'" in entry["reason"]


def test_kill_9_mid_run_then_restart_keeps_and_drops_the_same(tmp_path, videos, tiny_clip, monkeypatch):
    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", EXTRA_STAGES)
    config = _config(tmp_path, videos, tiny_clip)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    daemon = DaemonProcess(config).start()
    daemon.drop(_meta(tmp_path, STREAM))
    kills = 0
    for _ in range(3):
        # kill once some records are through (so decisions and rows exist), before the job is done
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_jsonl(daemon.outbox / "clips.jsonl")) < 2 + 2 * kills:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        state = daemon.job_state("clips")
        if state and state["state"] == "done":
            break
        daemon.kill()
        kills += 1
        daemon = DaemonProcess(config).start()
    assert daemon.wait_for_job("clips", 240)["state"] == "done"
    daemon.stop()
    context = f"(seed {seed}, {kills} kills)"
    results, filtered = _outcome(daemon.outbox)
    kept, dropped = _check_contract(daemon.outbox, "clips", results, filtered)
    assert kept == sorted(n for n in STREAM if n not in COPIES), context
    assert {k: v["scores"]["duplicate_of"] for k, v in dropped.items()} == COPIES, context
    assert not read_jsonl(daemon.outbox / "clips.errors.jsonl"), context
    assert kills >= 1, f"the job finished before the first kill {context}"
