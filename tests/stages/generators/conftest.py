"""Fixtures for the generator tests: tiny diffusers pipelines built once per session, records, readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny import diffusers_pipelines as tiny

# Stage settings that fit each tiny model (see tests/tiny/diffusers_pipelines.py), by registry name.
TINY = {
    "FLUXGenerator": ("ImageGenerator", "flux", {"height": 16, "width": 32}),
    "StableDiffusionGenerator": ("ImageGenerator", "sd3", {"height": 16, "width": 32}),
    "AllegroGenerator": ("VideoGenerator", "allegro", {"height": 128, "width": 128, "num_frames": 24}),
    "AnimateDiffGenerator": ("VideoGenerator", "motion_adapter", {"height": 32, "width": 32, "num_frames": 8}),
    "CogVideoXT2VGenerator": ("VideoGenerator", "cogvideox_t2v", {"height": 16, "width": 32, "num_frames": 9}),
    "CogVideoXGenerator": ("VideoGenerator", "cogvideox_i2v", {"num_frames": 9}),
    "I2VGenXLGenerator": ("VideoGenerator", "i2vgen_xl", {"height": 32, "width": 24, "num_frames": 8}),
    "ModelScopeT2VGenerator": ("VideoGenerator", "modelscope_t2v", {"height": 24, "width": 32, "num_frames": 8}),
    "SVDGenerator": ("VideoGenerator", "svd", {"height": 32, "width": 48, "num_frames": 4}),
}
IMAGE_TO_VIDEO = {"CogVideoXGenerator", "I2VGenXLGenerator", "SVDGenerator"}


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test machine's cores are shared: one thread per op is several times faster than two here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(name)` -> folder of the saved tiny pipeline `name`, built on first use."""
    root = tmp_path_factory.mktemp("tiny_diffusers")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny.save_tiny(name, root / name, work=root / "tokenizers" / name)
            if name == "motion_adapter":
                get("animatediff_base")
        return built[name]

    return get


def stage_config(name: str, tiny_models, **overrides) -> tuple[str, dict]:
    """(step type, config dict) running registry stage `name` on its tiny model for 2 steps."""
    step_type, model, settings = TINY[name]
    config = {"model_path": str(tiny_models(model)), "num_inference_steps": 2, **settings}
    if name == "AnimateDiffGenerator":
        config["base_model_path"] = str(tiny_models("animatediff_base"))
    if step_type == "VideoGenerator":
        config["fps"] = 12
    config.update(overrides)
    return step_type, config


@pytest.fixture(scope="session")
def cond_image(tmp_path_factory) -> Path:
    """A 48x40 conditioning image with structure (not noise), for the image-to-video models."""
    from PIL import Image

    y, x = np.mgrid[0:40, 0:48]
    rgb = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("images") / "cond.png"
    Image.fromarray(rgb).save(path)
    return path


def make_record(record_id: str, media: Path, image: Path | None = None, text: str = "a cat walks in a garden"):
    record = {"id": record_id, "_job": "job", "_media_dir": media, "text": text}
    if image is not None:
        record["image"] = image
    return record


def read_video(path: Path) -> tuple[np.ndarray, float, str, str]:
    """(frames T x H x W x 3, fps, codec, pix_fmt) read back with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name, stream.codec_context.pix_fmt


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))
