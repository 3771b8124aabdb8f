"""`reelflow run` with CLIPEmbedder -> AestheticFilter on clips encoded here: scores in the results,
the vectors in save_folder/<job>.embeddings.parquet beside them, min_score drops into the filtered file."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from tests.harness import read_jsonl, run_oneshot, write_config
from tests.stages.embed_media import scene
from tests.stages.embedders.test_embedders import laion_head
from tests.tiny.clip import TINY_CLIP_DIM

NAMES = [f"s{n}" for n in range(5)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oneshot-data")
    for n, name in enumerate(NAMES):
        scene(folder / f"{name}.mp4", seed=n)
    rows = [{"id": name, "video": f"{name}.mp4", "text": f"a scene number {n}"} for n, name in enumerate(NAMES)]
    (folder / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save(laion_head(TINY_CLIP_DIM), folder / "head.pth")
    return folder


def _run(tmp_path, data, tiny_clip, **aesthetic):
    shutil.copytree(data, tmp_path / "data")
    steps = [
        {"type": "VideoEmbedder", "name": "CLIPEmbedder", "config": {"model_path": str(tiny_clip), "num_frames": 4}},
        {
            "type": "VideoFilter",
            "name": "AestheticFilter",
            "config": {"model_path": str(tiny_clip), "head_path": str(tmp_path / "data" / "head.pth"), **aesthetic},
        },
    ]
    config = write_config(
        tmp_path, {"meta_path": "data/meta.jsonl", "base_folder": "work", "save_folder": "out", "steps": steps}
    )
    done = run_oneshot(config, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    return read_jsonl(out / "meta.jsonl"), read_jsonl(out / "meta.filtered.jsonl"), out


def test_scores_and_embeddings_beside_the_results_then_min_score(tmp_path, data, tiny_clip):
    results, filtered, out = _run(tmp_path / "all", data, tiny_clip)
    assert not filtered and sorted(r["id"] for r in results) == NAMES
    table = pq.read_table(out / "meta.embeddings.parquet")
    ids = table.column("id").to_pylist()
    assert sorted(ids) == NAMES
    for line in results:
        assert ids[line["embedding_index"]] == line["id"]
        assert isinstance(line["aesthetic_score"], float) and -1 <= line["clip_text_score"] <= 1
        assert "embedding" not in line
    scores = {r["id"]: r["aesthetic_score"] for r in results}
    assert len(set(scores.values())) > 1  # different clips, different scores
    cut = sorted(scores.values())[2]
    results, filtered, out = _run(tmp_path / "cut", data, tiny_clip, min_score=cut)
    assert sorted(r["id"] for r in results) == sorted(k for k, v in scores.items() if v >= cut)
    assert sorted(f["id"] for f in filtered) == sorted(k for k, v in scores.items() if v < cut)
    for entry in filtered:
        assert entry["scores"]["aesthetic_score"] == scores[entry["id"]] and "below min_score" in entry["reason"]
        assert entry["step"] == "step_1_VideoFilter_AestheticFilter"
        assert "embedding" not in entry["record"]
    # only results get rows: the filtered clips' vectors are not in the dataset
    assert sorted(pq.read_table(out / "meta.embeddings.parquet").column("id").to_pylist()) == sorted(
        r["id"] for r in results
    )
