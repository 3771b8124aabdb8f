"""ShotSplitter and the PySceneDetect CLI agree on the planted cuts: bench/split.py's part 1, one
round (the bench itself asserts the cuts; its timings are not checked here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.harness import REPO

pytest.importorskip("scenedetect")
CLI = shutil.which("scenedetect") or shutil.which("scenedetect", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(CLI is None, reason="the `scenedetect` command is not installed (pip install scenedetect)")
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_split_part_1_finds_the_planted_cuts_on_both_sides():
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{os.path.dirname(CLI)}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "split.py"), "--part", "shots", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    found = re.findall(r"part 1, (\w+) \(\d+ frames\): both found the planted cuts \[([\d, ]+)\]", done.stdout)
    assert [size for size, _ in found] == ["360p", "720p"], done.stdout
    assert all(len(cuts.split(",")) >= 4 for _, cuts in found), done.stdout
    assert re.search(r"all videos: ratio = [\d.]+", done.stdout), done.stdout
