"""The daemon's inbox run (good rows, odd videos, broken videos, broken and unsupported files)
gives the same outcome with `workers: {backend: ray}` on a local cluster as with local workers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import DaemonProcess, metric_value, write_config

pytestmark = pytest.mark.ray

GOOD = ["bunny", "bikes", "h264", "sparse_gop", "vp9_webm", "mpeg4_avi", "mkv", "rotated"]
BROKEN = ["truncated", "empty", "garbage", "audio_only"]


def inbox_rows(videos: dict[str, Path]) -> list[dict]:
    rows = [{"id": key, "video": videos[key].name} for key in GOOD + BROKEN if key in videos]
    rows.append({"id": "missing", "video": "no_such_file.mp4"})
    rows.append({"id": "no_video_field", "caption": "a row without its video"})
    rows.append({"id": "bunny", "video": videos["bunny"].name})  # duplicate id
    return rows


def config(folder: Path, videos: dict[str, Path], workers: dict | None) -> Path:
    text = {
        "meta_folder": str(next(iter(videos.values())).parent),
        "steps": [
            {"type": "VideoProcessor", "name": "VideoProbe", "config": {"batch_size": 4}},
            {
                "type": "VideoProcessor",
                "name": "FrameSampler",
                "config": {"batch_size": 2, "num_frames": 3, "max_side": 64},
            },
        ],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 100, "rescan_s": 1, "metrics": {"port": 0}},
    }
    if workers:
        text["workers"] = workers
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, text)


def run_inbox(folder: Path, videos: dict[str, Path], workers: dict | None, env: dict | None = None):
    rows = inbox_rows(videos)
    with DaemonProcess(config(folder, videos, workers), env=env) as daemon:
        daemon.drop_text("clips.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        daemon.drop_text("broken.jsonl", "{not json at all\n")
        daemon.drop_text("notes.txt", "not a meta file")
        state = daemon.wait_for_job("clips", timeout=120)
        broken = daemon.wait_for_job("broken", timeout=30)["state"], [e["error"] for e in daemon.errors("broken")]
        results, errors = daemon.results("clips"), daemon.errors("clips")
        metrics = daemon.metrics()
    return rows, state, results, errors, metrics, daemon, broken


def outcome(results: list[dict], errors: list[dict]) -> dict:
    """What happened to each row, in a form both backends must agree on."""
    done = {r["id"]: ("ok", r["probe"]["num_frames"], r["frame_indices"]) for r in results}
    failed = Counter((e["id"], e["row"], e["step"], e["error"]) for e in errors)
    return {"results": done, "errors": failed}


def test_inbox_run_on_ray_matches_local(tmp_path, videos, ray_cluster):
    local = run_inbox(tmp_path / "local", videos, None)
    # Both steps share the two (logical) GPUs, half a GPU per actor: one actor per GPU and step.
    workers = ray_cluster.workers_section(num_gpus=0.5)
    remote = run_inbox(tmp_path / "ray", videos, workers, env={"RAY_AUTH_MODE": "disabled"})
    rows, state, results, errors, metrics, daemon, broken = remote

    assert state["state"] == "done"
    # every row ends exactly once, in results or in errors; nothing twice
    assert len(results) + len(errors) == len(rows)
    assert len({r["id"] for r in results}) == len(results)
    assert outcome(results, errors) == outcome(local[2], local[3])
    assert {r["id"] for r in results} >= {"bunny", "bikes", "h264", "vp9_webm"}
    for result in results:
        frames = [daemon.outbox / p for p in result["frames"]]
        assert frames and all(f.is_file() and f.stat().st_size > 0 for f in frames)
    # the broken meta file ends as the local run ends it; the unsupported file is refused
    assert broken == local[-1] and broken[1]
    assert (daemon.inbox / ".failed" / "notes.txt").is_file()

    # the workers were Ray actors: one per (logical) GPU for each step, placed and alive
    for step in ("step_0_VideoProcessor_VideoProbe", "step_1_VideoProcessor_FrameSampler"):
        for n in range(2):
            name = f"reelflow:{step}:{n}"
            assert metric_value(metrics, "reelflow_worker_state", step=step, worker=name, state="alive") == 1
        assert "reelflow_worker_info{" in metrics and 'backend="ray"' in metrics
        assert metric_value(metrics, "reelflow_records_total", step=step, status="ok") > 0
    assert 'gpus="0"' in metrics and 'gpus="1"' in metrics
