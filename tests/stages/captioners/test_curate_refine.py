"""configs/curate_caption_refine.yaml's caption part through the daemon: the shipped
Qwen2VLCaptioner (3 sampled candidates, select: clip_score) and GPTTextGenerator refinement
steps, with only the checkpoints swapped for tiny ones (captioner, CLIP) and the refiner
pointed at the real `transformers serve` test server."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.harness import REPO, DaemonProcess, write_config
from tests.stages.captioners.conftest import TINY_CONFIG

ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLIPS = ["bikes", "moving_h264", "portrait_vp9"]


def shipped_steps(*names: str) -> list[dict]:
    config = yaml.safe_load((REPO / "configs" / "curate_caption_refine.yaml").read_text())
    return [step for step in config["steps"] if step["name"] in names]


def test_caption_and_refine_steps_through_the_daemon(tiny_models, tiny_clip, clips, lm_server, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for name in CLIPS:
        shutil.copyfile(clips[name], folder / clips[name].name)
        rows.append({"id": name, "video": clips[name].name})
    (folder / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    captioner, refiner = shipped_steps("Qwen2VLCaptioner", "GPTTextGenerator")
    shipped = dict(captioner["config"])
    assert shipped["num_candidates"] == 3 and shipped["select"] == "clip_score"
    captioner["config"] |= {
        **TINY_CONFIG,
        "model_path": str(tiny_models["qwen2_vl"]),
        "select_model_path": str(tiny_clip),
        "max_new_tokens": 12,
        "batch_size": 2,
    }
    refiner["config"] |= {"model": lm_server.model, "max_tokens": 12}
    config = {
        "meta_folder": str(folder),
        "video_key": "video",
        "text_key": "caption",
        "steps": [captioner, refiner],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}},
    }
    env = ENV | {"OPENAI_API_KEY": "sk-local-test", "OPENAI_BASE_URL": lm_server.base_url}
    with DaemonProcess(write_config(tmp_path, config), env=env, start_timeout=300) as daemon:
        daemon.drop(folder / "meta.jsonl")
        state = daemon.wait_for_job("meta", timeout=400)
        results, errors = daemon.results("meta"), daemon.errors("meta")
    assert state["state"] == "done", state
    assert errors == []
    assert sorted(line["id"] for line in results) == sorted(CLIPS)
    for line in results:
        candidates, selection = line["caption_candidates"], line["caption_selection"]
        assert len(candidates) == 3, line  # (at temperature 0.7 the tiny model may repeat a sample)
        assert selection["method"] == "clip_score" and len(selection["scores"]) == 3
        assert line["caption"] == candidates[selection["index"]]
        assert selection["scores"][selection["index"]] == max(selection["scores"])
        assert all(-1 <= score <= 1 for score in selection["scores"])  # cosines
        assert "tiny-clip" in selection["reason"]  # scored under the step's select_model_path
        assert isinstance(line["prompt"], str) and line["prompt"]  # the refinement, next to the caption
        assert not {"_select_frames", "_caption_input", "_frame_times_s"} & set(line), sorted(line)  # step-internal
