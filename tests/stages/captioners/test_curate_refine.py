"""configs/curate_caption_refine.yaml's caption part through the daemon: the shipped
Qwen2VLCaptioner (3 sampled candidates, select: clip_score) and GPTTextGenerator refinement
steps, with only the checkpoints swapped for tiny ones (captioner, CLIP) and the refiner
pointed at the real `transformers serve` test server."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.harness import REPO, DaemonProcess, read_jsonl, write_config
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


def test_the_whole_config_through_the_daemon(tiny_models, tiny_clip, lm_server, tmp_path):
    """Every shipped step, checkpoints swapped for tiny ones: three scenes, one of them a re-encode
    of another; each record ends in exactly one of results and filtered, the re-encode as a
    near-duplicate of its original, and every kept shot is captioned, selected and refined."""
    import torch

    from tests.stages.embed_media import reencode, scene
    from tests.stages.embedders.test_embedders import laion_head
    from tests.tiny.clip import TINY_CLIP_DIM

    folder = tmp_path / "data"
    folder.mkdir()
    scene(folder / "a.mp4", seed=0, frames=36)
    scene(folder / "b.mp4", seed=1, frames=36)
    reencode(folder / "a.mp4", folder / "a_copy.mp4")
    rows = [{"id": name, "video": f"{name}.mp4"} for name in ("a", "b", "a_copy")]
    (folder / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    torch.save(laion_head(TINY_CLIP_DIM), folder / "head.pth")

    config = yaml.safe_load((REPO / "configs" / "curate_caption_refine.yaml").read_text())
    steps = {step["name"]: step["config"] for step in config["steps"]}
    steps["MotionFilter"]["min_score"] = 0.05  # the synthetic blobs drift slowly (motion_score ~0.09)
    steps["CLIPEmbedder"]["model_path"] = str(tiny_clip)
    # a random head's scale means nothing: keep every shot rather than a random half
    steps["AestheticFilter"] |= {"model_path": str(tiny_clip), "head_path": str(folder / "head.pth"), "min_score": None}
    steps["Qwen2VLCaptioner"] |= {
        **TINY_CONFIG,
        "model_path": str(tiny_models["qwen2_vl"]),
        "select_model_path": str(tiny_clip),
        "max_new_tokens": 12,
    }
    steps["GPTTextGenerator"] |= {"model": lm_server.model, "max_tokens": 12}
    config |= {"meta_folder": str(folder)}
    config["daemon"] = {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}}
    env = ENV | {"OPENAI_API_KEY": "sk-local-test", "OPENAI_BASE_URL": lm_server.base_url}
    with DaemonProcess(write_config(tmp_path, config), env=env, start_timeout=300) as daemon:
        daemon.drop(folder / "meta.jsonl")
        state = daemon.wait_for_job("meta", timeout=500)
        results, errors = daemon.results("meta"), daemon.errors("meta")
        filtered = read_jsonl(daemon.outbox / "meta.filtered.jsonl")
    assert state["state"] == "done", state
    assert errors == []
    sources = {line["id"].split(":")[0] for line in results + filtered}
    assert sources == {"a", "b", "a_copy"}  # every input ends somewhere
    assert not {line["id"] for line in results} & {line["id"] for line in filtered}
    duplicates = [line for line in filtered if line["step"].endswith("NearDuplicateFilter")]
    assert [line["id"].split(":")[0] for line in duplicates] == ["a_copy"], filtered
    assert {line["id"].split(":")[0] for line in results} == {"a", "b"}
    for line in results:
        assert isinstance(line["aesthetic_score"], float) and isinstance(line["embedding_index"], int)
        selection = line["caption_selection"]
        assert selection["method"] == "clip_score" and len(line["caption_candidates"]) == 3
        assert "embedded by CLIPEmbedder" in selection["reason"]  # same CLIP model: its frames are reused
        assert line["caption"] == line["caption_candidates"][selection["index"]]
        assert isinstance(line["prompt"], str) and line["prompt"]
