"""What the diffusers generators share: seeding, loading knobs and record inputs (the
load/call/write path is `_base.DiffusersGenerator`, the config keys are in _config.py, checkpoint
checks in _checkpoints.py, file writing in _media.py).

Heavy imports (torch, diffusers, av, PIL) happen inside the functions, so importing a generator
module for `reelflow check` stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stages.base import MODEL_LOADING, StageError, format_prompt
from stages.engines import torch_dtype as torch_dtype  # re-exported: the generators call common.torch_dtype
from stages.generators._checkpoints import checkpoint_json
from stages.generators._config import (  # re-exported: the generators' configs build on these
    ClipSkip as ClipSkip,
)
from stages.generators._config import (
    DecodeChunks as DecodeChunks,
)
from stages.generators._config import (
    GeneratorConfig as GeneratorConfig,
)
from stages.generators._config import (
    Guided as Guided,
)
from stages.generators._config import (
    ImageGeneratorConfig as ImageGeneratorConfig,
)
from stages.generators._config import (
    VideoGeneratorConfig as VideoGeneratorConfig,
)
from stages.generators._config import (
    text_inputs as text_inputs,
)

log = logging.getLogger("reelflow.generators")

PREPARED = "_gen"  # key under which `prepare` leaves its work in the record


# --- loading --------------------------------------------------------------------------------------

# Loading is not thread-safe (lazy modules, accelerate's init_empty_weights patching torch.nn.Module
# process-wide; see stages/base.py): generators hold the process's one model-loading lock,
# MODEL_LOADING, for all of `load` and while resolving a class by name.


def diffusers_class(name: str, *checkpoints: str):
    """`diffusers.<name>`, after importing every class the checkpoints' model_index.json names."""
    with MODEL_LOADING:
        import diffusers

        found = getattr(diffusers, name)
        for checkpoint in checkpoints:
            for value in (checkpoint_json(checkpoint, "model_index.json") or {}).values():
                if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                    with contextlib.suppress(ImportError, AttributeError):  # from_pretrained says it better
                        getattr(importlib.import_module(value[0]), value[1])
        return found


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def pretrained_kwargs(config: GeneratorConfig, dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}  # diffusers >= 0.42 (torch_dtype is deprecated there)
    if config.variant:
        kwargs["variant"] = config.variant
    return kwargs


def check_offload(config: GeneratorConfig, device: str, stage: str) -> None:
    if config.cpu_offload and not is_cuda(device):
        raise ValueError(
            f"{stage}: cpu_offload: true needs a CUDA GPU (it moves each sub-model to the GPU only while it runs), "
            f"but this worker runs on {device!r}; set cpu_offload: false or give the step a GPU in `devices`"
        )
    if config.cpu_offload:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{stage}: cpu_offload: true but torch sees no CUDA device; set cpu_offload: false")


def place(pipe, config: GeneratorConfig, device: str) -> None:
    """Move the pipeline to its device (or offload it) and silence its progress bars."""
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)


def release(device: str) -> None:
    """After dropping a pipeline: give its GPU memory back (a reload after a config change needs it)."""
    import gc

    gc.collect()
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()


class Knobs:
    """Applies the settings that can change between batches without a reload (hot reload swaps
    `stage.config` in place): the scheduler and VAE tiling/slicing. Keeps the checkpoint's own
    scheduler so that unsetting `scheduler` goes back to it."""

    def __init__(self, pipe, stage: str):
        self.pipe = pipe
        self.stage = stage
        self.base_scheduler = pipe.scheduler
        self.applied: tuple | None = None

    def sync(self, scheduler: str | None, overrides: dict[str, Any], tiling: bool | None, slicing: bool | None):
        wanted = (scheduler, json.dumps(overrides, sort_keys=True, default=str), tiling, slicing)
        if wanted == self.applied:
            return
        self.pipe.scheduler = self._scheduler(scheduler, overrides)
        vae = self.pipe.vae
        if tiling is not None:
            vae.enable_tiling() if tiling else vae.disable_tiling()
        if slicing is not None:
            vae.enable_slicing() if slicing else vae.disable_slicing()
        self.applied = wanted

    def _scheduler(self, name: str | None, overrides: dict[str, Any]):
        base = self.base_scheduler
        if name is None and not overrides:
            return base
        try:
            cls = type(base) if name is None else diffusers_class(name)
        except AttributeError:
            cls = None
        if cls is None or not hasattr(cls, "from_config"):
            compatible = sorted(c.__name__ for c in getattr(base, "compatibles", []))
            raise ValueError(
                f"{self.stage}: scheduler {name!r} is not a diffusers scheduler; schedulers compatible with "
                f"this checkpoint: {', '.join(compatible)}"
            )
        return cls.from_config(base.config, **overrides)


def clip_text_model_shim(text_encoder) -> None:
    """diffusers 0.42 reads `text_encoder.text_model.final_layer_norm` when `clip_skip` is set, but
    transformers 5's CLIPTextModel has no `text_model` (its layers sit on the model itself).
    Point `text_model` back at the model, outside torch's module registry, so clip_skip works."""
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


_said_once: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _said_once:
        _said_once.add(key)
        log.warning(message)


# --- records --------------------------------------------------------------------------------------


def record_seed(seed: int, record_id: Any, index: int = 0) -> int:
    """A 63-bit seed from the config seed, the record id and the video index (stable across runs)."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cpu_generators(seeds: Iterable[int]):
    """CPU generators: diffusers draws the noise on the CPU and moves it, so a seed gives the
    same noise on any device."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def prompt_of(record: dict[str, Any], config: GeneratorConfig, where: str) -> str:
    if config.prompt:
        return format_prompt(config.prompt, record, where=where)
    value = record.get(config.text_key)
    if not isinstance(value, str) or not value.strip():
        fields = sorted(k for k in record if not str(k).startswith("_"))
        raise StageError(
            f"{where}: no prompt: the record's {config.text_key!r} field is "
            f"{'missing' if value is None else repr(value)[:60]} (fields: {fields}); "
            f"set text_key to the prompt's field or give a `prompt` template",
            error_type="MissingPrompt",
        )
    return value


def load_image(record: dict[str, Any], key: str, where: str):
    """The record's conditioning image as an RGB PIL image, upright."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    value = record.get(key)
    if value is None or value == "":
        raise StageError(
            f"{where}: this model animates an image, but the record has no {key!r} field; "
            f"set image_key to the field holding the image path",
            error_type="MissingImage",
        )
    path = Path(value)
    if not path.is_file():
        raise StageError(f"{where}: image file not found: {path}", error_type="ImageNotFound")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise StageError(
            f"{where}: cannot read {path.name} as an image ({exc}); expected PNG, JPEG, WebP, ...",
            error_type="ImageDecodeError",
        ) from None
