"""Generation throughput: the daemon's engine against a plain loop, same tiny pipeline, same prompts.

    python bench/generate.py [--model cogvideox_t2v] [--records 32] [--batch-size 4] [--rounds 3]

Both sides run the same stage class on the same device with the same batch size. The loop is
what a script would do: load once, then `prepare` + `process` batch after batch. The engine is
`reelflow`'s own (daemon/engine.py, as `serve` and `run` use it): reader, intake, prepare pool,
micro-batching worker, outbox with fsync per batch. Model loading is outside both timings.
Rounds alternate loop/engine; the best (and the median) round of each is compared. Prints the ratio
engine/loop (1.0 = no overhead). Runs on CPU with tiny random-weight models unless --device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Stage and settings for each tiny model (sizes a little above the tests' so the model dominates).
MODELS = {
    "cogvideox_t2v": ("VideoGenerator", "CogVideoXT2VGenerator", {"height": 32, "width": 48, "num_frames": 9}),
    "modelscope_t2v": ("VideoGenerator", "ModelScopeT2VGenerator", {"height": 32, "width": 48, "num_frames": 8}),
    "flux": ("ImageGenerator", "FLUXGenerator", {"height": 32, "width": 48}),
    "svd": ("VideoGenerator", "SVDGenerator", {"height": 32, "width": 48, "num_frames": 4}),
}
PROMPTS = [
    "a cat playing with a ball in the garden",
    "the camera pans across a city street at night",
    "a rabbit wakes up under a tree",
    "waves roll onto a rocky beach at dusk",
]


def step_config(model_dir: Path, model: str, steps: int) -> dict:
    _, _, settings = MODELS[model]
    config = {"model_path": str(model_dir), "num_inference_steps": steps, **settings}
    return config


def write_rows(folder: Path, count: int, image: Path | None) -> Path:
    path = folder / "prompts.jsonl"
    with path.open("w") as out:
        for index in range(count):
            row = {"id": f"r{index:05d}", "text": PROMPTS[index % len(PROMPTS)]}
            if image is not None:
                row["image"] = image.name
            out.write(json.dumps(row) + "\n")
    return path


def run_loop(stage, rows: Path, media: Path, batch_size: int) -> float:
    from stages.base import JOB, MEDIA_DIR

    records = [json.loads(line) for line in rows.read_text().splitlines()]
    for record in records:
        record.update({JOB: "loop", MEDIA_DIR: media})
        if "image" in record:
            record["image"] = rows.parent / record["image"]
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        batch = [stage.prepare(record) for record in records[start : start + batch_size]]
        results = stage.process(batch)
        assert all(isinstance(result, dict) for result in results), results
    return time.perf_counter() - started


async def run_engine(config_path: Path, rows: Path, out: Path, round_: int) -> tuple[float, object]:
    from daemon.config import load_config
    from daemon.io.outbox import OutboxLayout
    from daemon.metrics import Metrics
    from daemon.runtime.engine import Engine, JobInput

    config = load_config(config_path)
    layout = OutboxLayout.one_shot((out / f"base{round_}").resolve(), (out / f"save{round_}").resolve())
    engine = Engine(config, layout, Metrics())
    await engine.start()  # loads the model: not timed
    try:
        job = JobInput(rows.stem, rows.resolve(), "jsonl", rows.name, rows.parent)
        started = time.perf_counter()
        run = await engine.run_job(job)
        elapsed = time.perf_counter() - started
    finally:
        await engine.stop()
    assert run.ok == len(rows.read_text().splitlines()) and run.errors == 0, (run.ok, run.errors)
    return elapsed, engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cogvideox_t2v")
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the test machine is shared)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    args = parser.parse_args()

    import torch
    import yaml

    from stages.registry import stage_class
    from tests.tiny.diffusers_pipelines import save_tiny

    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    step_type, name, _ = MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        root = Path(tmp)
        model_dir = save_tiny(args.model, root / "model", work=root / "tokenizers")
        image = None
        if name == "SVDGenerator":
            import numpy as np
            from PIL import Image

            image = root / "cond.png"
            Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype("uint8")).save(image)
        rows = write_rows(root, args.records, image)
        config = step_config(model_dir, args.model, args.steps)
        devices = [args.device or "cpu"]
        pipeline = {
            "meta_path": str(rows),
            "save_folder": str(root / "unused"),
            "steps": [
                {
                    "type": step_type,
                    "name": name,
                    "config": {**config, "batch_size": args.batch_size, "devices": devices},
                }
            ],
        }
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(pipeline))

        cls = stage_class(step_type, name)
        stage = cls(cls.Config(**config), devices[0])
        stage.load()
        run_loop(stage, rows, root / "warm", args.batch_size)  # warm-up (first-call allocations)

        loop_times, engine_times = [], []
        for round_ in range(args.rounds):
            loop_times.append(run_loop(stage, rows, root / f"loop{round_}", args.batch_size))
            elapsed, _ = asyncio.run(run_engine(config_path, rows, root, round_))
            engine_times.append(elapsed)
        stage.close()

    loop_rate = args.records / min(loop_times)
    engine_rate = args.records / min(engine_times)
    median = statistics.median(loop_times) / statistics.median(engine_times)
    print(f"model={args.model} stage={name} records={args.records} batch_size={args.batch_size} steps={args.steps}")
    print(f"device={devices[0]} torch_threads={args.threads} rounds={args.rounds}")
    print("loop   s/round: " + " ".join(f"{t:.2f}" for t in loop_times) + f"  best {loop_rate:.2f} rec/s")
    print("engine s/round: " + " ".join(f"{t:.2f}" for t in engine_times) + f"  best {engine_rate:.2f} rec/s")
    print(f"ratio engine/loop: {engine_rate / loop_rate:.3f} (best rounds), {median:.3f} (median rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
