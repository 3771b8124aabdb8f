"""VideoProbe and FrameSampler (and the shared sampler in stages/video/frames.py) on real and odd clips.

The sampler picks the frames by index and decodes each once, by seeking (dense keyframes) or by
decoding straight through (sparse keyframes); both paths must give exactly the frames that
decoding every frame gives, upright as ffmpeg's own autorotation shows them.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from stages.base import StageError
from stages.video import frames as sampler
from stages.video.frames import fps_indices, probe, sample_frames, uniform_indices
from stages.video.probe import VideoProbe, probe_fields
from stages.video.sampler import FrameSampler, FrameSamplerConfig
from tests.media import encode

pytestmark = pytest.mark.timeout(120)

MAX_SIDE = 160


@pytest.fixture(scope="module")
def dense_gop(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("dense") / "dense_gop.mp4", frames=48, gop=4)


def reference_frames(path, indices: list[int], max_side: int | None = MAX_SIDE) -> list[np.ndarray]:
    """Decode every frame from the start, keep the wanted ones (no seeking at all)."""
    import av

    wanted, kept = set(indices), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for n, frame in enumerate(container.decode(stream)):
            if n in wanted:
                kept[n] = sampler._to_rgb(frame, max_side, 0)
    return [kept[i] for i in indices]


@pytest.mark.parametrize(
    ("name", "frames", "fps", "size", "codec", "audio"),
    [
        ("bunny", 132, 25.0, (1280, 720), "h264", True),
        ("bikes", 250, 25.0, (640, 272), "h264", False),
        ("h264", 24, 12.0, (96, 64), "h264", False),
        ("sparse_gop", 60, 12.0, (96, 64), "h264", False),
        ("vp9_webm", 12, 12.0, (96, 64), "vp9", False),
        ("mpeg4_avi", 12, 12.0, (96, 64), "mpeg4", False),
        ("mkv", 12, 12.0, (96, 64), "h264", False),
    ],
)
def test_probe(videos, name, frames, fps, size, codec, audio):
    info = probe(videos[name])
    assert info.num_frames == frames and info.fps == fps
    assert (info.width, info.height) == size and info.codec == codec
    assert info.has_audio is audio and info.rotation == 0 and info.pix_fmt == "yuv420p"
    assert info.duration_s == pytest.approx(frames / fps, abs=0.1)
    assert info.bit_rate and info.bit_rate > 0


def test_probe_rotated(videos):
    if "rotated" not in videos:
        pytest.skip("needs the ffmpeg CLI")
    info = probe(videos["rotated"])
    assert info.rotation == 90 and (info.width, info.height) == (96, 64)
    fields = probe_fields(videos["rotated"])  # what VideoProbe writes: both sizes, named
    assert (fields["width"], fields["height"]) == (96, 64)
    assert (fields["display_width"], fields["display_height"]) == (64, 96)
    frames = sample_frames(videos["rotated"], num_frames=1)
    assert frames.frames.shape[1:3] == (fields["display_height"], fields["display_width"])


@pytest.mark.parametrize(
    ("name", "error_type"),
    [("truncated", "VideoDecodeError"), ("empty", "VideoDecodeError"), ("garbage", "VideoDecodeError")],
)
def test_broken_videos_are_stage_errors(videos, name, error_type):
    with pytest.raises(StageError) as caught:
        probe(videos[name])
    assert caught.value.error_type == error_type and videos[name].name in caught.value.message
    with pytest.raises(StageError):
        sample_frames(videos[name], num_frames=2)


def test_audio_only_and_missing(videos, tmp_path):
    if "audio_only" in videos:
        with pytest.raises(StageError) as caught:
            sample_frames(videos["audio_only"], num_frames=2)
        assert caught.value.error_type == "NoVideoStream"
    with pytest.raises(StageError) as caught:
        probe(tmp_path / "gone.mp4")
    assert caught.value.error_type == "VideoNotFound"


def test_index_helpers():
    assert uniform_indices(10, 5) == [1, 3, 5, 7, 9]
    assert uniform_indices(3, 8) == [0, 1, 2]  # never more frames than the video has
    assert uniform_indices(0, 4) == [] and uniform_indices(5, 0) == []
    assert uniform_indices(250, 1) == [125]
    assert fps_indices(24, 12.0, 2.0) == [0, 6, 12, 18]
    assert fps_indices(24, 12.0, 2.0, max_frames=3) == [0, 12, 18]
    assert fps_indices(24, 12.0, 24.0) == list(range(24))  # faster than the video: every frame once
    assert fps_indices(0, 12.0, 1.0) == [] and fps_indices(10, 0, 1.0) == []


@pytest.mark.parametrize("name", ["bikes", "bunny", "sparse_gop", "dense", "vp9_webm", "mpeg4_avi", "mkv"])
@pytest.mark.parametrize("count", [1, 5, 8])
def test_seeking_and_straight_decoding_give_the_frames_decoding_everything_gives(
    videos, dense_gop, monkeypatch, name, count
):
    path = dense_gop if name == "dense" else videos[name]
    results = {}
    for seek in (True, False):
        monkeypatch.setattr(sampler, "_seeking_is_cheaper", lambda index, targets, seek=seek: seek)
        results[seek] = sample_frames(path, num_frames=count, max_side=MAX_SIDE)
    total = results[True].total_frames
    expected = uniform_indices(total, count)
    reference = reference_frames(path, expected)
    for seek, got in results.items():
        assert got.indices == expected, seek
        assert got.frames.dtype == np.uint8 and got.frames.shape[0] == len(expected)
        for index, frame, want in zip(expected, got.frames, reference, strict=True):
            assert np.array_equal(frame, want), f"{name} frame {index} differs (seek={seek})"


def test_the_cheaper_path_is_chosen(videos, dense_gop):
    def index_of(path):
        container = sampler._open(path)
        try:
            return sampler._index_packets(container, container.streams.video[0])
        finally:
            container.close()

    dense = index_of(dense_gop)
    assert len(dense.keyframe_pts) >= 12  # every 4th frame (x264 may add scene cuts)
    assert sampler._seeking_is_cheaper(dense, 4)  # 4 seeks of ~3 frames beat decoding 48
    assert not sampler._seeking_is_cheaper(dense, 40)
    sparse = index_of(videos["sparse_gop"])
    assert len(sparse.keyframe_pts) == 1 and not sampler._seeking_is_cheaper(sparse, 2)


def test_fps_mode(videos):
    got = sample_frames(videos["h264"], fps=2.0)
    assert got.indices == [0, 6, 12, 18] and got.fps == 12.0 and got.total_frames == 24
    assert got.timestamps_s == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=0.01)
    assert got.duration_s == pytest.approx(2.0)
    for frame, want in zip(got.frames, reference_frames(videos["h264"], got.indices, None), strict=True):
        assert np.array_equal(frame, want)
    assert sample_frames(videos["bikes"], fps=1.0, max_frames=4).indices == [25, 75, 150, 200]


def test_max_side_downscales_keeping_the_aspect(videos):
    got = sample_frames(videos["bikes"], num_frames=2, max_side=320)
    assert got.frames.shape == (2, 136, 320, 3)
    assert sample_frames(videos["h264"], num_frames=1, max_side=320).frames.shape == (1, 64, 96, 3)


def test_rotation_is_honoured_like_ffmpeg_autorotate(videos):
    if "rotated" not in videos or not shutil.which("ffmpeg"):
        pytest.skip("needs the ffmpeg CLI")
    got = sample_frames(videos["rotated"], num_frames=3)
    assert got.frames.shape == (3, 96, 64, 3)  # upright: the 96x64 clip stands 64 wide, 96 high
    plain = sample_frames(videos["h264"], num_frames=3)
    for index, frame, unrotated in zip(got.indices, got.frames, plain.frames, strict=True):
        raw = subprocess.run(
            ["ffmpeg", "-v", "error", "-i", str(videos["rotated"]), "-vf", f"select=eq(n\\,{index})"]
            + ["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
            capture_output=True,
            check=True,
        ).stdout
        want = np.frombuffer(raw, np.uint8).reshape(96, 64, 3)
        assert np.abs(frame.astype(int) - want).mean() < 1.0, f"frame {index} not oriented as ffmpeg shows it"
        assert np.array_equal(frame, np.rot90(unrotated, k=1))


# --- the stages through their interface ---------------------------------------------------------


def test_frame_sampler_stage(videos, tmp_path):
    config = FrameSamplerConfig(num_frames=20, max_side=64, quality=80)
    stage = FrameSampler(config, "cpu")
    stage.load()
    record = {"id": "clip/1", "_job": "j", "_media_dir": tmp_path / "media", "video": videos["mkv"]}
    prepared = stage.prepare(record)
    (out,) = stage.process([prepared])
    assert out["frame_indices"] == list(range(12))  # 20 asked, the clip has 12
    assert [p.name for p in out["frames"]] == [f"frame_{i:06d}.jpg" for i in range(12)]
    # "clip/1" is not a safe name: its folder is clip_1 plus a hash, so id "clip_1" cannot share it.
    assert all(p.parent.name.startswith("clip_1~") and p.is_file() for p in out["frames"])
    from PIL import Image

    with Image.open(out["frames"][0]) as image:
        assert image.size == (64, 43)
    stage.config = FrameSamplerConfig(fps=4.0, output_key="shots")  # hot reload swaps the config in place
    assert len(stage.process([stage.prepare({**record, "id": "x"})])[0]["shots"]) == 4
    with pytest.raises(StageError):
        stage.prepare({**record, "video": videos["garbage"]})
    stage.close()


def test_frame_sampler_config():
    assert FrameSamplerConfig().num_frames == 8
    with pytest.raises(ValueError, match="give num_frames or fps, not both"):
        FrameSamplerConfig(num_frames=4, fps=1.0)
    assert FrameSamplerConfig(video_key="clip").input_fields() == {"clip": "video"}


def test_video_probe_stage(videos):
    stage = VideoProbe(VideoProbe.Config(output_key="facts"), "cpu")
    good, bad = stage.process([{"id": "1", "video": videos["bikes"]}, {"id": "2", "video": videos["garbage"]}])
    assert good["facts"]["num_frames"] == 250 and set(good["facts"]) == {
        "duration_s",
        "fps",
        "num_frames",
        "width",
        "height",
        "display_width",
        "display_height",
        "codec",
        "pix_fmt",
        "rotation",
        "has_audio",
        "bit_rate",
    }
    assert isinstance(bad, StageError) and bad.error_type == "VideoDecodeError"
