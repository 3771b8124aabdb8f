"""`reelflow demo` as a newcomer runs it: a real subprocess, offline, with an empty hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[2]


def test_demo_captions_and_generates_offline(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "demo", "--no-progress", "--folder", str(tmp_path / "demo")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RANDOM WEIGHTS" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "demo" / "results" / "meta.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["clip0", "clip1"]  # records may finish in any order
    for row in rows:
        assert isinstance(row["caption"], str) and row["caption"]
        video = tmp_path / "demo" / "results" / row["generated_video"]
        with av.open(str(video)) as container:
            assert container.streams.video[0].frames == 8 or sum(1 for _ in container.decode(video=0)) == 8
        assert str(video.resolve()) in done.stdout
    config = (tmp_path / "demo" / "demo.yaml").read_text()
    assert "RANDOM WEIGHTS" in config and "reelflow run --config" in config
