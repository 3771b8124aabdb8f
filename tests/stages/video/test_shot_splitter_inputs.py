"""ShotSplitter on a file with no video stream: an error line that says so, not a decoder's IndexError."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from stages.base import StageError
from stages.video.shot_splitter import ShotSplitter, ShotSplitterConfig

pytest.importorskip("scenedetect")


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg to encode the audio file")
def test_an_audio_only_file_is_named_as_such(tmp_path):
    audio = tmp_path / "tone.m4a"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=1",
            "-c:a",
            "aac",
            str(audio),
        ],
        check=True,
    )
    stage = ShotSplitter(ShotSplitterConfig())
    with pytest.raises(StageError) as refused:
        stage.prepare({"id": "tone", "video": audio})
    assert refused.value.error_type == "NoVideoStream"
    assert "tone.m4a has no video stream" in str(refused.value) and "expected a video file" in str(refused.value)
