"""ShotSplitter on a file with no video stream: an error line that says so, not a decoder's IndexError;
and its faster frame score: PySceneDetect's own, bit for bit, on moving textures, a fade and cuts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stages.base import StageError
from stages.video.shot_splitter import ShotSplitter, ShotSplitterConfig, fast_scoring
from tests.media import audio_only
from tests.stages.clip_media import texture

scenedetect = pytest.importorskip("scenedetect")


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg to encode the audio file")
def test_an_audio_only_file_is_named_as_such(tmp_path):
    audio = audio_only(tmp_path / "tone.m4a")
    stage = ShotSplitter(ShotSplitterConfig())
    with pytest.raises(StageError) as refused:
        stage.prepare({"id": "tone", "video": audio})
    assert refused.value.error_type == "NoVideoStream"
    assert "tone.m4a has no video stream" in str(refused.value) and "expected a video file" in str(refused.value)


def _frames():
    """BGR frames: a texture panning, a 6-frame fade into another, a hard cut to a third, a flash."""
    first, second, third = (texture(300, 90, seed=s) for s in (1, 2, 3))
    frames = [first[:, 2 * n : 2 * n + 160] for n in range(12)]
    frames += [(frames[-1] * (1 - a) + second[:, :160] * a).astype(np.uint8) for a in np.linspace(0.1, 0.9, 6)]
    frames += [second[:, n : n + 160] for n in range(8)] + [third[:, n : n + 160] for n in range(8)]
    frames += [np.full_like(frames[0], 250), third[:, 8:168]]
    return [np.ascontiguousarray(f) for f in frames]


@pytest.mark.parametrize("name", ["ContentDetector", "AdaptiveDetector"])
@pytest.mark.parametrize("options", [{}, {"luma_only": True}])
def test_the_fast_frame_score_is_the_librarys_own(name, options):
    from scenedetect.common import FrameTimecode

    library = getattr(scenedetect, name)
    theirs, ours = library(**options), fast_scoring(library)(**options)
    assert isinstance(ours, library) and type(ours) is not library
    scores = [
        (
            theirs._calculate_frame_score(FrameTimecode(n, 25.0), image),
            ours._calculate_frame_score(FrameTimecode(n, 25.0), image),
        )
        for n, image in enumerate(_frames())
    ]
    assert [a for a, _ in scores] == [b for _, b in scores]  # exactly equal, not approximately
    assert max(a for a, _ in scores) > 27 and sorted(a for a, _ in scores)[len(scores) // 2] > 0
