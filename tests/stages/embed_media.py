"""Clips for the embedding tests: smooth synthetic scenes, and re-encodes of a clip with ffmpeg.

`scene(path, seed)` draws a few soft coloured blobs drifting over a gradient background (seeded:
another seed is another scene). The planted near-duplicates, each through ffmpeg's libx264:
`reencode(src, dst, bitrate)` the same frames at another bitrate, `recrop(src, dst)` the frames
with a ~5% border cut off and scaled back to the full size, `drop_first_frames(src, dst, n)` the
clip starting n frames later.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from tests.stages.clip_media import write_video


def scene(path: Path, seed: int, frames: int = 24, size=(96, 64), fps: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    tilt = rng.uniform(-1.5, 1.5, (2, 3))
    blobs = [
        (
            rng.uniform(0, width),
            rng.uniform(0, height),
            rng.uniform(6, 20),
            rng.uniform(0, 255, 3),
            rng.uniform(-1.5, 1.5, 2),
        )
        for _ in range(4)
    ]

    def frame(n: int) -> np.ndarray:
        image = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
        for cx, cy, r, colour, (vx, vy) in blobs:
            weight = np.exp(-(((x - cx - vx * n) ** 2 + (y - cy - vy * n) ** 2) / (2 * r * r)))[..., None]
            image = image * (1 - weight) + colour * weight
        return np.clip(image, 0, 255).astype(np.uint8)

    return write_video(path, (frame(n) for n in range(frames)), fps=fps)


def reencode(src: Path, dst: Path, bitrate: str = "60k") -> Path:
    return _ffmpeg(src, dst, "-b:v", bitrate)


def recrop(src: Path, dst: Path, size=(96, 64)) -> Path:
    width, height = size
    left, top = round(width * 0.05), round(height * 0.05)
    crop = f"crop={width - 2 * left}:{height - 2 * top}:{left}:{top},scale={width}:{height}"
    return _ffmpeg(src, dst, "-vf", crop)


def drop_first_frames(src: Path, dst: Path, frames: int = 2) -> Path:
    return _ffmpeg(src, dst, "-vf", f"trim=start_frame={frames},setpts=PTS-STARTPTS")


def _ffmpeg(src: Path, dst: Path, *options: str) -> Path:
    command = ["ffmpeg", "-v", "error", "-y", "-i", str(src), *options, "-c:v", "libx264", "-pix_fmt", "yuv420p"]
    subprocess.run([*command, str(dst)], check=True, timeout=60)
    return dst
