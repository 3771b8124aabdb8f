"""Throughput of a stage's workers on a local Ray cluster vs. the local backend, as ratios.

    python bench/scale.py                       # CPU-bound stage (pure-Python work per record)
    python bench/scale.py --stage frames        # FrameSampler on real footage (PyAV decode + JPEG)
    python bench/scale.py --records 600 --repeats 3

Each configuration runs the same job through the real engine (the same code `reelflow run`
uses), in this process; start-up (joining the cluster, creating actors, loading) is not
timed, and a small warm-up job runs first. The Ray cluster is a fresh local one
(`ray.init(num_cpus=N)`), and the daemon process is its driver, as in `reelflow serve`.

Goal (issue 7): 2 Ray workers >= 0.9 x 2 x one local worker on a stage with real work.
That needs two free cores beside the driver; on a small shared machine it may not be
reachable, and the load average printed with the results says how busy the machine was.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.config import parse_config  # noqa: E402
from daemon.io.outbox import OutboxLayout  # noqa: E402
from daemon.metrics import Metrics  # noqa: E402
from daemon.runtime.engine import Engine, JobInput  # noqa: E402
from tests.stages_for_tests import RAY_STAGES  # noqa: E402


def step_for(stage: str, spin: int) -> dict:
    if stage == "spin":
        return {"type": "Test", "name": "Crashy", "config": {"spin": spin, "batch_size": 4}}
    return {
        "type": "VideoProcessor",
        "name": "FrameSampler",
        "config": {"num_frames": 8, "max_side": 256, "batch_size": 2},
    }


def write_rows(path: Path, stage: str, count: int, prefix: str) -> None:
    from tests.harness import sample_video

    videos = [sample_video("bikes.mp4"), sample_video("bigbuckbunny.mp4")]
    with path.open("w") as out:
        for n in range(count):
            row = {"id": f"{prefix}{n}"}
            if stage == "frames":
                row["video"] = str(videos[n % 2])
            out.write(json.dumps(row) + "\n")


async def run_config(root: Path, step: dict, workers: dict, stage: str, records: int, repeats: int) -> list[float]:
    """Records per second of each timed job, engine started once."""
    text = {"steps": [step], "workers": workers, "meta_folder": str(root)}
    if stage == "frames":
        from tests.harness import sample_video

        text["meta_folder"] = str(sample_video().parent)
    import yaml

    config = parse_config(yaml.safe_dump(text))
    out = Path(tempfile.mkdtemp(prefix="out-", dir=root))
    layout = OutboxLayout.one_shot(out / "base", out / "save")
    engine = Engine(config, layout, Metrics())
    await engine.start()
    rates = []
    try:
        for n in range(repeats + 1):
            meta = root / f"{'warm' if n == 0 else 'run'}-{time.monotonic_ns()}.jsonl"
            write_rows(meta, stage, max(8, records // 10) if n == 0 else records, f"r{n}-")
            job = JobInput(meta.stem, meta, "jsonl", meta.name, meta.parent)
            started = time.perf_counter()
            run = await engine.run_job(job)
            elapsed = time.perf_counter() - started
            assert run.ok == (max(8, records // 10) if n == 0 else records), f"{run.ok} ok, {run.errors} errors"
            if n:
                rates.append(records / elapsed)
    finally:
        await engine.stop()
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("spin", "frames"), default="spin")
    parser.add_argument("--records", type=int, default=None, help="records per timed job")
    parser.add_argument("--spin", type=int, default=300_000, help="spin: loop iterations per record")
    parser.add_argument("--repeats", type=int, default=3, help="timed jobs per configuration (median shown)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    records = args.records or (120 if args.stage == "spin" else 60)

    os.environ["REELFLOW_EXTRA_STAGES"] = RAY_STAGES
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    import ray

    temp = tempfile.mkdtemp(prefix="rfb", dir="/tmp")  # Unix socket paths must stay < 108 chars
    ray.init(
        num_cpus=args.cpus,
        num_gpus=0,
        object_store_memory=100_000_000,
        include_dashboard=False,
        _temp_dir=temp,
        log_to_driver=False,
        logging_level="WARNING",
        namespace="reelflow-bench",
    )
    step = step_for(args.stage, args.spin)
    local = {"backend": "local"}
    configs = {
        "local, 1 worker": (local, {}),
        "local, 2 workers (threads)": (local, {"workers_per_device": 2}),
        "ray, 1 actor": ({"backend": "ray", "count": 1, "num_cpus": 1}, {}),
        "ray, 2 actors": ({"backend": "ray", "count": 2, "num_cpus": 1}, {}),
    }
    results: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="reelflow-scale-") as folder:
            for label, (workers, extra) in configs.items():
                this_step = {**step, "config": {**step["config"], **extra}}
                rates = asyncio.run(run_config(Path(folder), this_step, workers, args.stage, records, args.repeats))
                results[label] = statistics.median(rates)
                print(f"{label:28s} {results[label]:8.1f} rec/s  (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    one = results["local, 1 worker"]
    print()
    print(f"stage: {args.stage}; {records} records per job; median of {args.repeats}; load average {os.getloadavg()}")
    print(f"ray 1 actor  / local 1 worker: {results['ray, 1 actor'] / one:.2f}   (the cost of the remote hop)")
    print(f"ray 2 actors / local 1 worker: {results['ray, 2 actors'] / one:.2f}   (goal >= 1.80 = 0.9 x 2)")
    print(f"local 2 threads / local 1:     {results['local, 2 workers (threads)'] / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
