"""`reelflow demo`: the main job (caption videos, then generate a video from each caption) end to end,
offline, on tiny random-weight models built on the spot.

Everything lands under one folder (default `reelflow-demo/`): `videos/` (a few synthetic clips
encoded here), `models/` (a ~0.2 M-parameter Qwen2-VL captioner and a tiny ModelScope
text-to-video pipeline, built from config objects with a tokenizer trained on the spot),
`demo.yaml` (the config it runs, an ordinary one-shot config) and `results/`. Captions are
random tokens and the generated videos noise: this shows the pipeline working, not a model.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import yaml

BANNER = "RANDOM WEIGHTS: tiny untrained models; the captions are random tokens and the videos noise"
CAPTIONER_DIR, GENERATOR_DIR = "tiny-qwen2-vl", "tiny-modelscope-t2v"


def encode_clip(path: Path, seed: int, frames: int = 16, size: tuple[int, int] = (96, 64), fps: int = 8) -> Path:
    """A clip of moving colour bars (h264, PyAV), different for each seed."""
    import av
    import numpy as np

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        x, y = np.arange(width)[None, :], np.arange(height)[:, None]
        for n in range(frames):
            image = np.stack(
                [
                    (x * 255 // width + n * 8 * (seed + 1)) % 256 + 0 * y,
                    (y * 255 // height + seed * 60) % 256 + 0 * x,
                    np.full((height, width), (n * 10 + seed * 90) % 256),
                ],
                axis=2,
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_inputs(folder: Path, clips: int = 2) -> Path:
    videos = folder / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    meta = folder / "meta.jsonl"
    with meta.open("w", encoding="utf-8") as handle:
        for n in range(clips):
            name = f"clip{n}.mp4"
            if not (videos / name).is_file():
                encode_clip(videos / name, seed=n)
            handle.write(json.dumps({"id": f"clip{n}", "video": name}) + "\n")
    return meta


def build_models(models: Path) -> tuple[Path, Path]:
    """The two tiny checkpoints, built once (a second demo reuses them)."""
    from daemon.demo.tiny_diffusers import modelscope_t2v
    from daemon.demo.tiny_qwen2vl import build_qwen2_vl

    captioner, generator = models / CAPTIONER_DIR, models / GENERATOR_DIR
    if not (captioner / "config.json").is_file():
        build_qwen2_vl(captioner)
    if not (generator / "model_index.json").is_file():
        modelscope_t2v(models / ".tokenizers").save_pretrained(str(generator))
    return captioner, generator


def demo_config(folder: Path, captioner: Path, generator: Path) -> dict:
    return {
        "meta_path": str(folder / "meta.jsonl"),
        "meta_folder": str(folder / "videos"),
        "base_folder": str(folder / "work"),
        "save_folder": str(folder / "results"),
        "video_key": "video",
        "text_key": "caption",
        "steps": [
            {
                "type": "VideoCaptioner",
                "name": "Qwen2VLCaptioner",
                # For real captions: model_path: Qwen/Qwen2-VL-2B-Instruct on a GPU, with
                # pip install 'reelflow[vllm]' (backend: auto then picks vLLM).
                "config": {
                    "model_path": str(captioner),
                    "backend": "transformers",
                    "num_frames": 4,
                    "max_pixels": 112 * 112,
                    "max_model_len": 640,
                    "max_new_tokens": 12,
                    "devices": ["cpu"],
                },
            },
            {
                "type": "VideoGenerator",
                "name": "ModelScopeT2VGenerator",
                "config": {
                    "model_path": str(generator),
                    "output_key": "generated_video",
                    "height": 32,
                    "width": 32,
                    "num_frames": 8,
                    "num_inference_steps": 2,
                    "seed": 0,
                    "devices": ["cpu"],
                },
            },
        ],
    }


def prepare(folder: Path) -> Path:
    """Inputs, models and config under `folder`; returns the config file."""
    folder.mkdir(parents=True, exist_ok=True)
    write_inputs(folder)
    captioner, generator = build_models(folder / "models")
    config = folder / "demo.yaml"
    header = f"# Written by `reelflow demo`; {BANNER}.\n# Run it again with: reelflow run --config {config}\n"
    config.write_text(header + yaml.safe_dump(demo_config(folder, captioner, generator), sort_keys=False))
    return config


def show(results: Path, out=print) -> int:
    """Print each result's caption and generated video, labelled; returns how many have both."""
    complete = 0
    out(f"--- {BANNER} ---")
    for line in results.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        video = row.get("generated_video")
        path = (results.parent / video).resolve() if video else None
        out(f"{row['id']}: caption {row.get('caption')!r} -> generated video {path}")
        complete += bool(row.get("caption")) and path is not None and path.is_file()
    return complete
