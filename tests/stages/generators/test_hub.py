"""A tiny pipeline placed in a hub cache loads through its real hub id, offline: the exact code
path of `model_path: black-forest-labs/FLUX.1-dev`. Runs in a subprocess because huggingface_hub
reads HF_HOME and HF_HUB_OFFLINE when it is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.harness import REPO
from tests.tiny.diffusers_pipelines import place_in_hub_cache

ROOT = REPO

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pydantic import ValidationError
from stages.registry import stage_class

out = {}
flux = stage_class("ImageGenerator", "FLUXGenerator")
config = flux.Config(model_path="black-forest-labs/FLUX.1-dev", height=16, width=32, num_inference_steps=2)
stage = flux(config, "cpu")
stage.load()
[result] = stage.process([{"id": "h1", "_job": "hub", "_media_dir": Path(sys.argv[1]), "text": "a cat"}])
out["image"] = str(result["image"])
# The same hub id given to a stage for another pipeline is refused from the cached model_index.json.
try:
    stage_class("ImageGenerator", "StableDiffusionGenerator").Config(model_path="black-forest-labs/FLUX.1-dev")
except ValidationError as error:
    out["refused"] = str(error)
# A hub id that is not in the cache: validation passes (checked at load), load fails offline.
sd3 = stage_class("ImageGenerator", "StableDiffusionGenerator")
missing = sd3(sd3.Config(model_path="stabilityai/stable-diffusion-3.5-large"), "cpu")
try:
    missing.load()
except Exception as error:
    out["missing"] = f"{type(error).__name__}: {error}"
print("RESULT " + json.dumps(out))
"""


def test_tiny_flux_loads_by_its_hub_id_offline(tiny_models, tmp_path, monkeypatch):
    hub_home = tmp_path / "hf_home"
    snapshot = place_in_hub_cache(tiny_models("flux"), hub_home, "black-forest-labs/FLUX.1-dev")
    assert (hub_home / "hub/models--black-forest-labs--FLUX.1-dev/refs/main").read_text() == snapshot.name
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "media")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])

    from PIL import Image

    with Image.open(out["image"]) as image:
        assert image.size == (32, 16)
    assert "holds a FluxPipeline (model_index.json _class_name)" in out["refused"]
    assert "stable-diffusion-3.5-large" in out["missing"]
