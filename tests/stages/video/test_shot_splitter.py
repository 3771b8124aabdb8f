"""ShotSplitter on videos encoded here with planted hard cuts at known frames (real
scenedetect, real PyAV), and its children through the engine: fan-out, filtered, resume."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from daemon.config import ConfigError, parse_config
from daemon.io.outbox import OutboxLayout
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from stages.video.shot_splitter import ShotSplitter, ShotSplitterConfig, plan_clips
from tests.harness import read_jsonl
from tests.stages.clip_media import texture, write_video

pytest.importorskip("scenedetect")
pytestmark = pytest.mark.timeout(180)

FPS = 25


def shots_video(path, lengths, size=(160, 96), fade=0):
    """Shots of `lengths` frames, each a different moving texture; a `fade` > 0 blends the
    first two shots over that many frames instead of cutting."""
    width, height = size
    images = []
    for shot, length in enumerate(lengths):
        wide = texture(width + 2 * length, height, seed=10 + shot)
        tint = np.array([(shot * 70) % 256, (shot * 130 + 40) % 256, (shot * 50 + 90) % 256], np.uint8)
        frames = [(wide[:, 2 * n : 2 * n + width] // 2 + tint // 2) for n in range(length)]
        if fade and shot == 1:
            previous = images[-fade:]
            for n in range(fade):
                alpha = (n + 1) / (fade + 1)
                images[-fade + n] = (previous[n] * (1 - alpha) + frames[n] * alpha).astype(np.uint8)
            frames = frames[fade:]
        images.extend(frames)
    return write_video(path, images, fps=FPS)


def split(path, **config):
    stage = ShotSplitter(ShotSplitterConfig(**config), "cpu")
    stage.load()
    record = {"id": "v", "video": path, "_job": "j"}
    return stage.process([stage.prepare(record)])[0]


def test_hard_cuts_are_found_on_the_exact_frame(tmp_path):
    rng = random.Random(7)
    lengths = [rng.randint(30, 60) for _ in range(4)]
    video = shots_video(tmp_path / "cuts.mp4", lengths)
    children = split(video, min_clip_s=0.5)
    starts = [c["clip"]["start_frame"] for c in children]
    expected = [sum(lengths[:k]) for k in range(len(lengths))]
    assert starts == expected
    assert [c["clip"]["num_frames"] for c in children] == lengths
    first = children[1]["clip"]
    assert first["start_s"] == pytest.approx(expected[1] / FPS) and first["fps"] == pytest.approx(FPS)
    assert children[0]["source_id"] == "v" and str(children[0]["source_video"]) == str(video)
    assert [c["clip"]["index"] for c in children] == list(range(len(lengths)))


def test_a_fade_is_one_cut_or_none(tmp_path):
    video = shots_video(tmp_path / "fade.mp4", [50, 50], fade=20)
    children = split(video, min_clip_s=0.2)
    assert len(children) in (1, 2)


def test_max_clip_s_pieces_tile_the_shot_exactly(tmp_path):
    video = shots_video(tmp_path / "long.mp4", [110])
    children = split(video, max_clip_s=1.0, min_clip_s=0.2)
    clips = [c["clip"] for c in children]
    assert clips[0]["start_frame"] == 0 and clips[-1]["end_frame"] == 110
    assert all(a["end_frame"] == b["start_frame"] for a, b in zip(clips, clips[1:], strict=False))
    assert all(c["num_frames"] <= FPS for c in clips) and len(clips) == 5


def test_short_shots_dropped_or_merged_and_stride():
    config = ShotSplitterConfig(min_clip_s=1.0)
    assert plan_clips([50, 60], 120, 25.0, config) == [(0, 50), (60, 120)]  # 10 frames < 1 s: dropped
    merged = ShotSplitterConfig(min_clip_s=1.0, merge_short=True)
    assert plan_clips([50, 60], 120, 25.0, merged) == [(0, 60), (60, 120)]
    assert plan_clips([10], 120, 25.0, merged) == [(0, 120)]  # a short first shot joins the next
    stride = ShotSplitterConfig(detector="stride", stride_s=2.0, min_clip_s=0.5)
    assert plan_clips([], 120, 25.0, stride) == [(0, 50), (50, 100), (100, 120)]


def test_a_video_with_no_clip_long_enough_is_filtered(tmp_path):
    video = shots_video(tmp_path / "short.mp4", [12])
    from stages.base import Filtered

    out = split(video, min_clip_s=1.0)
    assert isinstance(out, Filtered) and "min_clip_s=1.0" in out.reason and out.scores["num_frames"] == 12


def test_bad_settings_are_refused_at_check():
    for settings, named in (("{detector: x}", "detector"), ("{min_clip_s: 40, max_clip_s: 30}", "min_clip_s")):
        with pytest.raises(ConfigError) as refused:
            parse_config(f"steps: [{{type: VideoProcessor, name: ShotSplitter, config: {settings}}}]")
        assert named in str(refused.value)


def run_engine(tmp_path, rows, steps):
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config(json.dumps({"steps": steps, "meta_folder": str(tmp_path)}))

    async def main():
        engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics())
        await engine.start()
        try:
            return await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
        finally:
            await engine.stop()

    return asyncio.run(main())


SPLIT_THEN_PROBE = [
    {"type": "VideoProcessor", "name": "ShotSplitter", "config": {"min_clip_s": 0.5}},
    {"type": "VideoProcessor", "name": "VideoProbe"},
]


def test_children_flow_through_later_steps_and_every_row_ends_once(tmp_path):
    shots_video(tmp_path / "a.mp4", [30, 40, 35])
    shots_video(tmp_path / "b.mp4", [8])  # too short: filtered
    rows = [{"id": "a", "video": "a.mp4"}, {"id": "b", "video": "b.mp4"}, {"id": "c", "video": "missing.mp4"}]
    run = run_engine(tmp_path, rows, SPLIT_THEN_PROBE)
    out = tmp_path / "out"
    results = read_jsonl(out / "m.jsonl")
    filtered = read_jsonl(out / "m.filtered.jsonl")
    errors = read_jsonl(out / "m.errors.jsonl")
    assert [r["id"] for r in results] == ["a:0000", "a:0001", "a:0002"]
    assert [r["clip"]["num_frames"] for r in results] == [30, 40, 35]
    assert [r["probe"]["num_frames"] for r in results] == [30, 40, 35]  # the probe read each clip's window
    assert [f["id"] for f in filtered] == ["b"] and filtered[0]["step"].endswith("ShotSplitter")
    assert "min_clip_s" in filtered[0]["reason"] and filtered[0]["record"]["video"] == "b.mp4"
    assert [e["id"] for e in errors] == ["c"]
    assert (run.ok, run.errors, run.filtered, run.expanded) == (3, 1, 1, 1)
    step_file = next((out / "intermediate" / "m").glob("step_0_*ShotSplitter*.jsonl"))
    parents = [line for line in read_jsonl(step_file) if "_children" in line]
    assert len(parents) == 1 and parents[0]["_children"] == ["a:0000", "a:0001", "a:0002"]

    # a rerun over the same outbox writes nothing again and does not split `a` again
    again = run_engine(tmp_path, rows, SPLIT_THEN_PROBE)
    assert (again.ok, again.errors, again.filtered) == (0, 0, 0)
    assert len(read_jsonl(out / "m.jsonl")) == 3
    assert len([line for line in read_jsonl(step_file) if "_children" in line]) == 1


def test_a_parent_half_done_yields_only_its_missing_children(tmp_path):
    shots_video(tmp_path / "a.mp4", [30, 40, 35])
    rows = [{"id": "a", "video": "a.mp4"}]
    run_engine(tmp_path, rows, SPLIT_THEN_PROBE)
    results = tmp_path / "out" / "m.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(lines[0] + lines[2])  # as if a crash came before a:0001 was written
    again = run_engine(tmp_path, rows, SPLIT_THEN_PROBE)
    assert again.ok == 1
    assert sorted(r["id"] for r in read_jsonl(results)) == ["a:0000", "a:0001", "a:0002"]


def test_kill_9_while_splitting_then_restart_every_clip_exactly_once(tmp_path, monkeypatch):
    """The real daemon (ShotSplitter -> a slow Echo), SIGKILLed at random moments, restarted."""
    import time

    from tests.harness import DaemonProcess, daemon_config
    from tests.stages_for_tests import EXTRA_STAGES

    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", EXTRA_STAGES)  # Test/Echo
    videos = tmp_path / "videos"
    videos.mkdir()
    lengths = {f"v{n}": [30 + 5 * n, 40, 28 + n] for n in range(6)}
    for name, shots in lengths.items():
        shots_video(videos / f"{name}.mp4", shots)
    expected = sorted(f"{name}:{k:04d}" for name, shots in lengths.items() for k in range(len(shots)))
    config = daemon_config(
        tmp_path,
        [
            {"type": "VideoProcessor", "name": "ShotSplitter", "config": {"min_clip_s": 0.5}},
            {"type": "Test", "name": "Echo", "config": {"sleep_s": 0.05}},
        ],
        meta_folder=videos,
    )
    meta = tmp_path / "clips.jsonl"
    meta.write_text("".join(json.dumps({"id": name, "video": f"{name}.mp4"}) + "\n" for name in lengths))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    daemon = DaemonProcess(config).start()
    daemon.drop(meta)
    kills = 0
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.5))
        state = daemon.job_state("clips")
        if state and state["state"] == "done":
            break
        daemon.kill()
        kills += 1
        daemon = DaemonProcess(config).start()
    assert daemon.wait_for_job("clips", 180)["state"] == "done"
    daemon.stop()
    context = f"(seed {seed}, {kills} kills)"
    results = [r["id"] for r in read_jsonl(daemon.outbox / "clips.jsonl")]
    assert sorted(results) == expected, context  # every clip, none twice
    assert not read_jsonl(daemon.outbox / "clips.errors.jsonl"), context
    step_file = next((daemon.outbox / "intermediate" / "clips").glob("step_0_*.jsonl"))
    parents = [line["id"] for line in read_jsonl(step_file) if "_children" in line]
    # a parent is split again after a kill only if some of its clips had not ended yet
    assert set(parents) == set(lengths), context
