"""Clip windows: FrameSampler, VideoProbe and the captioners' shared sampling read only the frames
of a record's `clip` (as ShotSplitter writes it) while `video_key` still names the whole source."""

from __future__ import annotations

import pytest

from stages.base import StageError
from stages.video.frames import clip_window, sample_frames
from stages.video.probe import VideoProbe
from stages.video.sampler import FrameSampler, FrameSamplerConfig
from tests.stages.captioners.conftest import make_captioner, tiny_models  # noqa: F401 (fixtures used below)
from tests.stages.clip_media import child, clip, numbered

pytestmark = pytest.mark.timeout(120)

FPS = 12


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # 60 frames, a keyframe every 24: windows start between keyframes, so seeking is exercised.
    return numbered(tmp_path_factory.mktemp("windows") / "numbered.mp4", frames=60, fps=FPS, gop=24)


@pytest.mark.parametrize("mode", [{"num_frames": 6}, {"fps": 6.0}, {"fps": 12.0}])
def test_frame_sampler_samples_only_inside_the_window(source, tmp_path, mode):
    window = clip(1, start_frame=17, num_frames=20, fps=FPS)  # [1.4167 s, 3.0833 s)
    stage = FrameSampler(FrameSamplerConfig(**mode))
    out = stage.process([stage.prepare(child(source, tmp_path, window))])[0]

    indices = out["frame_indices"]
    assert indices and all(17 <= i < 37 for i in indices), indices
    if mode.get("fps") == 12.0:
        assert indices == list(range(17, 37))  # every frame of the clip, none outside
    sampled = sample_frames(source, **mode, window=clip_window(child(source, tmp_path, window)))
    assert all(window["start_s"] - 1e-6 <= t < window["end_s"] for t in sampled.timestamps_s), sampled.timestamps_s
    # The frames really are those frames (each frame's grey level is 4 x its number).
    levels = [round(float(frame.mean()) / 4) for frame in sampled.frames]
    assert levels == sampled.indices
    assert sampled.total_frames == 20 and sampled.first_frame == 17


def test_seconds_only_window_rounds_to_frames(source, tmp_path):
    # A clip given in seconds with 3 decimals (no frame numbers): 1.417 s is frame 17 (17/12 = 1.41667).
    record = child(source, tmp_path, {"start_s": 1.417, "end_s": 3.083})
    sampled = sample_frames(source, fps=12.0, window=clip_window(record))
    assert sampled.indices == list(range(17, 37))


def test_clip_file_means_the_file_is_the_clip(source, tmp_path):
    record = child(source, tmp_path, clip(0, 17, 20, FPS), clip_file=True)
    assert clip_window(record) is None
    stage = FrameSampler(FrameSamplerConfig(fps=12.0))
    assert stage.prepare(record)["frame_indices"] == list(range(60))


def test_a_window_outside_the_video_is_a_clear_error(source, tmp_path):
    stage = FrameSampler(FrameSamplerConfig(num_frames=4))
    with pytest.raises(StageError) as caught:
        stage.prepare(child(source, tmp_path, clip(3, start_frame=50, num_frames=30, fps=FPS)))
    assert caught.value.error_type == "BadClip"
    assert "numbered.mp4" in caught.value.message and "60 frames" in caught.value.message
    with pytest.raises(StageError, match="numeric start_s and end_s"):
        stage.prepare(child(source, tmp_path, {"start_s": "soon"}))


def test_video_probe_reports_the_clip(source, tmp_path):
    stage = VideoProbe(VideoProbe.Config())
    whole, part = stage.process([child(source, tmp_path, None), child(source, tmp_path, clip(1, 17, 20, FPS))])
    assert whole["probe"]["num_frames"] == 60 and whole["probe"]["duration_s"] == 5.0
    assert part["probe"]["num_frames"] == 20 and part["probe"]["duration_s"] == round(20 / FPS, 3)
    assert part["probe"]["width"] == 96 and part["probe"]["codec"] == "h264"


def test_captioner_samples_inside_the_window(source, tmp_path, make_captioner):  # noqa: F811
    from stages.captioners.common import FRAME_TIMES

    window = clip(2, start_frame=24, num_frames=24, fps=FPS)  # [2 s, 4 s)
    stage = make_captioner("qwen2_vl", num_frames=4)
    prepared = stage.prepare(child(source, tmp_path, window))
    times = prepared[FRAME_TIMES]
    assert len(times) == 4 and all(2.0 <= t < 4.0 for t in times), times
    whole = stage.prepare(child(source, tmp_path, None))[FRAME_TIMES]
    assert min(whole) < 2.0 and max(whole) >= 4.0, whole  # without the window it spans the file
    caption = stage.process([prepared])[0]
    assert isinstance(caption["text"], str)
    # fps sampling counts the clip's length, not the file's, against the frame budget.
    stage_fps = make_captioner("qwen2_vl", fps=2.0)
    times = stage_fps.prepare(child(source, tmp_path, window))[FRAME_TIMES]
    assert times and all(2.0 <= t < 4.0 for t in times), times
