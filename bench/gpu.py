"""The GPU check: full-size captioners and a generator with random weights, engine vs sequential loop.

    python bench/gpu.py              # cuda:0, bf16, full-size models (fits in ~8 minutes on one GPU)
    python bench/gpu.py --smoke      # the same code on CPU with the tiny test models (CI runs this)

Needs only PyTorch, transformers and diffusers: no vLLM, no network, no weights. Each model is
built from its real architecture config (bench/configs/*.json) with random weights, straight
on the device (no 16 GB checkpoint is written or read). The processor and tokenizer come from
the tiny test builders (a BPE tokenizer trained on the spot); the config's special-token ids
are remapped onto that tokenizer's, which changes no shape.

For each captioner family the same videos go through
- the sequential loop: decode + sample + preprocess + generate, one video at a time;
- the engine: `daemon.runtime.engine.Engine` as `serve`/`run` use it, `batch_size` > 1, prepare
  threads ahead of the model.
Every caption is exactly `--new-tokens` long (min_new_tokens = max_new_tokens), so random
weights cannot stop early and tokens/s compares like for like. The GPU's busy fraction is
sampled through NVML (`nvidia-ml-py`) every 50 ms while each side runs; null where NVML or a
GPU is missing. Then one CogVideoX-2b transformer (49 frames at 480x720, i.e. 13x60x90
latents) runs `--steps` denoising steps (the text encoder and VAE are not part of the timing).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CONFIGS = REPO / "bench" / "configs"
# family -> (full-size config shipped here, the special-token ids to remap: config key -> token)
FULL = {
    "qwen2_vl": (
        "qwen2-vl-7b-instruct.json",
        {
            "bos_token_id": "<|endoftext|>",
            "eos_token_id": "<|im_end|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
            "vision_token_id": "<|video_pad|>",
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
        },
    ),
    "llava_onevision": (
        "llava-onevision-qwen2-7b-ov.json",
        {"image_token_index": "<image>", "video_token_index": "<video>"},
    ),
}
LLAVA_SIDE = 384  # SigLIP-so400m's input side in LLaVA-OneVision


class BusySampler:
    """NVML utilization of one GPU, sampled on a thread; `fraction` is None without NVML/GPU."""

    def __init__(self, index: int = 0, period: float = 0.05):
        self.period, self.samples, self._stop = period, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no nvidia-ml-py, no driver or no GPU: report null, not a guess
            self._nvml = self._handle = None

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 3) if self.samples else None


def full_size_folder(family: str, folder: Path) -> Path:
    """The tiny model's processor and tokenizer with the full-size config.json, weights removed."""
    import transformers

    from tests.tiny.captioners import BUILDERS

    BUILDERS[family](folder)
    name, remap = FULL[family]
    config = json.loads((CONFIGS / name).read_text())
    processor = transformers.AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    for key, token in remap.items():
        config[key] = tokenizer.convert_tokens_to_ids(token)
    text = config.get("text_config", config)
    text["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text["pad_token_id"] = tokenizer.pad_token_id
    if family == "llava_onevision":  # the tiny processor resizes to 112 px; the real tower takes 384
        side = {"height": LLAVA_SIDE, "width": LLAVA_SIDE}
        processor.video_processor.size = processor.image_processor.size = side
        processor.num_image_tokens = (LLAVA_SIDE // 14) ** 2
        processor.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def random_weight_loading(device: str, new_tokens: int) -> None:
    """Make `AutoModelForImageTextToText.from_pretrained` build the model from its config with random
    weights, allocated on `device` directly (the stage then moves it there: a no-op), and force
    exactly `new_tokens` tokens per caption. The stage's own loading code runs unchanged."""
    import torch
    import transformers

    auto = transformers.AutoModelForImageTextToText

    def from_pretrained(path, *, dtype=None, trust_remote_code=False, **_):
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or torch.float32)
        try:
            with torch.device(device):
                model = auto.from_config(config, trust_remote_code=trust_remote_code)
        finally:
            torch.set_default_dtype(previous)
        model.generation_config.min_new_tokens = new_tokens
        model.generation_config.max_new_tokens = new_tokens
        return model

    auto.from_pretrained = from_pretrained


def peak_memory(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


async def run_engine(config_path: Path, rows: Path, out: Path, device: str):
    """bench/caption.py's engine run, with NVML sampling around the job only (not model loading)."""
    from daemon.config import load_config
    from daemon.io.outbox import OutboxLayout
    from daemon.metrics import Metrics
    from daemon.runtime.engine import Engine, JobInput

    layout = OutboxLayout.one_shot((out / "base").resolve(), (out / "save").resolve())
    engine = Engine(load_config(config_path), layout, Metrics())
    await engine.start()  # loads the model: not timed
    try:
        job = JobInput(rows.stem, rows.resolve(), "jsonl", rows.name, rows.parent)
        with BusySampler() as busy:
            started = time.perf_counter()
            run = await engine.run_job(job)
            sync(device)
            elapsed = time.perf_counter() - started
    finally:
        await engine.stop()
    assert run.errors == 0, f"{run.errors} records failed in the engine run; see the log above"
    lines = [json.loads(line) for line in layout.for_job(rows.stem).results.read_text().splitlines()]
    return elapsed, {line["id"]: line["text"] for line in lines}, busy


def caption_family(family: str, args, root: Path) -> dict:
    import torch
    import yaml
    from caption import make_videos, seed_loop, write_rows

    from stages.registry import stage_class
    from tests.stages.captioners.conftest import FAMILIES

    model = root / family
    if args.smoke:
        from tests.tiny.captioners import BUILDERS

        BUILDERS[family](model)
    else:
        full_size_folder(family, model)
    data = root / f"{family}-data"
    rows = write_rows(data, make_videos(data), args.repeat)
    step = {
        "model_path": str(model),
        "backend": "transformers",
        "dtype": "auto",
        "num_frames": args.num_frames,
        "max_new_tokens": args.new_tokens,
        "max_pixels": args.max_pixels,
        "max_model_len": 32768,
        "prompt": "Describe the clip {title}.",
    }
    pipeline = {
        "meta_path": str(rows),
        "save_folder": str(root / "unused"),
        "video_key": "video",
        "text_key": "text",
        "steps": [
            {
                "type": "VideoCaptioner",
                "name": FAMILIES[family],
                "config": {
                    **step,
                    "batch_size": args.batch_size,
                    "prep_workers": args.prep_workers,
                    "devices": [args.device],
                },
            }
        ],
    }
    config_path = root / f"{family}.yaml"
    config_path.write_text(yaml.safe_dump(pipeline))
    n = len(rows.read_text().splitlines())

    cls = stage_class("VideoCaptioner", FAMILIES[family])
    stage = cls(cls.Config(**step), args.device)
    stage.load()
    seed_loop(stage, rows)  # warm-up: kernels, allocator
    before = stage.usage["tokens_out"]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    with BusySampler() as busy:
        sync(args.device)
        loop_s, loop_captions = seed_loop(stage, rows)
        sync(args.device)
    tokens = stage.usage["tokens_out"] - before
    assert tokens == n * args.new_tokens, (
        f"{family}: {tokens} tokens for {n} captions, expected {n * args.new_tokens} each"
    )
    loop = {"seconds": round(loop_s, 3), "busy": busy.fraction, "peak_bytes": peak_memory(args.device)}
    stage.close()
    del stage
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
    engine_s, engine_captions, busy = asyncio.run(run_engine(config_path, rows, root / f"{family}-engine", args.device))
    engine = {"seconds": round(engine_s, 3), "busy": busy.fraction, "peak_bytes": peak_memory(args.device)}
    assert len(engine_captions) == n, f"{family}: the engine wrote {len(engine_captions)} of {n} captions"
    for side in (loop, engine):
        side["videos_per_s"] = round(n / side["seconds"], 3)
        side["tokens_per_s"] = round(n * args.new_tokens / side["seconds"], 1)
    same = sum(loop_captions[k] == engine_captions.get(k) for k in loop_captions)
    return {
        "videos": n,
        "new_tokens": args.new_tokens,
        "loop": loop,
        "engine": engine,
        "ratio": round(loop["seconds"] / engine["seconds"], 3),
        # bf16 batched vs unbatched kernels may flip a greedy token; equality is reported, not required
        "captions_equal": f"{same}/{n}",
    }


def generator(args) -> dict:
    """CogVideoX-2b's transformer: `--steps` denoising calls on 49 frames' latents (13x60x90)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    config = json.loads((CONFIGS / "cogvideox-2b-transformer.json").read_text())
    config.pop("_class_name")
    frames, height, width, text = 13, 60, 90, config["text_embed_dim"]
    if args.smoke:  # same code, toy sizes
        config.update(num_layers=1, num_attention_heads=2, attention_head_dim=16, text_embed_dim=32)
        config.update(sample_frames=9, sample_height=8, sample_width=8)
        frames, height, width, text = 3, 8, 8, 32
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CogVideoXTransformer3DModel(**config).to(dtype).eval()
        latents = torch.randn(1, frames, config["in_channels"], height, width, dtype=dtype)
        prompt = torch.randn(1, config["max_text_seq_length"], text, dtype=dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    times = []
    with torch.inference_mode(), BusySampler() as busy:
        for step in range(args.steps + 1):  # the first call is a warm-up
            sync(args.device)
            started = time.perf_counter()
            t = torch.full((1,), 999 - step, device=args.device, dtype=torch.long)
            out = model(hidden_states=latents, encoder_hidden_states=prompt, timestep=t, return_dict=False)[0]
            latents = latents - 0.01 * out  # feed back so every step depends on the last
            sync(args.device)
            times.append(time.perf_counter() - started)
    steps = times[1:]
    return {
        "model": "CogVideoX-2b transformer" + (" (tiny)" if args.smoke else ""),
        "latents": [frames, height, width],
        "steps": len(steps),
        "seconds_per_step": round(sum(steps) / len(steps), 4),
        "busy": busy.fraction,
        "peak_bytes": peak_memory(args.device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: the code path, not the figures")
    parser.add_argument("--families", default="qwen2_vl,llava_onevision")
    parser.add_argument("--repeat", type=int, default=None, help="times the 4 clips are repeated (16 on GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prep-workers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per caption, fixed (128 on GPU)")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=None, help="per frame (360x640 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="generator steps (5 on GPU)")
    args = parser.parse_args()
    smoke = args.smoke
    args.device = "cpu" if smoke else "cuda:0"
    args.repeat = args.repeat or (1 if smoke else 16)
    args.new_tokens = args.new_tokens or (8 if smoke else 128)
    args.max_pixels = args.max_pixels or (112 * 112 if smoke else 360 * 640)
    args.steps = args.steps or (2 if smoke else 5)

    import torch
    import transformers

    if not smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, or --smoke")
    if smoke:
        torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    random_weight_loading(args.device, args.new_tokens)
    started = time.perf_counter()
    report: dict = {"smoke": smoke, "device": torch.cuda.get_device_name(0) if not smoke else "cpu"}
    report["batch_size"], report["num_frames"], report["max_pixels"] = args.batch_size, args.num_frames, args.max_pixels
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for family in args.families.split(","):
            report[family] = caption_family(family, args, Path(tmp))
            if not smoke:
                torch.cuda.empty_cache()
    report["generator"] = generator(args)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
