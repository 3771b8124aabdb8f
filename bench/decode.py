"""Frame decoding: PyAV (today's sampler), TorchCodec and OpenCV on the stages' access patterns.

    python bench/decode.py [--seconds 10] [--repeats 3] [--sizes 360p,720p,1080p] [--counts 8,32]

Videos are encoded here with ffmpeg (libx264, yuv420p, 30 fps, testsrc2 with noise so frames
cost what real footage costs): at each size one with dense keyframes (every 15 frames) and one
with sparse keyframes (one per 250 frames, x264's default). Each case samples N uniform frames
(`uniform_indices`, as FrameSampler and the captioners do) at the native size, from opening
the file to RGB arrays in memory, and (pyav@448, torchcodec@448) scaled by the decoder to 448 px
on the long side, as the captioners and MotionFilter read them:

- pyav: `sample_frames(decoder="pyav")`, the sampler (Python demux pass for the index, then
  seeks or one straight decode, whichever decodes fewer frames; unreferenced frames that are
  not wanted are dropped by the decoder unread);
- torchcodec: `sample_frames(decoder="torchcodec")` (TorchCodec's exact-mode scan and
  `get_frames_at`);
- opencv: `cv2.VideoCapture`, frame count from CAP_PROP_FRAME_COUNT, then per target a seek
  (`CAP_PROP_POS_FRAMES`) when the gap is over one keyframe interval, else `grab()` forward.

Same frames required: each case asserts that every decoder returned the same frame numbers
and the same pixels (mean absolute difference under 1 grey level; PyAV and TorchCodec are
bit-identical, OpenCV converts colour with its own code). Prints per-case best-of-repeats
wall and CPU (process time over all threads: steadier on a shared machine) times and each decoder's time as a ratio against PyAV's (below 1 = faster), then the
rule `auto` uses. Rounds alternate the decoders so machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL = 448  # the captioners and MotionFilter decode at the model's size: frames scaled by the decoder
SIZES = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
GOPS = {"dense": 15, "sparse": 250}  # 250: x264's default keyint


def encode(path: Path, size: tuple[int, int], seconds: float, gop: int) -> Path:
    width, height = size
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y", "-f", "lavfi",
            "-i", f"testsrc2=size={width}x{height}:rate=30,noise=alls=6:allf=t",
            "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
            "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", str(path),
        ],
        check=True,
    )  # fmt: skip
    return path


def read_pyav(path: Path, count: int):
    from stages.video.frames import sample_frames

    got = sample_frames(path, num_frames=count, decoder="pyav")
    return got.indices, got.frames


def read_torchcodec(path: Path, count: int):
    from stages.video.frames import sample_frames

    got = sample_frames(path, num_frames=count, decoder="torchcodec")
    return got.indices, got.frames


def read_pyav_small(path: Path, count: int):
    from stages.video.frames import sample_frames

    got = sample_frames(path, num_frames=count, decoder="pyav", max_side=SMALL)
    return got.indices, got.frames


def read_torchcodec_small(path: Path, count: int):
    from stages.video.frames import sample_frames

    got = sample_frames(path, num_frames=count, decoder="torchcodec", max_side=SMALL)
    return got.indices, got.frames


def read_opencv(path: Path, count: int, gop: int):
    import cv2

    from stages.video.frames import uniform_indices

    capture = cv2.VideoCapture(str(path))
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = uniform_indices(total, count)
        frames, position = [], 0
        for target in wanted:
            if target - position > gop:
                capture.set(cv2.CAP_PROP_POS_FRAMES, target)
                position = target
            while position < target:
                capture.grab()
                position += 1
            ok, image = capture.read()
            position += 1
            assert ok, f"OpenCV could not read frame {target} of {path.name}"
            frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        return wanted, np.stack(frames)
    finally:
        capture.release()


def timed(read, *args) -> tuple[float, float, list[int], np.ndarray]:
    started, cpu = time.perf_counter(), time.process_time()
    indices, frames = read(*args)
    return time.perf_counter() - started, time.process_time() - cpu, indices, frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each encoded video")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="360p,720p,1080p")
    parser.add_argument("--counts", default="8,32")
    args = parser.parse_args()

    import cv2

    cv2.setNumThreads(0)  # OpenCV's own colour-conversion threads would compete with the decoders'
    sizes = args.sizes.split(",")
    warm_up()
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for size in sizes:
            for kind, gop in GOPS.items():
                path = encode(Path(tmp) / f"{size}_{kind}.mp4", SIZES[size], args.seconds, gop)
                for count in counts:
                    readers = {
                        "pyav": (read_pyav, path, count),
                        "torchcodec": (read_torchcodec, path, count),
                        "opencv": (read_opencv, path, count, gop),
                        "pyav@448": (read_pyav_small, path, count),
                        "torchcodec@448": (read_torchcodec_small, path, count),
                    }
                    best = {name: float("inf") for name in readers}
                    cpu = dict(best)
                    for _ in range(args.repeats):
                        results = {}
                        for name, (read, *call) in readers.items():
                            elapsed, used, indices, frames = timed(read, *call)
                            best[name], cpu[name] = min(best[name], elapsed), min(cpu[name], used)
                            results[name] = (indices, frames)
                        check_same(results, f"{size} {kind} {count} frames")
                    rows.append((size, kind, count, best, cpu))
                    print_row(rows[-1], header=len(rows) == 1)
    print()
    print(
        "same frames: every case, every round (same frame numbers; pyav == torchcodec bit for bit; "
        "opencv within 1 grey level on average)"
    )
    summary(rows)
    return 0


def warm_up() -> None:
    """Import and first-call costs (torch, TorchCodec's ffmpeg libraries) are not what a resident stage pays."""
    with tempfile.TemporaryDirectory(prefix="bench-decode-warm-") as tmp:
        path = encode(Path(tmp) / "warm.mp4", (320, 180), 1.0, 15)
        read_pyav(path, 2), read_torchcodec(path, 2), read_opencv(path, 2, 15), read_torchcodec_small(path, 2)


def check_same(results: dict, case: str) -> None:
    for name, (indices, frames) in results.items():
        reference_indices, reference = results["pyav@448" if name.endswith("@448") else "pyav"]
        assert indices == reference_indices, f"{case}: {name} took frames {indices}, pyav {reference_indices}"
        assert frames.shape == reference.shape, f"{case}: {name} frames {frames.shape}, pyav {reference.shape}"
        difference = float(np.abs(frames.astype(np.int16) - reference.astype(np.int16)).mean())
        # Scaled frames: AREA on YUV (PyAV) vs bilinear on RGB (TorchCodec) differ at edges (see decoders.py).
        limit = {"torchcodec": 0.0, "opencv": 1.0}.get(name, 5.0)
        assert difference <= limit, f"{case}: {name}'s pixels differ from pyav's by {difference:.2f} on average"


def print_row(row, header: bool) -> None:
    size, kind, count, best, cpu = row
    if header:
        print(
            "wall ms (best of repeats) | cpu ms (process time, all threads) | ratios against pyav, wall/cpu | "
            f"scaled to {SMALL} px (long side): wall ms, ratio wall/cpu"
        )
        print(
            f"{'video':<14} {'frames':>6} {'pyav':>7} {'tcodec':>7} {'opencv':>7} | {'pyav':>7} {'tcodec':>7} "
            f"{'opencv':>7} | {'tc/pyav':>11} {'cv/pyav':>11} | {'pyav448':>7} {'tc448':>7} {'tc/pyav448':>11}"
        )
    print(
        f"{size + ' ' + kind:<14} {count:>6} {best['pyav'] * 1e3:>7.0f} {best['torchcodec'] * 1e3:>7.0f} "
        f"{best['opencv'] * 1e3:>7.0f} | {cpu['pyav'] * 1e3:>7.0f} {cpu['torchcodec'] * 1e3:>7.0f} "
        f"{cpu['opencv'] * 1e3:>7.0f} | {best['torchcodec'] / best['pyav']:>5.2f}/{cpu['torchcodec'] / cpu['pyav']:<5.2f} "
        f"{best['opencv'] / best['pyav']:>5.2f}/{cpu['opencv'] / cpu['pyav']:<5.2f} | "
        f"{best['pyav@448'] * 1e3:>7.0f} {best['torchcodec@448'] * 1e3:>7.0f} "
        f"{best['torchcodec@448'] / best['pyav@448']:>5.2f}/{cpu['torchcodec@448'] / cpu['pyav@448']:<5.2f}",
        flush=True,
    )


def summary(rows) -> None:
    for suffix in ("", "@448"):
        wins = {}
        for size, _, _, best, cpu in rows:
            tc, av = "torchcodec" + suffix, "pyav" + suffix
            wins.setdefault(size, []).append((best[tc] / best[av], cpu[tc] / cpu[av]))
        for size, ratios in wins.items():
            wall, used = [w for w, _ in ratios], [c for _, c in ratios]
            print(
                f"{size}{suffix or ' native'}: torchcodec/pyav wall {min(wall):.2f}-{max(wall):.2f}, "
                f"cpu {min(used):.2f}-{max(used):.2f} over {len(ratios)} cases"
            )
    from stages.video.decoders import AUTO_MIN_PIXELS

    rule = f"torchcodec from {AUTO_MIN_PIXELS} pixels a frame" if AUTO_MIN_PIXELS else "pyav at every size"
    print(f"auto on the CPU (stages/video/decoders.py): {rule}; on a CUDA device torchcodec (NVDEC)")


if __name__ == "__main__":
    sys.exit(main())
