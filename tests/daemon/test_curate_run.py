"""The README's curation run: `reelflow run --config configs/curate_clips.yaml` on the multi-shot
video of `python -m tests.media` (different sources joined with hard cuts at known frames): the
clips found, the still shot filtered with its reason, and a progress bar whose total counts the
clips the video fans out into (it ends at N/N, not past its row count)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.harness import PYTHON, REPO, _env, read_jsonl
from tests.media import write_multi_shot

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")
pytestmark = pytest.mark.timeout(300)


def test_curate_clips_on_the_multi_shot_video(tmp_path):
    videos = tmp_path / "demo" / "videos"
    videos.mkdir(parents=True)
    layout = write_multi_shot(videos / "multi_shot.mp4")
    (tmp_path / "demo" / "meta.jsonl").write_text(json.dumps({"id": "multi", "video": "multi_shot.mp4"}) + "\n")
    (tmp_path / "configs").mkdir()
    shutil.copyfile(REPO / "configs" / "curate_clips.yaml", tmp_path / "configs" / "curate_clips.yaml")
    run = subprocess.run(
        [PYTHON, "-m", "daemon.cli", "run", "--config", "configs/curate_clips.yaml"],
        cwd=tmp_path,
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "demo" / "clips"
    results, filtered = read_jsonl(out / "meta.jsonl"), read_jsonl(out / "meta.filtered.jsonl")
    assert not (out / "meta.errors.jsonl").exists() or not read_jsonl(out / "meta.errors.jsonl")

    # curate_clips keeps shots of >= 1 s: every planted shot but the 12-frame one is a clip.
    long_shots = [s for s in layout["shots"] if s["num_frames"] >= 25]
    assert len(long_shots) == len(layout["shots"]) - 1
    clips = {r["id"]: r["clip"] for r in results} | {f["id"]: f["record"]["clip"] for f in filtered}
    assert len(results) + len(filtered) == len(clips) == len(long_shots)  # each clip ends exactly once
    assert sorted((c["start_frame"], c["num_frames"]) for c in clips.values()) == [
        (s["start_frame"], s["num_frames"]) for s in long_shots
    ]
    by_shot = {s["name"]: f"multi:{k:04d}" for k, s in enumerate(long_shots)}
    kept = {r["id"]: r for r in results}
    assert {by_shot["pan"], by_shot["pan2"]} <= set(kept), filtered  # the synthetic pans move
    (still,) = [f for f in filtered if f["id"] == by_shot["still"]]
    assert still["step"].endswith("MotionFilter") and "too still" in still["reason"], still
    assert still["scores"]["motion_score"] < 0.3 < kept[by_shot["pan"]]["motion_score"]
    for row in results:
        assert (out / row["video"]).is_file() and len(row["frames"]) == 4

    # The bar's last line: every clip counted against a total that grew with the fan-out.
    bar = [line for line in re.split(r"[\r\n]", run.stderr) if "rec" in line and "/" in line][-1]
    counts = re.search(r"\| (\d+)/(\d+) \[", bar)
    assert counts, f"no N/total in the bar's last line: {bar!r}"
    done, total = map(int, counts.groups())
    assert (done, total) == (len(clips), len(clips)), bar
    assert f"ok={len(results)}" in bar and f"filtered={len(filtered)}" in bar, bar
