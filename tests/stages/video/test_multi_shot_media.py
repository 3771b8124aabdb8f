"""The multi-shot demo video of `python -m tests.media`: its hard cuts are where its layout says
(ShotSplitter, real scenedetect and PyAV, finds exactly them)."""

from __future__ import annotations

import json

import pytest

from stages.video.frames import probe
from stages.video.shot_splitter import ShotSplitter, ShotSplitterConfig
from tests.media import write_multi_shot

pytest.importorskip("scenedetect")
pytestmark = pytest.mark.timeout(180)


def test_the_multi_shot_video_has_its_cuts_where_its_layout_says(tmp_path):
    video = tmp_path / "multi_shot.mp4"
    layout = write_multi_shot(video)
    assert json.loads(video.with_suffix(".cuts.json").read_text()) == layout
    assert probe(video).num_frames == layout["num_frames"]
    shots = layout["shots"]
    assert [s["start_frame"] for s in shots[1:]] == layout["cuts"]
    assert sum(s["num_frames"] for s in shots) == layout["num_frames"]
    assert len({s["source"] for s in shots}) >= 2 and len(shots) >= 5  # different sources joined
    # Every shot kept (min_clip_s 0, no cap): one clip per planted shot, on the exact frames.
    stage = ShotSplitter(ShotSplitterConfig(min_clip_s=0.0, max_clip_s=3600.0))
    stage.load()
    (clips,) = stage.process([stage.prepare({"id": "multi_shot", "video": video})])
    assert [(c["clip"]["start_frame"], c["clip"]["num_frames"]) for c in clips] == [
        (s["start_frame"], s["num_frames"]) for s in shots
    ]
