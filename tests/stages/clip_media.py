"""Synthetic videos for the clip stages, encoded with PyAV: each frame's content is known.

- `numbered`: frame n is a flat grey of level 4*n (so a decoded frame tells its own number),
- `still`: the same textured picture every frame (motion ~0),
- `pan`: a textured picture sliding sideways a few pixels a frame (motion high).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(path: Path, images, fps: int = 12, gop: int | None = None, audio_seconds: float = 0.0) -> Path:
    import av

    images = list(images)
    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
            stream.codec_context.options = {"keyint_min": str(gop), "sc_threshold": "0"}
        audio = container.add_stream("aac", rate=16000) if audio_seconds else None
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _tone(container, audio, audio_seconds)
    return path


def _tone(container, stream, seconds: float) -> None:
    import av

    rate, chunk, t = 16000, 1024, 0
    while t < seconds * rate:
        samples = (0.2 * np.sin(2 * np.pi * 440 * (np.arange(chunk) + t) / rate)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, t, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        t += chunk
    for packet in stream.encode():
        container.mux(packet)


def numbered(path: Path, frames: int = 48, size=(96, 64), fps: int = 12, gop: int | None = None, **kw) -> Path:
    width, height = size
    images = (np.full((height, width, 3), 4 * n % 256, np.uint8) for n in range(frames))
    return write_video(path, images, fps=fps, gop=gop, **kw)


def texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:height, :width]


def still(path: Path, frames: int = 24, size=(96, 64), fps: int = 12) -> Path:
    image = texture(*size)
    return write_video(path, (image for _ in range(frames)), fps=fps)


def pan(path: Path, frames: int = 24, size=(96, 64), fps: int = 12, step: int = 4) -> Path:
    width, height = size
    wide = texture(width + frames * step, height, seed=1)
    return write_video(path, (wide[:, n * step : n * step + width].copy() for n in range(frames)), fps=fps)


def clip(index: int, start_frame: int, num_frames: int, fps: float) -> dict:
    """A `clip` field as ShotSplitter writes it (end_frame exclusive)."""
    end_frame = start_frame + num_frames
    return {
        "index": index,
        "start_s": round(start_frame / fps, 6),
        "end_s": round(end_frame / fps, 6),
        "start_frame": start_frame,
        "end_frame": end_frame,
        "num_frames": num_frames,
        "fps": fps,
    }


def child(video: Path, media_dir: Path, clip_field: dict | None, rid: str = "v:0000", **fields) -> dict:
    """A child record as the runtime hands it to the next stage after ShotSplitter."""
    record = {"id": rid, "_job": "test", "_media_dir": media_dir, "video": video, "source_video": video, **fields}
    if clip_field is not None:
        record["clip"] = clip_field
    return record


def decoded_levels(path: Path) -> list[int]:
    """Grey level of every frame of a `numbered` video (or a clip cut from one), in order."""
    import av

    with av.open(str(path)) as container:
        return [int(round(f.to_ndarray(format="rgb24").mean())) for f in container.decode(video=0)]
