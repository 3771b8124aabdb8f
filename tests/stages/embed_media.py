"""Clips for the embedding tests: smooth synthetic scenes, and re-encodes of a clip with ffmpeg.

`scene(path, seed)` draws a few soft coloured blobs drifting over a gradient background (seeded:
another seed is another scene); `reencode(src, dst, bitrate)` is the same frames through ffmpeg's
libx264 at another bitrate: the planted near-duplicate.
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
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-i",
            str(src),
            "-c:v",
            "libx264",
            "-b:v",
            bitrate,
            "-pix_fmt",
            "yuv420p",
            str(dst),
        ],
        check=True,
        timeout=60,
    )
    return dst
