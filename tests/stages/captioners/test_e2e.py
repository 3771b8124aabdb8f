"""The captioners as a user runs them: the seed-shaped config (configs/caption_qwen2vl.yaml)
through `python run_pipeline.py` (model_path pointed at the tiny model's folder) and dropped
into the daemon's inbox (model_path unchanged: the tiny model sits in a hub cache under
Qwen/Qwen2-VL-7B-Instruct and loads by that id, offline), and all four captioners chained
through the daemon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.harness import REPO, DaemonProcess, metric_value, run_oneshot, write_config
from tests.stages.captioners.conftest import FAMILIES, TINY_CONFIG
from tests.tiny.diffusers_pipelines import place_in_hub_cache

ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GOOD = ["bikes", "bigbuckbunny", "moving_h264"]
# id -> error type; a missing file is refused by the reader before any step sees it.
BROKEN = {"garbage": "VideoDecodeError", "audio_only": "NoVideoStream", "missing": "FileNotFound"}


@pytest.fixture
def data(tmp_path, clips, broken_videos) -> Path:
    """A meta folder with good and broken videos and a meta.jsonl naming them."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for name in GOOD:
        shutil.copyfile(clips[name], folder / clips[name].name)
        rows.append({"id": name, "video": clips[name].name, "title": name})
    for name in BROKEN:
        path = broken_videos[name][0]
        if path.exists():
            shutil.copyfile(path, folder / path.name)
        rows.append({"id": name, "video": path.name, "title": name})
    (folder / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def seed_config(data: Path, tmp_path: Path, model_path: Path | None = None) -> dict:
    config = yaml.safe_load((REPO / "configs" / "caption_qwen2vl.yaml").read_text())
    if model_path is not None:
        config["steps"][0]["config"]["model_path"] = str(model_path)
    config |= {
        "meta_path": str(data / "meta.jsonl"),
        "meta_folder": str(data),
        "base_folder": str(tmp_path / "work"),
        "save_folder": str(tmp_path / "results"),
    }
    return config


def check_errors(errors: list[dict], step_suffix: str) -> None:
    assert {line["id"]: line["error"] for line in errors} == BROKEN
    for line in errors:
        assert line["step"] == "read" if line["id"] == "missing" else line["step"].endswith(step_suffix), line
        assert line["record"]["video"], line
        assert line["message"]


def test_seed_config_through_run_pipeline(tiny_models, data, tmp_path):
    config = seed_config(data, tmp_path, model_path=tiny_models["qwen2_vl"])
    done = run_oneshot(write_config(tmp_path, config), env=ENV, entry="seed")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = tmp_path / "results"
    lines = [json.loads(line) for line in (results / "meta.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == GOOD
    for line in lines:
        assert isinstance(line["text"], str) and line["video"] and line["title"] == line["id"]
    errors = [json.loads(line) for line in (results / "meta.errors.jsonl").read_text().splitlines()]
    check_errors(errors, "VideoCaptioner_Qwen2VLCaptioner")


def test_seed_config_dropped_into_the_daemon(tiny_models, data, tmp_path, clips):
    config = seed_config(data, tmp_path)  # model_path: Qwen/Qwen2-VL-7B-Instruct, as shipped
    hub_home = tmp_path / "hf_home"
    place_in_hub_cache(tiny_models["qwen2_vl"], hub_home, config["steps"][0]["config"]["model_path"])
    config["daemon"] |= {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}}
    env = ENV | {"HF_HOME": str(hub_home), "HF_HUB_CACHE": str(hub_home / "hub")}
    with DaemonProcess(write_config(tmp_path, config), env=env, start_timeout=300) as daemon:
        daemon.drop(data / "meta.jsonl")
        daemon.drop(clips["portrait_vp9"], "phone.webm")  # a raw video is a job of its own
        state = daemon.wait_for_job("meta", timeout=300)
        raw_state = daemon.wait_for_job("phone", timeout=300)
        metrics = daemon.metrics()
        results, errors = daemon.results("meta"), daemon.errors("meta")
        raw = daemon.results("phone")
    assert state["state"] == "done" and raw_state["state"] == "done", (state, raw_state)
    assert sorted(line["id"] for line in results) == sorted(GOOD)
    assert all(isinstance(line["text"], str) for line in results + raw) and len(raw) == 1
    check_errors(errors, "VideoCaptioner_Qwen2VLCaptioner")
    step = "step_0_VideoCaptioner_Qwen2VLCaptioner"
    assert metric_value(metrics, "reelflow_records_total", step=step, status="ok") == len(GOOD) + 1
    assert (
        metric_value(metrics, "reelflow_records_total", step=step, status="error") == len(BROKEN) - 1
    )  # "missing": read
    assert metric_value(metrics, "reelflow_tokens_out_total", step=step) > 0
    assert metric_value(metrics, "reelflow_tokens_in_total", step=step) > 0


def test_four_captioners_through_the_daemon(tiny_models, data, tmp_path):
    steps = [
        {
            "type": "VideoCaptioner",
            "name": name,
            "config": {
                **TINY_CONFIG,
                "model_path": str(tiny_models[family]),
                "prompt": "Describe {title}.",
                "output_key": family,
                "batch_size": 4,
            },
        }
        for family, name in FAMILIES.items()
    ]
    config = {
        "meta_folder": str(data),
        "video_key": "video",
        "text_key": "text",
        "steps": steps,
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}},
    }
    with DaemonProcess(write_config(tmp_path, config), env=ENV, start_timeout=300) as daemon:
        daemon.drop(data / "meta.jsonl")
        state = daemon.wait_for_job("meta", timeout=300)
        results, errors = daemon.results("meta"), daemon.errors("meta")
    assert state["state"] == "done", state
    assert sorted(line["id"] for line in results) == sorted(GOOD)
    for line in results:
        assert all(isinstance(line[family], str) for family in FAMILIES), line
        assert "text" not in line  # every step wrote under its own output_key
    check_errors(errors, "VideoCaptioner_Qwen2VLCaptioner")  # broken files stop at the first step
