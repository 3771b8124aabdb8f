"""Throughput of the daemon's engine over a plain loop calling the same stage on the same records.

    python bench/overhead.py                      # VideoProbe over copies of the real videos
    python bench/overhead.py --stage spin         # a pure-Python CPU-bound stage
    python bench/overhead.py --stage frames       # FrameSampler (prepare in the runtime's thread pool)

The engine run is the real thing minus process start-up: a jsonl meta file read by the
streaming reader, row checks, bounded queues, a worker with micro-batching, results and
intermediate lines appended and fsynced per batch (Engine.run_job, as `reelflow run` and
`reelflow serve` use it). The baseline is `stage.process(batch)` (after `prepare` for stages
that have one) over the same records in a loop: no reading, no checks, no writing. Both
run in this process, alternately, `--repeats` times; the best time of each is compared.
Prints `ratio = engine throughput / plain-loop throughput` (goal >= 0.97), from wall-clock
time (best of each; also the median over back-to-back pairs), and beside it the same ratio
from the process's CPU time (all threads), which other programs on a shared machine disturb
less: it shows what the engine itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.config import parse_config  # noqa: E402
from daemon.io.outbox import OutboxLayout  # noqa: E402
from daemon.metrics import Metrics  # noqa: E402
from daemon.runtime.engine import Engine, JobInput  # noqa: E402
from stages.base import has_prepare  # noqa: E402
from tests.harness import sample_video  # noqa: E402

STAGES = {
    "probe": ("VideoProcessor", "VideoProbe", {}),
    "frames": ("VideoProcessor", "FrameSampler", {"num_frames": 4, "max_side": 256, "prep_workers": 1}),
    "spin": ("Test", "Spin", {"work": 20000}),
}


def make_inputs(folder: Path, records: int) -> Path:
    videos = folder / "videos"
    videos.mkdir(parents=True)
    sources = [sample_video("bikes.mp4"), sample_video("bigbuckbunny.mp4")]
    with (folder / "meta.jsonl").open("w") as meta:
        for n in range(records):
            source = sources[n % len(sources)]
            target = videos / f"{n:05d}{source.suffix}"
            shutil.copyfile(source, target)
            meta.write(json.dumps({"id": f"r{n}", "video": target.name}) + "\n")
    return folder / "meta.jsonl"


def config_text(stage: str, batch_size: int, meta_folder: Path) -> str:
    step_type, name, settings = STAGES[stage]
    settings = {**settings, "batch_size": batch_size, "devices": ["cpu"]}
    return json.dumps(
        {"meta_folder": str(meta_folder), "steps": [{"type": step_type, "name": name, "config": settings}]}
    )


def plain_loop(config, meta: Path, media: Path) -> tuple[float, float]:
    step = config.steps[0]
    stage = step.stage_cls(step.config, "cpu")
    stage.load()
    folder = meta.parent / "videos"
    records = []
    with meta.open() as handle:
        for line in handle:
            row = json.loads(line)
            records.append({**row, "video": folder / row["video"], "_job": "bench", "_media_dir": media})
    batch_size = step.config.batch_size
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        if has_prepare(stage):
            batch = [stage.prepare(r) for r in batch]
        outputs = stage.process(batch)
        assert len(outputs) == len(batch) and all(isinstance(o, dict) for o in outputs), outputs[:1]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    stage.close()
    return elapsed, cpu


async def engine_run(config, meta: Path, out: Path, expected: int) -> tuple[float, float]:
    layout = OutboxLayout.one_shot(out / "base", out / "save")
    engine = Engine(config, layout, Metrics())
    await engine.start()
    job = JobInput("bench", meta, "jsonl", meta.name, meta.parent)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        run = await engine.run_job(job)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await engine.stop()
    assert run.ok == expected and run.errors == 0, (run.ok, run.errors)
    return elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGES), default="probe")
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--work", type=int, default=20000, help="--stage spin: loop iterations per record")
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs and outputs go (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("REELFLOW_EXTRA_STAGES", "Test.Spin=tests.stages_for_tests:Spin")

    root = Path(tempfile.mkdtemp(prefix="reelflow-bench-", dir=args.workdir))
    try:
        meta = make_inputs(root / "in", args.records)
        STAGES["spin"][2]["work"] = args.work
        config = parse_config(config_text(args.stage, args.batch_size, meta.parent / "videos"))
        plain_loop(config, meta, root / "warm")  # warm the page cache and the codecs
        loop, engine = [], []  # (wall, cpu) per repeat
        for n in range(args.repeats):  # alternate (and swap who goes first), so drifting load hits both alike
            if n % 2:
                engine.append(asyncio.run(engine_run(config, meta, root / f"engine{n}", args.records)))
            loop.append(plain_loop(config, meta, root / f"loop{n}"))
            if not n % 2:
                engine.append(asyncio.run(engine_run(config, meta, root / f"engine{n}", args.records)))
            shutil.rmtree(root / f"loop{n}", ignore_errors=True)
            shutil.rmtree(root / f"engine{n}", ignore_errors=True)
        wall_loop, wall_engine = min(w for w, _ in loop), min(w for w, _ in engine)
        cpu_loop, cpu_engine = min(c for _, c in loop), min(c for _, c in engine)
        ratio = wall_loop / wall_engine
        paired = statistics.median(lw / ew for (lw, _), (ew, _) in zip(loop, engine, strict=True))
        paired_cpu = statistics.median(lc / ec for (_, lc), (_, ec) in zip(loop, engine, strict=True))
        print(
            f"stage={args.stage}{f' work={args.work}' if args.stage == 'spin' else ''} records={args.records} "
            f"batch_size={args.batch_size} repeats={args.repeats} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}"
        )
        for label, runs, best in (("plain loop", loop, wall_loop), ("engine    ", engine, wall_engine)):
            print(
                f"{label}: best {best:.3f} s ({args.records / best:.1f} rec/s); "
                f"wall {' '.join(f'{w:.3f}' for w, _ in runs)}; cpu {' '.join(f'{c:.3f}' for _, c in runs)}"
            )
        print(
            f"cpu ratio = {cpu_loop / cpu_engine:.3f} best/best, {paired_cpu:.3f} median of pairs "
            f"(engine CPU beyond the loop's: {(cpu_engine - cpu_loop) / args.records * 1e6:.0f} us per record, best/best)"
        )
        print(
            f"ratio = {ratio:.3f} (wall, best/best; median of the {args.repeats} back-to-back pairs {paired:.3f}); "
            f"goal >= 0.97: {'met' if ratio >= 0.97 else 'MISSED'}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
