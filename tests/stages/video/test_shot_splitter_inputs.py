"""ShotSplitter on a file with no video stream: an error line that says so, not a decoder's IndexError."""

from __future__ import annotations

import shutil

import pytest

from stages.base import StageError
from stages.video.shot_splitter import ShotSplitter, ShotSplitterConfig
from tests.media import audio_only

pytest.importorskip("scenedetect")


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg to encode the audio file")
def test_an_audio_only_file_is_named_as_such(tmp_path):
    audio = audio_only(tmp_path / "tone.m4a")
    stage = ShotSplitter(ShotSplitterConfig())
    with pytest.raises(StageError) as refused:
        stage.prepare({"id": "tone", "video": audio})
    assert refused.value.error_type == "NoVideoStream"
    assert "tone.m4a has no video stream" in str(refused.value) and "expected a video file" in str(refused.value)
