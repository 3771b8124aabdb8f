"""The README's demo command, as a new user runs it: make the sample inputs, run configs/demo.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.harness import PYTHON, REPO, read_jsonl


@pytest.mark.timeout(300)
def test_demo_config_on_the_sample_videos(tmp_path):
    made = subprocess.run(
        [PYTHON, "-m", "tests.media", "demo"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "demo" / "meta.jsonl").exists()
    config = tmp_path / "configs" / "demo.yaml"
    config.parent.mkdir()
    shutil.copyfile(REPO / "configs" / "demo.yaml", config)
    result = run_from(tmp_path, config)  # demo.yaml's paths are relative to where it is run (the repo root)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "demo" / "meta.jsonl")
    results = read_jsonl(tmp_path / "demo" / "results" / "meta.jsonl")
    errors = read_jsonl(tmp_path / "demo" / "results" / "meta.errors.jsonl")
    assert sorted(r["id"] for r in results + errors) == sorted(r["id"] for r in rows)
    assert {"bunny", "bikes", "h264", "vp9_webm", "mpeg4_avi", "mkv"} <= {r["id"] for r in results}
    assert {"truncated", "empty", "garbage"} <= {e["id"] for e in errors}
    for row in results:
        assert row["probe"]["num_frames"] > 0 and len(row["frames"]) == 4
        assert all((tmp_path / "demo" / "results" / f).is_file() for f in row["frames"])
    assert f"done: {len(results)} ok, {len(errors)} errors" in result.stdout


def run_from(cwd, config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "daemon.cli", "run", "--config", str(config), "--no-progress"],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=240,
    )
