"""RSS growth of a real `reelflow serve` while a big jsonl streams through it (goal < 64 MB for 10M rows),
or over many small jobs (`--jobs N`: goal < 20 MB for 100,000 finished jobs).

    python bench/memory.py                 # 1,000,000 rows, trivial stage, batch_size 64
    python bench/memory.py --rows 10000000 # the issue's case (~25 min on a quiet 2-core machine)
    python bench/memory.py --rows 200000   # quicker
    python bench/memory.py --jobs 100000   # 100,000 one-row jobs, dropped 256 at a time

The daemon runs in its own process (as a user starts it); this script drops the meta file into
its inbox (written elsewhere, renamed in), samples the daemon's resident set size from
/proc/<pid>/status every 0.1 s until the job is done, and checks that every row reached the
results. Growth = peak RSS during the job minus RSS once the daemon was ready and idle; the
kernel's own high-water mark (VmHWM) is printed beside the sampled peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import DaemonProcess, write_config  # noqa: E402

GOAL_MB = 64  # issue 16: a 10M-row file grows RSS by less than this
JOBS_GOAL_MB = 20  # for 100,000 finished jobs
JOBS_IN_FLIGHT = 256  # dropped but not yet done: the inbox never holds more


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def write_meta(path: Path, rows: int) -> int:
    with path.open("w") as handle:
        for n in range(rows):
            handle.write(json.dumps({"id": f"r{n:07d}", "text": f"row number {n} with a little text to carry"}) + "\n")
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="where the run's files go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--jobs", type=int, default=0, help="instead of one big file: this many one-row jobs")
    args = parser.parse_args()
    if args.jobs:
        return many_jobs(args)

    root = Path(tempfile.mkdtemp(prefix="reelflow-memory-", dir=args.workdir))
    try:
        staged = root / "staging" / "million.jsonl"
        staged.parent.mkdir()
        size = write_meta(staged, args.rows)
        config = write_config(
            root,
            {
                "steps": [
                    {
                        "type": "Test",
                        "name": "Spin",
                        "config": {"work": 0, "batch_size": args.batch_size, "devices": ["cpu"]},
                    }
                ],
                "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}},
            },
        )
        env = {"REELFLOW_EXTRA_STAGES": "Test.Spin=tests.stages_for_tests:Spin"}
        with DaemonProcess(config, env=env) as daemon:
            pid = daemon.process.pid
            time.sleep(1.0)
            baseline = status_kb(pid, "VmRSS")
            samples = [baseline]
            daemon.inbox.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            staged.rename(daemon.inbox / staged.name)
            state = None
            while time.monotonic() - started < args.timeout:
                samples.append(status_kb(pid, "VmRSS"))
                state = daemon.job_state("million")
                if state and state["state"] in ("done", "failed"):
                    break
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            high_water = status_kb(pid, "VmHWM")
            if not (state and state["state"] == "done"):  # what got through before the time limit
                results = daemon.outbox / "million.jsonl"
                done = sum(1 for _ in results.open("rb")) if results.is_file() else 0
                print(
                    f"NOT DONE after {elapsed:.0f} s: {done:,} of {args.rows:,} rows; RSS so far: ready "
                    f"{baseline / 1024:.1f} MiB, peak {max(samples) / 1024:.1f} MiB, growth "
                    f"{(max(samples) - baseline) / 1024:.1f} MiB",
                    flush=True,
                )
            assert daemon.stop() == 0, daemon.log()[-2000:]
        assert state and state["state"] == "done", f"job not done: {state}"
        with (daemon.outbox / "million.jsonl").open("rb") as results:
            written = sum(1 for _ in results)
        assert written == args.rows == state["ok"], (written, state)

        peak = max(samples)
        growth_mb = (peak - baseline) / 1024
        print(f"rows={args.rows} file={size / 2**20:.1f} MiB batch_size={args.batch_size}")
        print(f"job done in {elapsed:.1f} s ({args.rows / elapsed:,.0f} rows/s), {written:,} result lines")
        print(
            f"RSS: ready {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (VmHWM {high_water / 1024:.1f} MiB), "
            f"{len(samples)} samples"
        )
        print(
            f"growth = {growth_mb:.1f} MiB; goal < {GOAL_MB} MB: {'met' if growth_mb * 1.048576 < GOAL_MB else 'MISSED'}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def many_jobs(args: argparse.Namespace) -> int:
    """RSS after N finished one-row jobs minus RSS after a warm-up: what each finished job leaves."""
    root = Path(tempfile.mkdtemp(prefix="reelflow-jobs-", dir=args.workdir))
    try:
        staging = root / "staging"
        staging.mkdir()
        step = {"type": "Test", "name": "Spin", "config": {"work": 0, "max_wait_ms": 0, "devices": ["cpu"]}}
        section = {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "rescan_s": 1, "metrics": {"port": 0}}
        config = write_config(root, {"steps": [step], "daemon": section})
        env = {"REELFLOW_EXTRA_STAGES": "Test.Spin=tests.stages_for_tests:Spin"}
        with DaemonProcess(config, env=env) as daemon:
            pid = daemon.process.pid
            done_dir = daemon.inbox / ".done"
            dropped = 0

            def finish(target: int) -> None:
                nonlocal dropped
                deadline = time.monotonic() + args.timeout
                while True:
                    finished = len(os.listdir(done_dir)) if done_dir.is_dir() else 0
                    if finished >= target:
                        return
                    while dropped < target and dropped - finished < JOBS_IN_FLIGHT:
                        staged = staging / f"j{dropped:07d}.jsonl"
                        staged.write_text(json.dumps({"id": "a", "n": dropped}) + "\n")
                        staged.rename(daemon.inbox / staged.name)
                        dropped += 1
                    if time.monotonic() > deadline or daemon.process.poll() is not None:
                        raise RuntimeError(f"{finished} of {target} jobs done:\n{daemon.log()[-2000:]}")
                    time.sleep(0.05)

            warm = min(1000, max(1, args.jobs // 10))
            finish(warm)  # first jobs fill caches (imports, allocator pools) that later ones reuse
            time.sleep(1.0)
            baseline = status_kb(pid, "VmRSS")
            started = time.monotonic()
            series = []  # RSS every fifth of the run: flat, or still climbing?
            for fifth in range(1, 6):
                finish(warm + args.jobs * fifth // 5)
                series.append(status_kb(pid, "VmRSS") / 1024)
            elapsed = time.monotonic() - started
            time.sleep(1.0)
            after = status_kb(pid, "VmRSS")
            assert daemon.stop() == 0, daemon.log()[-2000:]
        growth_mb = (after - baseline) / 1024
        per_job = (after - baseline) * 1024 / args.jobs
        projected = per_job * 100_000 / 2**20
        print(f"jobs={args.jobs} (after {warm} warm-up jobs) in {elapsed:.1f} s ({args.jobs / elapsed:,.0f} jobs/s)")
        print(f"RSS: after warm-up {baseline / 1024:.1f} MiB, after {args.jobs} more {after / 1024:.1f} MiB")
        print("RSS each fifth of the run (MiB): " + ", ".join(f"{v:.1f}" for v in series))
        slope = (series[-1] - series[0]) * 2**20 / (args.jobs * 4 / 5)  # past the allocator's first step
        print(f"slope over the last four fifths: {slope:.0f} B/job ({slope * 100_000 / 2**20:.1f} MiB per 100,000)")
        print(
            f"growth = {growth_mb:.1f} MiB ({per_job:.0f} B/job; {projected:.1f} MiB per 100,000 jobs); "
            f"goal < {JOBS_GOAL_MB} MB per 100,000: {'met' if projected * 1.048576 < JOBS_GOAL_MB else 'MISSED'}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
