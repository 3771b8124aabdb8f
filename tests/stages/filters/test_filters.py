"""MotionFilter (real OpenCV on encoded stills and pans) and PropertyFilter (record fields or probing)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.base import Filtered, StageError
from stages.filters.motion import MotionFilter
from stages.filters.properties import PropertyFilter
from stages.registry import stage_class
from tests.stages.clip_media import child, clip, pan, still, texture, write_video

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    base = texture(96 + 24 * 4, 64, seed=3)
    # 24 still frames, then 24 frames panning 4 px a frame: two shots in one file.
    half = [base[:, :96].copy() for _ in range(24)] + [base[:, 4 * n : 4 * n + 96].copy() for n in range(24)]
    return {
        "still": still(root / "still.mp4"),
        "pan": pan(root / "pan.mp4", step=4),
        "slow": pan(root / "slow.mp4", step=1),
        "halves": write_video(root / "halves.mp4", half, fps=12),
    }


def motion(**config) -> MotionFilter:
    stage = stage_class("VideoFilter", "MotionFilter")(MotionFilter.Config(**config))
    stage.load()
    return stage


@pytest.mark.parametrize("method", ["farneback", "diff"])
def test_still_scores_about_zero_and_a_pan_scores_high(videos, tmp_path, method):
    stage = motion(method=method)
    still_out, slow_out, pan_out = stage.process([child(videos[k], tmp_path, None) for k in ("still", "slow", "pan")])
    assert still_out["motion_score"] < 0.1
    assert pan_out["motion_score"] > slow_out["motion_score"] > 10 * max(still_out["motion_score"], 0.01)
    if method == "farneback":  # pixels per frame at the analysis size: the pan's own speeds
        assert 3.0 < pan_out["motion_score"] < 5.0 and 0.5 < slow_out["motion_score"] < 1.5


def test_min_and_max_score_filter_with_the_score_in_the_reason(videos, tmp_path):
    stage = motion(min_score=0.5, max_score=2.0)
    still_out, slow_out, pan_out = stage.process([child(videos[k], tmp_path, None) for k in ("still", "slow", "pan")])
    assert isinstance(still_out, Filtered) and "below min_score 0.5" in still_out.reason
    assert still_out.scores["motion_score"] < 0.1 and "motion_score" in still_out.reason
    assert isinstance(pan_out, Filtered) and "above max_score 2" in pan_out.reason
    assert set(slow_out) == {"motion_score"}


def test_the_clip_window_is_scored_not_the_file(videos, tmp_path):
    stage = motion(min_score=1.0)
    still_shot, moving_shot = stage.process(
        [
            child(videos["halves"], tmp_path, clip(0, 0, 24, 12), rid="h:0000"),
            child(videos["halves"], tmp_path, clip(1, 24, 24, 12), rid="h:0001"),
        ]
    )
    assert isinstance(still_shot, Filtered) and still_shot.scores["motion_score"] < 0.1
    assert moving_shot["motion_score"] > 3.0


def test_motion_errors_and_config(videos, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    bad, missing = motion().process([child(garbage, tmp_path, None), {"id": "x", "_job": "t", "_media_dir": tmp_path}])
    assert isinstance(bad, StageError) and bad.error_type == "VideoDecodeError"
    assert isinstance(missing, StageError) and missing.error_type == "MissingField"
    with pytest.raises(ValueError, match="min_score 3.0 is above max_score 1.0"):
        MotionFilter.Config(min_score=3, max_score=1)


def properties(**config) -> PropertyFilter:
    return stage_class("VideoFilter", "PropertyFilter")(PropertyFilter.Config(**config))


def test_properties_from_probing_the_file(videos, tmp_path):
    stage = properties(min_duration_s=1.0, min_width=64, aspect_ratio=[1.3, 1.8], codecs=["h264"])
    (kept,) = stage.process([child(videos["still"], tmp_path, None)])  # 96x64, 2 s, h264
    assert kept == {} and stage.take_usage()["probed"] == 1
    (short,) = stage.process([child(videos["still"], tmp_path, clip(0, 0, 6, 12))])  # a 0.5 s clip of it
    assert isinstance(short, Filtered)
    assert short.reason == "duration_s 0.5 is below min_duration_s 1"
    assert short.scores == {
        "duration_s": 0.5,
        "width": 96,
        "height": 64,
        "fps": 12.0,
        "codec": "h264",
        "aspect_ratio": 1.5,
    }


def test_properties_from_the_record_and_every_failure_named(tmp_path):
    stage = properties(
        max_duration_s=10,
        min_width=640,
        min_height=360,
        min_fps=20,
        max_fps=60,
        aspect_ratio=[1.5, 2.0],
        codecs=["h264"],
    )
    record = {
        "id": "r",
        "_job": "t",
        "_media_dir": tmp_path,
        "video": tmp_path / "not-read.mp4",  # never opened: the record has every property
        "probe": {"duration_s": 30.0, "fps": 15.0, "width": 480, "height": 480, "codec": "vp9", "rotation": 0},
        "clip": clip(0, 0, 300, 15.0),
    }
    (out,) = stage.process([record])
    assert isinstance(out, Filtered)
    assert out.reason.split("; ") == [
        "duration_s 20 is above max_duration_s 10",
        "width 480 is below min_width 640",
        "fps 15 is below min_fps 20",  # (height 480 passes min_height 360)
        "aspect_ratio 1 is outside aspect_ratio [1.5, 2]",
        "codec 'vp9' is not in codecs ['h264']",
    ]
    assert stage.take_usage()["probed"] == 0
    # A portrait phone video stored sideways is judged as displayed (rotation 90: 1080 x 1920).
    record["probe"] = {"duration_s": 5.0, "fps": 30.0, "width": 1920, "height": 1080, "codec": "h264", "rotation": 90}
    del record["clip"]
    (turned,) = stage.process([record])
    assert "aspect_ratio 0.5625 is outside" in turned.reason and "min_width" not in turned.reason


def test_property_config_is_checked():
    with pytest.raises(ValueError, match="min_fps 30.0 is above max_fps 24.0"):
        PropertyFilter.Config(min_fps=30, max_fps=24)
    with pytest.raises(ValueError, match="aspect_ratio must be"):
        PropertyFilter.Config(aspect_ratio=[2.0, 1.0])
    with pytest.raises(ValueError, match="max_width"):
        PropertyFilter.Config(max_width=10)
