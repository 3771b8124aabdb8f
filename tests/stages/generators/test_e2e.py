"""The nine generators from a config, as a user runs them: through `reelflow run` and through the
daemon (`reelflow serve`, a meta file dropped into its inbox); the shipped chained config
(FLUX first frame -> SVD) through the daemon with its real hub ids served from a hub cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.harness import REPO, DaemonProcess, metric_value, run_oneshot, write_config
from tests.stages.generators.conftest import IMAGE_TO_VIDEO, TINY, read_png, read_video, stage_config
from tests.tiny.diffusers_pipelines import place_in_hub_cache

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ROWS = [
    {"id": "a", "text": "a cat in a garden", "image": "cond.png"},
    {"id": "b", "text": "a dog on a beach", "image": "cond.png"},
]


def nine_step_config(tiny_models, data: Path) -> dict:
    """All nine generators in one pipeline, each writing under its own output key."""
    steps = []
    for name in TINY:
        step_type, config = stage_config(name, tiny_models, output_key=name, batch_size=2)
        steps.append({"type": step_type, "name": name, "config": config})
    return {"meta_folder": str(data), "text_key": "text", "image_key": "image", "video_key": "video", "steps": steps}


@pytest.fixture
def data(tmp_path, cond_image) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(cond_image, folder / "cond.png")
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return folder


def check_outputs(line: dict, root: Path) -> None:
    """Every generator's file exists (relative to `root`) with the frames, size and fps asked for."""
    for name, (step_type, _, settings) in TINY.items():
        path = root / line[name]
        assert path.is_file(), (name, line[name])
        if step_type == "ImageGenerator":
            assert read_png(path).shape == (settings["height"], settings["width"], 3)
            continue
        frames, fps, codec, pix_fmt = read_video(path)
        size = (settings.get("height", 16), settings.get("width", 16))  # CogVideoX-I2V: trained 16x16
        assert frames.shape == (settings["num_frames"], *size, 3), name
        assert (fps, codec, pix_fmt) == (12.0, "h264", "yuv420p"), name
    assert {name for name in IMAGE_TO_VIDEO} <= set(line)


def test_nine_generators_through_reelflow_run(tiny_models, data, tmp_path):
    config = {"meta_path": str(data / "prompts.jsonl"), "save_folder": str(tmp_path / "results")}
    config |= nine_step_config(tiny_models, data)
    path = write_config(tmp_path, config)
    done = run_oneshot(path, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = tmp_path / "results"
    lines = [json.loads(line) for line in (results / "prompts.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"]
    assert not (results / "prompts.errors.jsonl").exists() or not (results / "prompts.errors.jsonl").read_text()
    for line in lines:
        assert line["FLUXGenerator"] == f"media/{line['id']}~FLUXGenerator.png"
        check_outputs(line, results)


def test_nine_generators_through_the_daemon(tiny_models, data, tmp_path):
    config = nine_step_config(tiny_models, data)
    config["daemon"] = {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}}
    with DaemonProcess(write_config(tmp_path, config), env=ENV, start_timeout=300) as daemon:
        daemon.drop(data / "prompts.jsonl")
        state = daemon.wait_for_job("prompts", timeout=600)
        metrics = daemon.metrics()
        results, errors = daemon.results("prompts"), daemon.errors("prompts")
    assert state["state"] == "done", state
    assert errors == []
    assert sorted(line["id"] for line in results) == ["a", "b"]
    for line in results:
        assert line["SVDGenerator"] == f"media/prompts/{line['id']}~SVDGenerator.mp4"
        check_outputs(line, daemon.outbox)
    step = next(s for s in _step_labels(metrics) if s.endswith("_CogVideoXT2VGenerator"))
    assert metric_value(metrics, "reelflow_generated_frames_total", step=step) == 2 * 9


def _step_labels(metrics: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.labels["step"]
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if "step" in sample.labels
    }


def test_shipped_chained_config_through_the_daemon(tiny_models, tmp_path):
    """configs/flux_then_svd.yaml as shipped (real hub ids), the tiny models standing in for the
    real ones in a hub cache; only sizes and steps are shrunk."""
    config = yaml.safe_load((REPO / "configs" / "flux_then_svd.yaml").read_text())
    hub_home = tmp_path / "hf_home"
    tiny_for = {"FLUXGenerator": "flux", "SVDGenerator": "svd"}
    for step in config["steps"]:
        place_in_hub_cache(tiny_models(tiny_for[step["name"]]), hub_home, step["config"]["model_path"])
        step["config"].update(height=32, width=48, num_inference_steps=2)
    config["steps"][1]["config"]["num_frames"] = 4
    config["daemon"] |= {"settle_ms": 200, "metrics": {"port": 0}}
    prompts = REPO / config["meta_path"]
    with DaemonProcess(
        write_config(tmp_path, config), env=ENV | {"HF_HOME": str(hub_home)}, start_timeout=300
    ) as daemon:
        daemon.drop(prompts)
        state = daemon.wait_for_job(prompts.stem, timeout=600)
        results, errors = daemon.results(prompts.stem), daemon.errors(prompts.stem)
    assert state["state"] == "done" and errors == [], (state, errors)
    assert len(results) == len(prompts.read_text().splitlines()) == 3
    for line in results:
        assert (line["first_frame"], line["video"]) == (
            f"media/{prompts.stem}/{line['id']}~first_frame.png",
            f"media/{prompts.stem}/{line['id']}.mp4",
        )
        first = read_png(daemon.outbox / line["first_frame"])
        frames, fps, _, _ = read_video(daemon.outbox / line["video"])
        assert first.shape == (32, 48, 3) and frames.shape == (4, 32, 48, 3) and fps == 7.0
